"""Tests of the MONAI Label studies folders written by :mod:`cotrain.studies`."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cotrain.studies import FINAL_LABELS_DIR, import_msd_studies, write_demo_studies
from cotrain.synthetic import make_synthetic_case, write_synthetic_msd

HIPPOCAMPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hippocampus"


def _ids(folder: Path) -> list[str]:
    return sorted(p.name.removesuffix(".nii.gz") for p in folder.glob("*.nii.gz"))


def test_demo_studies_layout(tmp_path: Path) -> None:
    studies = write_demo_studies(
        tmp_path / "studies",
        num_images=5,
        num_labeled=2,
        shape=(16, 20, 24),
        seed=3,
        spacing=(1.0, 1.5, 2.0),
        truth_dir=tmp_path / "truth",
    )
    folder = tmp_path / "studies"
    assert studies.folder == folder
    assert studies.labeled == ["case_000", "case_001"]
    assert studies.unlabeled == ["case_002", "case_003", "case_004"]
    assert studies.images == _ids(folder)
    assert _ids(folder / FINAL_LABELS_DIR) == studies.labeled
    assert _ids(tmp_path / "truth") == studies.images

    image = nib.load(folder / "case_001.nii.gz")
    label = nib.load(folder / FINAL_LABELS_DIR / "case_001.nii.gz")
    assert image.shape == label.shape == (16, 20, 24)
    np.testing.assert_allclose(image.affine, label.affine)
    np.testing.assert_allclose(np.diag(image.affine)[:3], (1.0, 1.5, 2.0))
    expected_image, expected_label = make_synthetic_case((16, 20, 24), seed=4)
    np.testing.assert_allclose(image.get_fdata(), expected_image, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(label.dataobj), expected_label)
    truth = nib.load(tmp_path / "truth" / "case_004.nii.gz")
    np.testing.assert_array_equal(
        np.asarray(truth.dataobj), make_synthetic_case((16, 20, 24), seed=7)[1]
    )


def test_demo_studies_refuses_existing_images(tmp_path: Path) -> None:
    write_demo_studies(tmp_path, num_images=1, num_labeled=0, shape=(8, 8, 8))
    with pytest.raises(FileExistsError):
        write_demo_studies(tmp_path, num_images=1, num_labeled=0, shape=(8, 8, 8))
    write_demo_studies(tmp_path, num_images=2, num_labeled=1, shape=(8, 8, 8), overwrite=True)
    assert _ids(tmp_path) == ["case_000", "case_001"]


@pytest.mark.parametrize("num_labeled", [-1, 4])
def test_demo_studies_rejects_bad_counts(tmp_path: Path, num_labeled: int) -> None:
    with pytest.raises(ValueError, match="num_labeled"):
        write_demo_studies(tmp_path, num_images=3, num_labeled=num_labeled, shape=(8, 8, 8))


def test_import_msd_studies(tmp_path: Path) -> None:
    msd = tmp_path / "msd"
    names = write_synthetic_msd(msd, num_cases=5, shape=(12, 12, 12), num_classes=3)
    (msd / "imagesTr" / "._case_000.nii.gz").write_bytes(b"not an image")  # macOS junk
    studies = import_msd_studies(msd, tmp_path / "studies", num_labeled=2)

    folder = tmp_path / "studies"
    assert studies.labeled == names[:2]
    assert studies.unlabeled == names[2:]
    assert _ids(folder) == names
    assert _ids(folder / FINAL_LABELS_DIR) == names[:2]
    for name in names[:2]:
        copied = folder / FINAL_LABELS_DIR / f"{name}.nii.gz"
        original = msd / "labelsTr" / f"{name}.nii.gz"
        assert copied.read_bytes() == original.read_bytes()
    # Labels of the unlabeled pool must not leak anywhere into the studies folder.
    assert len(list(folder.rglob("*.nii.gz"))) == len(names) + 2


def test_import_msd_studies_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no NIfTI images"):
        import_msd_studies(tmp_path / "missing", tmp_path / "out", num_labeled=1)
    msd = tmp_path / "msd"
    write_synthetic_msd(msd, num_cases=2, shape=(8, 8, 8))
    with pytest.raises(ValueError, match="num_labeled"):
        import_msd_studies(msd, tmp_path / "out", num_labeled=3)
    (msd / "labelsTr" / "case_000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_000"):
        import_msd_studies(msd, tmp_path / "out", num_labeled=1)


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"hippocampus data not found at {HIPPOCAMPUS}")
def test_import_hippocampus(tmp_path: Path) -> None:
    studies = import_msd_studies(HIPPOCAMPUS, tmp_path / "studies", num_labeled=4)
    assert len(studies.images) == 200
    assert len(studies.labeled) == 4
    assert studies.labeled == sorted(studies.images)[:4]
    label = nib.load(tmp_path / "studies" / FINAL_LABELS_DIR / f"{studies.labeled[0]}.nii.gz")
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
