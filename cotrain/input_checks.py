"""Checks of images, labels and ids before they are stored, trained on or segmented.

Pure functions over NIfTI files (nibabel and numpy; no torch, no MONAI Label), so every rule
is testable without a server. Each check raises an error whose message names the problem in
words a user can act on ("shape (30, 32, 32) does not match the image's (32, 32, 32)"):

- :func:`check_image_file`: a readable NIfTI volume with the model's number of spatial
  dimensions, at least one voxel and only finite values.
- :func:`check_label_file`: a readable NIfTI label on its image's grid (same shape and affine),
  finite, integer-valued, with values 0 (background) or a configured label value. An all-background label is valid.
- :func:`check_safe_id`: an image id or label tag names a file *inside* the studies folder.
- :func:`check_cases`: the usable cases of a training set, with the reason for each one left out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from cotrain.files import nifti_name

logger = logging.getLogger(__name__)

__all__ = [
    "AFFINE_TOLERANCE",
    "InvalidImageError",
    "InvalidLabelError",
    "UnsafeIdError",
    "check_cases",
    "check_image_file",
    "check_image_header",
    "check_label_file",
    "check_safe_id",
]

#: Largest difference allowed between a label's and its image's affine entries (mm for the
#: origin, mm per voxel for the spacing and direction): NIfTI stores them as float32, and
#: viewers round them slightly differently, but a real mismatch is far larger.
AFFINE_TOLERANCE = 1e-3


class InvalidImageError(ValueError):
    """An image that cannot be trained on or segmented; the message says why."""


class InvalidLabelError(ValueError):
    """A label that does not fit its image or the configured labels; the message says why."""


class UnsafeIdError(ValueError):
    """An image id or label tag that would name a file outside the studies folder."""


def check_safe_id(value: Any, what: str = "image id") -> str:
    """Accept ``value`` only if it names a file directly inside a folder.

    Image ids and label tags of a local studies folder are file and folder names; anything
    that could reach another folder (``..``, a path separator, an absolute path) is refused.

    Args:
        value: The id or tag as received.
        what: What it is, for the message (``"image id"``, ``"label tag"``).

    Returns:
        ``value``.

    Raises:
        UnsafeIdError: Naming the problem.
    """
    if not isinstance(value, str) or not value.strip():
        raise UnsafeIdError(f"{what} {value!r} is empty")
    if "\x00" in value:
        raise UnsafeIdError(f"{what} {value!r} contains a NUL character")
    if os.path.isabs(value) or value.startswith(("/", "\\", "~")):
        raise UnsafeIdError(f"{what} {value!r} is an absolute path; use the id of an image")
    if "/" in value or "\\" in value:
        raise UnsafeIdError(f"{what} {value!r} contains a path separator; ids name one file")
    if value.strip(".") == "":
        raise UnsafeIdError(f"{what} {value!r} names a folder, not a file")
    return value


def _open_nifti(path: str | Path, what: str, error: type[ValueError]) -> nib.Nifti1Image:
    """The NIfTI image at ``path`` (header read, voxels not yet), or ``error`` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path.name} does not exist")
    if path.stat().st_size == 0:
        raise error(f"{what} {path.name} is empty (0 bytes)")
    if nifti_name(path) is None:
        raise error(f"{what} {path.name} is not a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for foreign or damaged files
        raise error(f"{what} {path.name} is not a readable NIfTI file: {e}") from e
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise error(f"{what} {path.name} is not a NIfTI file ({type(image).__name__})")
    return image


def _spatial_shape(
    image: nib.Nifti1Image, spatial_dims: int, what: str, error: type[ValueError]
) -> tuple[int, ...]:
    """The spatial shape of ``image``; extra trailing axes must have size 1."""
    shape = tuple(int(s) for s in image.shape)
    if not shape or any(s == 0 for s in shape):
        raise error(f"{what} has no voxels (shape {shape})")
    if len(shape) < spatial_dims:
        raise error(f"{what} is {len(shape)}D (shape {shape}); the model needs {spatial_dims}D")
    if any(s != 1 for s in shape[spatial_dims:]):
        raise error(
            f"{what} has {len(shape)} dimensions (shape {shape}); expected a single "
            f"{spatial_dims}D volume"
        )
    spatial = shape[:spatial_dims]
    extent = sum(s > 1 for s in spatial)
    if extent < spatial_dims:
        raise error(f"{what} is {extent}D (shape {shape}); the model needs {spatial_dims}D")
    return spatial


def _read_voxels(image: nib.Nifti1Image, what: str, error: type[ValueError]) -> np.ndarray:
    """All voxels of ``image``, or ``error`` for a truncated or damaged file."""
    try:
        return np.asanyarray(image.dataobj)
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError, ...
        raise error(
            f"{what} voxel data cannot be read (truncated or corrupt file?): "
            f"{type(e).__name__}: {e}"
        ) from e


def _check_finite(data: np.ndarray, what: str, error: type[ValueError]) -> None:
    if not np.issubdtype(data.dtype, np.floating):
        return
    nan = int(np.isnan(data).sum())
    inf = int(np.isinf(data).sum())
    problems = [f"{n} {kind} voxels" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n]
    if problems:
        raise error(f"{what} has {' and '.join(problems)}")


def check_image_header(path: str | Path, spatial_dims: int = 3) -> nib.Nifti1Image:
    """Check what the header of an image says, without reading its voxels.

    Args:
        path: The image file.
        spatial_dims: The model's spatial dimensions.

    Returns:
        The opened image.

    Raises:
        InvalidImageError: Missing, empty, not NIfTI, unreadable header, no voxels, or fewer
            spatial dimensions than the model needs.
    """
    image = _open_nifti(path, "image", InvalidImageError)
    _spatial_shape(image, spatial_dims, f"image {Path(path).name}", InvalidImageError)
    return image


def check_image_file(path: str | Path, spatial_dims: int = 3) -> nib.Nifti1Image:
    """Check an image fully: :func:`check_image_header`, then every voxel readable and finite.

    Args:
        path: The image file.
        spatial_dims: The model's spatial dimensions.

    Returns:
        The opened image.

    Raises:
        InvalidImageError: Naming the problem.
    """
    image = check_image_header(path, spatial_dims)
    what = f"image {Path(path).name}"
    _check_finite(_read_voxels(image, what, InvalidImageError), what, InvalidImageError)
    return image


def _describe_labels(labels: Mapping[str, int]) -> str:
    named = [f"{v} {k}" for k, v in sorted(labels.items(), key=lambda kv: kv[1])]
    return ", ".join(["0 background", *named])


def check_label_file(
    label_path: str | Path,
    image_path: str | Path,
    labels: Mapping[str, int] | None,
    spatial_dims: int = 3,
    affine_tolerance: float = AFFINE_TOLERANCE,
) -> list[int]:
    """Check that a label fits its image and the configured labels.

    Args:
        label_path: The label file.
        image_path: The image it labels.
        labels: Label names to values; ``None`` checks the grid and finiteness only (e.g. for
            a float map stored beside an image).
        spatial_dims: The model's spatial dimensions.
        affine_tolerance: See :data:`AFFINE_TOLERANCE`.

    Returns:
        The label values present, sorted (``[0]`` for an all-background label).

    Raises:
        InvalidLabelError: Naming the problem with the label.
        InvalidImageError: If the image itself cannot be read.
    """
    label = _open_nifti(label_path, "label", InvalidLabelError)
    image = check_image_header(image_path, spatial_dims)
    what = "label"
    label_shape = _spatial_shape(label, spatial_dims, what, InvalidLabelError)
    image_shape = tuple(int(s) for s in image.shape[:spatial_dims])
    if label_shape != image_shape:
        raise InvalidLabelError(
            f"label shape {label_shape} does not match the image's {image_shape}"
        )
    difference = float(np.abs(np.asarray(label.affine) - np.asarray(image.affine)).max())
    if not difference <= affine_tolerance:
        raise InvalidLabelError(
            f"label affine (voxel-to-world geometry) differs from the image's by up to "
            f"{difference:.4g} (allowed {affine_tolerance:g}); label:\n"
            f"{np.round(label.affine, 4)}\nimage:\n{np.round(image.affine, 4)}"
        )
    data = _read_voxels(label, what, InvalidLabelError)
    _check_finite(data, what, InvalidLabelError)
    if labels is None:
        return []
    if not np.issubdtype(data.dtype, np.integer) and not np.issubdtype(data.dtype, np.bool_):
        fractional = int((data != np.round(data)).sum())
        if fractional:
            raise InvalidLabelError(
                f"label has {fractional} voxels with non-integer values (e.g. "
                f"{float(data[data != np.round(data)].flat[0]):g}); expected label values "
                f"({_describe_labels(labels)})"
            )
    present = [int(v) for v in np.unique(data)]
    allowed = {0, *(int(v) for v in labels.values())}
    outside = [v for v in present if v not in allowed]
    if outside:
        raise InvalidLabelError(
            f"label has values {outside[:10]} outside the configured labels "
            f"({_describe_labels(labels)})"
        )
    return present


def _signature(case: Mapping[str, str], labels: Mapping[str, int] | None) -> str:
    """What a verdict on ``case`` depends on: each file's path, size and modification time,
    and for a labeled case the label values allowed."""
    parts = [f"labels={sorted(labels.items())}"] if "label" in case and labels else []
    for key in ("image", "label"):
        if key in case:
            try:
                stat = os.stat(case[key])
                parts.append(f"{key}={case[key]}:{stat.st_size}:{stat.st_mtime_ns}")
            except OSError:
                parts.append(f"{key}={case[key]}:missing")
    return "|".join(parts)


def check_cases(
    cases: Sequence[Mapping[str, str]],
    labels: Mapping[str, int] | None,
    spatial_dims: int = 3,
    known: Mapping[str, str | None] | None = None,
) -> tuple[list[dict[str, str]], dict[str, str], dict[str, str | None]]:
    """Split training cases into usable ones and the ones to skip, with the reason.

    A full check reads every voxel, so verdicts can be kept between runs: ``known`` holds
    earlier verdicts keyed by the files' path, size and modification time (and the label
    values allowed), and is reused where none of these changed.

    Args:
        cases: ``{"image": path, "label"?: path}`` dicts.
        labels: Label names to values (for labeled cases).
        spatial_dims: The model's spatial dimensions.
        known: Earlier verdicts (key -> reason, ``None`` for usable), e.g. from a JSON file.

    Returns:
        ``(usable, skipped, verdicts)``: the usable cases in input order, image path ->
        reason for the others, and the verdicts of exactly these cases (to keep).
    """
    usable: list[dict[str, str]] = []
    skipped: dict[str, str] = {}
    verdicts: dict[str, str | None] = {}
    for case in cases:
        key = _signature(case, labels)
        if known is not None and key in known:
            reason = known[key]
        else:
            reason = _case_problem(case, labels, spatial_dims)
        verdicts[key] = reason
        if reason is None:
            usable.append(dict(case))
        else:
            skipped[case["image"]] = reason
    return usable, skipped, verdicts


def _case_problem(
    case: Mapping[str, str], labels: Mapping[str, int] | None, spatial_dims: int
) -> str | None:
    """Why ``case`` cannot be trained on, or ``None`` if it can."""
    try:
        check_image_file(case["image"], spatial_dims)
        if "label" in case:
            check_label_file(case["label"], case["image"], labels, spatial_dims)
    except (InvalidImageError, InvalidLabelError) as e:
        return str(e)
    return None
