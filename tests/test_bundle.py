"""Exporting the served ensemble as a MONAI bundle, run by MONAI alone the way a user would."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cotrain.bundle import INFERENCE_CONFIG, METADATA_FILE, README_FILE, WEIGHTS_FILE
from cotrain.checkpoint import DIGEST_KEY, MODEL_FILE, load_file, save_atomically
from cotrain.cli import main
from cotrain.engine import Trainer
from cotrain.inference import (
    SLIDING_WINDOW_BATCH_SIZE,
    SLIDING_WINDOW_MODE,
    SLIDING_WINDOW_OVERLAP,
    EnsemblePredictor,
)
from tests.conftest import tiny_config

#: Model settings the export is checked with: the tiny config as trained, and the same weights
#: under a config that resamples (anisotropic spacing) and uses a CT window.
VARIANTS = {
    "as_trained": {},
    "resampled_ct": {"target_spacing": [1.0, 1.3, 1.7], "intensity": "ct:0,300"},
}
#: An oblique, anisotropic affine (axes permuted, flipped, 1.2 / 1.5 / 2.0 mm voxels).
OBLIQUE_AFFINE = np.array(
    [[0, -1.5, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]], dtype=float
)

#: Runs each bundle with MONAI's own ``monai.bundle.run`` (what ``python -m monai.bundle run``
#: calls) in a Python where ``import cotrain`` fails.
RUN_BUNDLES = textwrap.dedent(
    """
    import json, sys
    sys.modules["cotrain"] = None  # the bundle must not need cotrain
    from monai.bundle import run
    for bundle, images, output in json.loads(sys.argv[1]):
        run(
            config_file=f"{bundle}/configs/inference.json",
            meta_file=f"{bundle}/configs/metadata.json",
            bundle_root=bundle,
            dataset_dir=images,
            output_dir=output,
            device="$torch.device('cpu')",
        )
    """
)


def _model_variant(model_path: Path, settings: dict, destination: Path) -> Path:
    """``model_path``'s weights under a config with ``settings`` changed, as a valid model file."""
    payload = load_file(model_path)
    body = {k: v for k, v in payload.items() if k not in ("format", DIGEST_KEY)}
    body["config"] = {**body["config"], **settings}
    return save_atomically(body, destination)


@pytest.fixture(scope="module")
def exported(synthetic_cases: list[dict[str, str]], tmp_path_factory: pytest.TempPathFactory):
    """A tiny trained ensemble per variant, exported with the CLI and run by MONAI on an
    image with an oblique affine (one subprocess for all bundles)."""
    root = tmp_path_factory.mktemp("bundle")
    torch.set_num_threads(2)
    trained = Trainer(
        tiny_config(epochs=1, iterations_per_epoch=2), synthetic_cases[:3], [], root / "run"
    )
    trained.fit()
    images = root / "images"
    images.mkdir()
    # Larger than the 32^3 window on two axes, so the sliding windows overlap and blend.
    voxels = np.asarray(nib.load(synthetic_cases[-1]["image"]).dataobj)[:, :30, :]
    voxels = np.pad(voxels, ((0, 12), (0, 0), (0, 8)), mode="reflect")
    image_path = images / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(voxels, OBLIQUE_AFFINE), image_path)

    results = {}
    for name, settings in VARIANTS.items():
        model = _model_variant(root / "run" / MODEL_FILE, settings, root / name / MODEL_FILE)
        bundle = root / name / "bundle"
        assert main(["export-bundle", "--model", str(model.parent), "--output", str(bundle)]) == 0
        results[name] = {"model": model, "bundle": bundle, "output": root / name / "labels"}
    jobs = [[str(r["bundle"]), str(images), str(r["output"])] for r in results.values()]
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", RUN_BUNDLES, json.dumps(jobs)],
        cwd=root,
        env=environment,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return {"image": image_path, "variants": results}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bundle_label_matches_the_server(exported: dict, variant: str) -> None:
    result = exported["variants"][variant]
    image = nib.load(exported["image"])
    written = nib.load(result["output"] / "oblique_seg.nii.gz")
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)

    predictor = EnsemblePredictor.load(result["model"], device="cpu")
    served = predictor.predict_file(exported["image"]).label
    label = np.asarray(written.dataobj)
    assert set(np.unique(label)) <= {0, *predictor.labels.values()}
    # The same computation (same windows, blending, vote, inverse, argmax): the same label.
    agreement = float(np.mean(label == served))
    assert np.array_equal(label, served), f"bundle and server agree on {agreement:.4%} of voxels"


def test_bundle_files_describe_the_ensemble(exported: dict) -> None:
    result = exported["variants"]["as_trained"]
    bundle = result["bundle"]
    payload = load_file(result["model"])
    config, spec = payload["config"], payload["ensemble"]["spec"]

    inference = (bundle / INFERENCE_CONFIG).read_text()
    assert "cotrain" not in inference  # only MONAI components and expressions
    parsed = json.loads(inference)
    assert len(parsed["network_defs"]) == spec["num_members"]
    assert parsed["inferer"] == {
        "_target_": "SlidingWindowInferer",
        "roi_size": list(config["roi_size"]),
        "sw_batch_size": SLIDING_WINDOW_BATCH_SIZE,
        "overlap": SLIDING_WINDOW_OVERLAP,
        "mode": SLIDING_WINDOW_MODE,
    }

    weights = torch.load(bundle / WEIGHTS_FILE, weights_only=True)
    assert sorted(weights) == [f"member_{i}" for i in range(spec["num_members"])]
    for i, state in enumerate(weights.values()):
        prefix = f"members.{i}."
        expected = {
            k.removeprefix(prefix): v
            for k, v in payload["ensemble"]["state_dict"].items()
            if k.startswith(prefix)
        }
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)

    metadata = json.loads((bundle / METADATA_FILE).read_text())
    mandatory = ("version", "monai_version", "pytorch_version", "numpy_version", "task")
    for key in (*mandatory, "description", "authors", "copyright", "network_data_format"):
        assert metadata[key], key
    labels = {"background": 0, **config["labels"]}
    assert metadata["labels"] == labels
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {str(v): k for k, v in labels.items()}
    image_format = metadata["network_data_format"]["inputs"]["image"]
    assert image_format["num_channels"] == spec["in_channels"]
    assert image_format["spatial_shape"] == list(config["roi_size"])
    assert metadata["members"] == spec["num_members"]
    assert metadata["training"]["method"] == config["method"]
    assert metadata["training"]["model_sha256"] == payload[DIGEST_KEY]
    assert "monai.bundle run" in (bundle / README_FILE).read_text()


def test_export_names_what_is_wrong(
    exported: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a model")
    from_shell = subprocess.run(
        [sys.executable, "-m", "cotrain", "export-bundle", "--model", str(junk), "--output", "b"],
        cwd=tmp_path,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        check=False,
    )
    assert from_shell.returncode == 2
    assert "junk.pt is not a readable cotrain model file" in from_shell.stderr
    assert not (tmp_path / "b").exists()

    tampered = tmp_path / "tampered.pt"
    payload = torch.load(exported["variants"]["as_trained"]["model"], weights_only=True)
    first = next(iter(payload["ensemble"]["state_dict"]))
    payload["ensemble"]["state_dict"][first] += 1.0
    torch.save(payload, tampered)
    not_empty = tmp_path / "not_empty"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("mine")
    good_model = str(exported["variants"]["as_trained"]["model"])
    cases = {
        "missing": (
            ["--model", str(tmp_path / "nothing.pt"), "--output", str(tmp_path / "o1")],
            "no model file",
        ),
        "tampered": (
            ["--model", str(tampered), "--output", str(tmp_path / "o2")],
            "does not match its SHA-256",
        ),
        "not_empty": (["--model", good_model, "--output", str(not_empty)], "not an empty folder"),
    }
    for name, (arguments, message) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="cotrain"):
            assert main(["export-bundle", *arguments]) == 2, name
        assert message in caplog.text, (name, caplog.text)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert [p.name for p in not_empty.iterdir()] == ["keep.txt"]
