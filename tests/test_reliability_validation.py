"""Checks of images, labels and ids (``cotrain.input_checks``): every bad input a radiologist or a
studies folder can produce gets an error naming the problem; good input passes."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cotrain.input_checks import (
    InvalidImageError,
    InvalidLabelError,
    UnsafeIdError,
    check_cases,
    check_image_file,
    check_label_file,
    check_safe_id,
)
from cotrain.synthetic import make_synthetic_case

LABELS = {"organ": 1}
SHAPE = (12, 10, 8)
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path]:
    """A good image and its label."""
    image, label = make_synthetic_case(SHAPE, seed=1)
    return _save(tmp_path / "img.nii.gz", image), _save(tmp_path / "lbl.nii.gz", label)


def test_a_good_image_and_label_pass(case: tuple[Path, Path]) -> None:
    image, label = case
    assert check_image_file(image).shape == SHAPE
    assert check_label_file(label, image, LABELS) == [0, 1]


def test_an_all_background_label_is_valid(case: tuple[Path, Path], tmp_path: Path) -> None:
    empty = _save(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    assert check_label_file(empty, case[0], LABELS) == [0]


def test_a_label_with_a_trailing_singleton_axis_is_valid(
    case: tuple[Path, Path], tmp_path: Path
) -> None:
    label = np.asarray(nib.load(case[1]).dataobj)[..., None]
    assert check_label_file(_save(tmp_path / "l4.nii.gz", label), case[0], LABELS) == [0, 1]


def _write_bad_file(kind: str, folder: Path, good: Path) -> Path:
    """A file of the given kind of damage, made from the good NIfTI file ``good``."""
    data = good.read_bytes()
    contents = {
        "random-bytes": ("r.nii.gz", np.random.default_rng(0).bytes(3000)),
        "truncated": ("t.nii.gz", data[: len(data) * 2 // 3]),
        "not-nifti": ("x.txt", b"organ"),
        "zero-bytes": ("z.nii.gz", b""),
        "gzip-of-text": ("g.nii.gz", gzip.compress(b"hello" * 100)),
    }
    name, content = contents[kind]
    (folder / name).write_bytes(content)
    return folder / name


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("random-bytes", "not a readable NIfTI file"),
        ("truncated", "truncated or corrupt"),
        ("not-nifti", r"not a NIfTI file \(.nii or .nii.gz\)"),
        ("zero-bytes", r"empty \(0 bytes\)"),
        ("gzip-of-text", "not a readable NIfTI file"),
    ],
)
def test_unreadable_files_are_named(
    case: tuple[Path, Path], tmp_path: Path, kind: str, message: str
) -> None:
    bad = _write_bad_file(kind, tmp_path, case[0])
    with pytest.raises(InvalidLabelError, match=message):
        check_label_file(bad, case[0], LABELS)
    with pytest.raises(InvalidImageError, match=message):
        check_image_file(bad)


def test_a_label_on_another_grid_is_refused(case: tuple[Path, Path], tmp_path: Path) -> None:
    image, label = case
    data = np.asarray(nib.load(label).dataobj)
    with pytest.raises(
        InvalidLabelError, match=r"shape \(11, 10, 8\) does not match the image's \(12, 10, 8\)"
    ):
        check_label_file(_save(tmp_path / "s.nii.gz", data[:-1]), image, LABELS)
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    with pytest.raises(InvalidLabelError, match="affine .* differs from the image's by up to 5"):
        check_label_file(_save(tmp_path / "a.nii.gz", data, shifted), image, LABELS)
    # float32 rounding of the affine is not a mismatch
    rounded = AFFINE + 1e-6
    assert check_label_file(_save(tmp_path / "r.nii.gz", data, rounded), image, LABELS) == [0, 1]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            np.uint8([0, 3, 7]),
            r"values \[3, 7\] outside the configured labels \(0 background, 1 organ\)",
        ),
        (np.float32([0, 1, np.nan]), "1 NaN voxels"),
        (np.float32([0, np.inf, -np.inf]), "2 infinite voxels"),
        (np.float32([0, 0.5, 1]), "non-integer values"),
        (np.int16([0, -1, 1]), r"values \[-1\] outside"),
    ],
    ids=["out-of-range", "nan", "inf", "fractional", "negative"],
)
def test_label_values_are_checked(
    case: tuple[Path, Path], tmp_path: Path, values: np.ndarray, message: str
) -> None:
    data = np.zeros(SHAPE, values.dtype)
    data.flat[: len(values)] = values
    with pytest.raises(InvalidLabelError, match=message):
        check_label_file(_save(tmp_path / "v.nii.gz", data), case[0], LABELS)


def test_a_float_map_is_checked_for_grid_and_finiteness_only(
    case: tuple[Path, Path], tmp_path: Path
) -> None:
    uncertainty = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    assert check_label_file(_save(tmp_path / "u.nii.gz", uncertainty), case[0], None) == []


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((12, 10), "is 2D"),
        ((12, 10, 1), "is 2D"),
        ((12, 10, 0), "no voxels"),
        ((4, 4, 4, 2), "4 dimensions"),
    ],
)
def test_images_that_are_not_volumes_are_named(
    tmp_path: Path, shape: tuple[int, ...], message: str
) -> None:
    path = _save(tmp_path / "i.nii.gz", np.ones(shape, np.float32), np.eye(4))
    with pytest.raises(InvalidImageError, match=message):
        check_image_file(path)


def test_an_image_with_nan_voxels_is_named(tmp_path: Path) -> None:
    data = np.ones(SHAPE, np.float32)
    data[0, 0, :3] = np.nan
    with pytest.raises(InvalidImageError, match="3 NaN voxels"):
        check_image_file(_save(tmp_path / "n.nii.gz", data))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("../case_000", "path separator"),
        ("/etc/passwd", "absolute path"),
        ("..", "names a folder"),
        ("a\\..\\b", "path separator"),
        ("", "empty"),
        ("case\x00", "NUL"),
        ("~root", "absolute path"),
    ],
)
def test_ids_that_leave_the_folder_are_refused(value: str, message: str) -> None:
    with pytest.raises(UnsafeIdError, match=message):
        check_safe_id(value)


def test_ordinary_ids_are_accepted() -> None:
    for value in ("case_000", "1.2.840.113619.2.55", "patient 7 (T1)"):
        assert check_safe_id(value) == value


def test_check_cases_skips_bad_cases_and_reuses_verdicts(
    case: tuple[Path, Path], tmp_path: Path
) -> None:
    image, label = case
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b garbage")
    flat = _save(tmp_path / "flat.nii.gz", np.ones((12, 10), np.float32))
    cases = [
        {"image": str(image), "label": str(label)},
        {"image": str(corrupt)},
        {"image": str(flat)},
    ]
    usable, skipped, verdicts = check_cases(cases, LABELS)
    assert usable == cases[:1]
    assert set(skipped) == {str(corrupt), str(flat)}
    assert "is 2D" in skipped[str(flat)]
    assert len(verdicts) == 3

    # Unchanged files: the remembered verdicts are used (a wrong one proves it).
    known = {key: "remembered" for key in verdicts}
    _, skipped_again, _ = check_cases(cases, LABELS, known=known)
    assert set(skipped_again.values()) == {"remembered"}
    # A changed file is checked again.
    _save(flat, np.ones(SHAPE, np.float32))
    usable, skipped_again, _ = check_cases(cases, LABELS, known=verdicts)
    assert [c["image"] for c in usable] == [str(image), str(flat)]
