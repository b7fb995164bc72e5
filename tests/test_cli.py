"""The command line as a user runs it: train, evaluate and predict on NIfTI files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cotrain.checkpoint import load_file
from cotrain.synthetic import write_synthetic_msd
from tests.conftest import SHARED_DATA

TINY = ["--roi", "32", "32", "32", "--channels", "8", "16", "32"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cotrain", *args],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
        check=False,
    )


def test_train_evaluate_predict_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "msd"
    write_synthetic_msd(data, 8, shape=(32, 32, 32))
    # An image with an oblique, anisotropic affine must come back on its own grid.
    oblique = np.array(
        [[0, -1.5, 0, 10], [1.2, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]], dtype=float
    )
    image = nib.load(data / "imagesTr" / "case_007.nii.gz")
    oblique_path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :30, :28], oblique), oblique_path)
    (tmp_path / "val.txt").write_text("case_006\ncase_007\n")
    output = tmp_path / "run"

    train = run_cli(
        "train",
        "--method",
        "dct_seg",
        "--data",
        str(data),
        "--labeled",
        "3",
        "--val-list",
        str(tmp_path / "val.txt"),
        "--output",
        str(output),
        "--epochs",
        "2",
        "--iterations",
        "3",
        "--perturb-unlabeled",
        *TINY,
    )
    assert train.returncode == 0, train.stderr
    summary = json.loads(train.stdout)
    assert summary["epochs"] == 2 and Path(summary["model"]).is_file()
    assert load_file(summary["model"])["config"]["perturb_unlabeled"] is True
    # --spacing and --intensity not given: planned from the images (one grid, not CT).
    assert summary["plan"]["target_spacing"] is None and summary["plan"]["intensity"] == "zscore"
    assert json.loads((output / "plan.json").read_text())["num_images"] == 6
    split = json.loads((output / "split.json").read_text())
    assert split == {
        "labeled": ["case_000", "case_001", "case_002"],
        "validation": ["case_006", "case_007"],
        "unlabeled": 3,
    }
    assert "epoch 2/2" in train.stderr  # the progress bar and epoch lines

    evaluate = run_cli(
        "evaluate",
        "--model",
        str(output),
        "--data",
        str(data),
        "--cases",
        str(tmp_path / "val.txt"),
    )
    assert evaluate.returncode == 0, evaluate.stderr
    report = json.loads(evaluate.stdout)
    assert report["cases"] == 2 and report["method"] == "dct_seg"
    assert set(report["vote"]["dice"]) == {"label_1"} and set(report["vote"]["hd95"]) == {"label_1"}
    assert len(report["members"]) == 2
    assert 0.0 <= report["vote"]["dice"]["label_1"] <= 1.0

    label_path, uncertainty_path = tmp_path / "label.nii.gz", tmp_path / "uncertainty.nii.gz"
    predict = run_cli(
        "predict",
        "--model",
        str(output / "model.pt"),
        "--image",
        str(oblique_path),
        "--output",
        str(label_path),
        "--uncertainty",
        str(uncertainty_path),
    )
    assert predict.returncode == 0, predict.stderr
    for path in (label_path, uncertainty_path):
        written = nib.load(path)
        assert written.shape == (32, 30, 28)
        np.testing.assert_allclose(written.affine, oblique)


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    missing = run_cli(
        "train",
        "--method",
        "dct_seg",
        "--data",
        str(tmp_path),
        "--labeled",
        "1",
        "--output",
        str(tmp_path / "o"),
    )
    assert missing.returncode == 2
    assert "is not an MSD folder" in missing.stderr
    write_synthetic_msd(tmp_path / "msd", 2, shape=(16, 16, 16))
    bad_method = run_cli(
        "train",
        "--method",
        "dct_seg",
        "--members",
        "1",
        "--data",
        str(tmp_path / "msd"),
        "--labeled",
        "1",
        "--output",
        str(tmp_path / "o"),
    )
    assert bad_method.returncode == 2 and "needs members >= 2" in bad_method.stderr
    no_model = run_cli(
        "predict",
        "--model",
        str(tmp_path / "nothing"),
        "--image",
        "x.nii.gz",
        "--output",
        "y.nii.gz",
    )
    assert no_model.returncode == 2 and "no model file" in no_model.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED_DATA / "hippocampus").is_dir(),
    reason=f"real data not found at {SHARED_DATA / 'hippocampus'}",
)
def test_hippocampus_short_run(tmp_path: Path) -> None:
    names = sorted(
        p.name.removesuffix(".nii.gz")
        for p in (SHARED_DATA / "hippocampus" / "imagesTr").glob("*.nii.gz")
    )
    (tmp_path / "val.txt").write_text("\n".join(names[-3:]))
    (tmp_path / "exclude.txt").write_text("\n".join(names[20:-3]))  # keep the run small
    train = run_cli(
        "train",
        "--method",
        "dct_seg",
        "--data",
        str(SHARED_DATA / "hippocampus"),
        "--labeled",
        "5",
        "--val-list",
        str(tmp_path / "val.txt"),
        "--exclude-list",
        str(tmp_path / "exclude.txt"),
        "--output",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--iterations",
        "4",
        "--roi",
        "40",
        "56",
        "40",
        "--channels",
        "8",
        "16",
        "32",
        "--labels",
        '{"anterior": 1, "posterior": 2}',
    )
    assert train.returncode == 0, train.stderr
    image = SHARED_DATA / "hippocampus" / "imagesTr" / f"{names[-1]}.nii.gz"
    predict = run_cli(
        "predict",
        "--model",
        str(tmp_path / "run"),
        "--image",
        str(image),
        "--output",
        str(tmp_path / "p.nii.gz"),
    )
    assert predict.returncode == 0, predict.stderr
    assert nib.load(tmp_path / "p.nii.gz").shape == nib.load(image).shape
