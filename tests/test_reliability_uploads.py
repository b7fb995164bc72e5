"""A real server refuses bad label and image uploads and ids that leave the studies folder,
with a 4xx naming the problem, and leaves the studies folder and its JSON exactly as before.
An all-background label is valid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from cotrain.studies import write_demo_studies
from tests.app_helpers import NO_SCORING_ENV, TINY_SERVER_CONF, MonaiLabelServer, copy_app, snapshot

pytestmark = pytest.mark.server

SHAPE = (16, 16, 16)


def _bad_labels(folder: Path, image: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad label for ``image``: file and a phrase the refusal must contain."""
    folder.mkdir()
    affine = nib.load(image).affine
    rng = np.random.default_rng(0)

    def save(name: str, data: np.ndarray, affine: np.ndarray = affine) -> Path:
        nib.save(nib.Nifti1Image(data, affine), folder / name)
        return folder / name

    noisy = save("noisy.nii.gz", rng.integers(0, 2, SHAPE).astype(np.uint8))
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(noisy.read_bytes()[: noisy.stat().st_size * 2 // 3])
    (folder / "random.nii.gz").write_bytes(rng.bytes(2048))
    (folder / "notes.txt").write_text("organ outlined on slices 3-9\n")
    shifted = affine.copy()
    shifted[:3, 3] += 4.0
    with_nan = np.zeros(SHAPE, np.float32)
    with_nan[5, 5, 5] = np.nan
    with_inf = np.zeros(SHAPE, np.float32)
    with_inf[1, 2, 3] = np.inf
    out_of_range = np.zeros(SHAPE, np.uint8)
    out_of_range[4:8, 4:8, 4:8] = 3
    return {
        "random bytes": (folder / "random.nii.gz", "not a readable NIfTI file"),
        "truncated": (truncated, "truncated or corrupt"),
        "not NIfTI": (folder / "notes.txt", "not a NIfTI file"),
        "shape": (
            save("shape.nii.gz", np.zeros((16, 16, 12), np.uint8)),
            "does not match the image's (16, 16, 16)",
        ),
        "affine": (save("affine.nii.gz", np.zeros(SHAPE, np.uint8), shifted), "affine"),
        "values": (
            save("values.nii.gz", out_of_range),
            "values [3] outside the configured labels (0 background, 1 organ)",
        ),
        "NaN": (save("nan.nii.gz", with_nan), "1 NaN voxels"),
        "infinite": (save("inf.nii.gz", with_inf), "1 infinite voxels"),
    }


def _refusal(call, status: int) -> str:
    """Run ``call``; it must fail with HTTP ``status``; return the server's message."""
    with pytest.raises(MONAILabelClientException) as error:
        call()
    assert f"Status: {status};" in error.value.msg, error.value.msg
    return error.value.msg


def test_bad_uploads_are_refused_and_change_nothing(tmp_path: Path) -> None:
    truth = tmp_path / "truth"
    studies = write_demo_studies(
        tmp_path / "studies", num_images=4, num_labeled=1, shape=SHAPE, truth_dir=truth
    )
    bad_labels = _bad_labels(tmp_path / "bad", studies.folder / "case_001.nii.gz")
    conf = {**TINY_SERVER_CONF, "auto_train": "false"}
    app_dir = copy_app(tmp_path / "app")
    with MonaiLabelServer(
        app_dir, studies.folder, conf, tmp_path / "server.log", env=NO_SCORING_ENV
    ) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        before = snapshot(studies.folder)
        assert "datastore_v2.json" in before

        # Bad label files: 422, the message names the problem.
        for kind, (path, phrase) in bad_labels.items():
            message = _refusal(lambda p=path: client.save_label("case_001", str(p)), 422)
            assert "label for case_001 rejected" in message and phrase in message, (kind, message)

        # Ids and tags that leave the studies folder, or name nothing: 400 / 404.
        good_label = str(truth / "case_001.nii.gz")
        for image_id, phrase in (
            ("../case_001", "path separator"),
            ("/etc/passwd", "absolute path"),
        ):
            assert phrase in _refusal(lambda i=image_id: client.save_label(i, good_label), 400)
        assert "label tag" in _refusal(
            lambda: client.save_label("case_001", good_label, tag="../../escaped"), 400
        )
        assert "not in the datastore" in _refusal(
            lambda: client.save_label("case_999", good_label), 404
        )

        # Images: an id leaving the folder (400), a corrupt image (422).
        image = str(studies.folder / "case_002.nii.gz")
        assert "path separator" in _refusal(lambda: client.upload_image(image, "../escaped"), 400)
        corrupt = bad_labels["random bytes"][0]
        assert "is not a readable NIfTI file" in _refusal(
            lambda: client.upload_image(str(corrupt), "new_case"), 422
        )

        # Infer on ids or paths outside the studies folder: 400, before any model is needed.
        outside = truth / "case_002.nii.gz"  # a real NIfTI file, outside the studies folder
        for image_id in ("../case_002", str(outside), "/etc/passwd"):
            message = _refusal(lambda i=image_id: client.infer("dct_seg", i, {}), 400)
            assert "is not an image of this server" in message

        assert snapshot(studies.folder) == before, "a refused upload changed the studies folder"
        assert not (tmp_path / "escaped.nii.gz").exists()
        assert not (studies.folder.parent / "escaped.nii.gz").exists()

        # An all-background label is valid and stored, JSON included.
        background = tmp_path / "background.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), nib.load(image).affine), background)
        response = client.save_label("case_002", str(background))
        assert response["label"] == "case_002"
        stored = studies.folder / "labels" / "final" / "case_002.nii.gz"
        assert not np.asarray(nib.load(stored).dataobj).any()
        objects = json.loads((studies.folder / "datastore_v2.json").read_text())["objects"]
        assert "final" in objects["case_002"]["labels"]
        # A good label replacing it is accepted too; no temporary files are left behind.
        client.save_label("case_002", str(truth / "case_002.nii.gz"))
        assert np.asarray(nib.load(stored).dataobj).any()
        assert not [p for p in studies.folder.rglob("*.tmp")]
