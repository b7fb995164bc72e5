"""Preprocessing planned from the data, as nnU-Net plans it: the patch size, target spacing and
intensity normalisation of a run derived from the images, so that a user need not know them.

:func:`fingerprint_images` reads what planning needs (shape and spacing from every header; the
intensities of a bounded, voxel-subsampled sample of images), :func:`plan_from_fingerprint`
derives a :class:`Plan` from it, :func:`plan_preprocessing` does both, and :func:`apply_plan`
fills only the settings not given explicitly. Shapes and spacings are in the RAS axis order the
preprocessing reorients to (:func:`cotrain.data.preprocessing_definition`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from cotrain.config import TrainConfig
from cotrain.files import nifti_name

logger = logging.getLogger(__name__)

__all__ = [
    "PLANNED_SETTINGS",
    "Fingerprint",
    "Plan",
    "apply_plan",
    "default_plan",
    "fingerprint_images",
    "list_images",
    "network_strides",
    "plan_from_fingerprint",
    "plan_preprocessing",
]

#: The TrainConfig settings a plan provides.
PLANNED_SETTINGS = ("roi_size", "target_spacing", "intensity")
#: The CT window of a plan: air (-1000 HU) to dense bone (1000 HU), mapped to [0, 1].
CT_WINDOW = "ct:-1000,1000"
#: nnU-Net's anisotropy threshold: the coarsest axis is "low resolution" when its spacing is
#: more than this many times the next coarsest and it has this many times fewer voxels.
ANISOTROPY_THRESHOLD = 3.0
#: Voxel budget of a patch when none is given, by spatial dimensions (cotrain's 96^3 in 3D).
DEFAULT_MAX_VOXELS = {2: 256 * 256, 3: 96 * 96 * 96}
#: Smallest patch side planned (TrainConfig accepts 8; 16 leaves a 3-level UNet 2 voxels).
MIN_SIDE = 16
#: Voxels read per sampled image for the intensity statistics.
SAMPLE_VOXELS = 100_000
_PERCENTILES = (0.5, 50.0, 99.5)


@dataclass
class Fingerprint:
    """What the images say: per-image shape and spacing, pooled intensity statistics.

    Attributes:
        spatial_dims: 2 or 3.
        shapes: Each readable image's spatial shape (RAS order in 3D).
        spacings: Each readable image's voxel size in mm, same order.
        percentiles: ``"0.5"``, ``"50"``, ``"99.5"``, ``"min"``, ``"max"`` of the sampled voxels.
        integer_valued: Whether every sampled voxel holds a whole number.
        intensity_images: How many images the intensities were sampled from.
        skipped: File name to why it was not used.
    """

    spatial_dims: int
    shapes: list[list[int]]
    spacings: list[list[float]]
    percentiles: dict[str, float]
    integer_valued: bool
    intensity_images: int
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        """Number of images whose header was read."""
        return len(self.shapes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (:meth:`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fingerprint:
        """The fingerprint written by :meth:`to_dict`."""
        return cls(**d)


@dataclass
class Plan:
    """Planned preprocessing and the fingerprint it was derived from.

    Attributes:
        roi_size: Patch size.
        target_spacing: Voxel size to resample to, or ``None`` to keep the images' grid.
        intensity: ``"zscore"`` or a CT window (see :func:`cotrain.config.parse_intensity`).
        modality: ``"ct"``, ``"mr"`` (anything not CT) or ``"unknown"`` (no image read).
        num_images: Images read.
        median_shape: Median spatial shape (voxels, before resampling).
        median_spacing: Median voxel size (mm).
        intensity_percentiles: The fingerprint's intensity percentiles.
        reasons: Why each value was chosen, in words.
        skipped: File name to why it was not used.
    """

    roi_size: tuple[int, ...]
    target_spacing: tuple[float, ...] | None
    intensity: str
    modality: str
    num_images: int
    median_shape: tuple[float, ...] | None
    median_spacing: tuple[float, ...] | None
    intensity_percentiles: dict[str, float]
    reasons: list[str]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        """The planned TrainConfig values, by name."""
        return {k: getattr(self, k) for k in PLANNED_SETTINGS}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def network_strides(network: Mapping[str, Any]) -> list[int | Sequence[int]]:
    """The downsampling strides of a member network (see :func:`cotrain.networks.member_definition`).

    Args:
        network: ``TrainConfig.network``: a UNet's ``channels``/``strides``, ``basicunet``
            (4 poolings) or ``segresnet`` (one per ``blocks_down`` after the first).
    """
    architecture = str(network.get("architecture", "unet")).lower()
    if architecture == "basicunet":
        return [2, 2, 2, 2]
    if architecture == "segresnet":
        return [2] * (len(network.get("blocks_down", (1, 2, 2, 4))) - 1)
    if "strides" in network:
        return list(network["strides"])
    return [2] * (len(network.get("channels", (16, 32, 64, 128))) - 1)


def _header_geometry(image: nib.Nifti1Image, dims: int | None) -> tuple[list[int], list[float]]:
    """Spatial shape and spacing of an image, in RAS order for 3D (ValueError if unusable)."""
    shape = [int(s) for s in image.shape]
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape {tuple(image.shape)} is not one 2D or 3D image")
    if dims is not None and len(shape) != dims:
        raise ValueError(f"{len(shape)}D (shape {tuple(image.shape)}); the model is {dims}D")
    affine = np.asarray(image.affine, dtype=float)
    spacing = [float(v) for v in np.sqrt((affine[:3, : len(shape)] ** 2).sum(axis=0))]
    if len(shape) == 3:  # the axes after reorientation to RAS
        axes = nib.orientations.io_orientation(affine)[:, 0]
        if not np.isnan(axes).any() and sorted(axes.astype(int)) == [0, 1, 2]:
            order = np.argsort(axes.astype(int))
            shape, spacing = [shape[i] for i in order], [spacing[i] for i in order]
    return shape, spacing


def _sample_voxels(image: nib.Nifti1Image) -> np.ndarray:
    """About :data:`SAMPLE_VOXELS` finite voxels of an image, on a regular sub-grid."""
    step = max(1, math.ceil((math.prod(image.shape) / SAMPLE_VOXELS) ** (1 / len(image.shape))))
    data = np.asarray(image.dataobj[(slice(None, None, step),) * len(image.shape)], dtype=float)
    return data[np.isfinite(data)].ravel()


def list_images(folder: str | Path) -> list[Path]:
    """The NIfTI files directly in ``folder``, sorted (hidden files left out)."""
    return sorted(p for p in Path(folder).iterdir() if nifti_name(p) and p.is_file())


def fingerprint_images(
    images: Sequence[str | Path], spatial_dims: int | None = None, max_intensity_images: int = 10
) -> Fingerprint:
    """Read the headers of ``images`` and the intensities of at most ``max_intensity_images``.

    Args:
        images: NIfTI files. Unreadable ones are skipped with a warning.
        spatial_dims: The model's spatial dimensions, or ``None``: those of most images.
        max_intensity_images: Images (spread over the list) whose voxels are sampled.

    Raises:
        ValueError: If no image could be read, naming the folder and each file's problem.
    """
    geometry: dict[Path, tuple[list[int], list[float]]] = {}
    skipped: dict[str, str] = {}
    for path in map(Path, images):
        try:
            geometry[path] = _header_geometry(nib.load(str(path)), spatial_dims)
        except Exception as e:  # nibabel raises many types for foreign or damaged files
            skipped[path.name] = str(e) or type(e).__name__
    if spatial_dims is None and geometry:
        counts = Counter(len(shape) for shape, _ in geometry.values())
        spatial_dims = max(counts, key=lambda d: (counts[d], d))
        for path in [p for p, (shape, _) in geometry.items() if len(shape) != spatial_dims]:
            skipped[path.name] = f"{len(geometry.pop(path)[0])}D; most images are {spatial_dims}D"
    paths = list(geometry)
    step = max(1, len(paths) // max(1, max_intensity_images))
    samples: list[np.ndarray] = []
    for path in paths[::step] + [p for i, p in enumerate(paths) if i % step]:
        if len(samples) >= max_intensity_images:
            break
        try:
            samples.append(_sample_voxels(nib.load(str(path))))
        except Exception as e:  # a truncated or damaged voxel block
            skipped[path.name] = f"voxels unreadable: {type(e).__name__}: {e}"
            geometry.pop(path)
    for name, reason in skipped.items():
        logger.warning("planning: skipping %s: %s", name, reason)
    if not geometry:
        folders = sorted({str(Path(p).parent) for p in images}) or ["(no files given)"]
        detail = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no NIfTI images"
        raise ValueError(f"cannot plan preprocessing from {', '.join(folders)}: {detail}")
    voxels = np.concatenate([np.zeros(0), *samples])
    voxels = voxels if voxels.size else np.zeros(1)
    stats = dict(
        zip([f"{p:g}" for p in _PERCENTILES], np.percentile(voxels, _PERCENTILES), strict=True)
    )
    stats.update(min=voxels.min(), max=voxels.max())
    return Fingerprint(
        spatial_dims=int(spatial_dims),
        shapes=[shape for shape, _ in geometry.values()],
        spacings=[spacing for _, spacing in geometry.values()],
        percentiles={k: round(float(v), 3) for k, v in stats.items()},
        integer_valued=bool(np.all(voxels == np.round(voxels))),
        intensity_images=len(samples),
        skipped=skipped,
    )


def plan_from_fingerprint(
    fingerprint: Fingerprint,
    strides: Sequence[int | Sequence[int]] = (2, 2, 2),
    max_voxels: int | None = None,
) -> Plan:
    """Derive the preprocessing from a fingerprint.

    - ``target_spacing``: ``None`` when every image has the median spacing (within 1% on each
      axis), else the median per axis; for anisotropic data (nnU-Net's rule: the coarsest
      axis's spacing over 3x the next and 3x fewer voxels) that axis gets the 10th percentile
      instead, but never finer than the other axes.
    - ``intensity``: :data:`CT_WINDOW` when the sample looks like CT: the 0.5th percentile at
      or below -900 (air, or the scanner's padding at -1024 or below) and a maximum of at least
      500 (bone or contrast; soft tissue stays below about 300 HU). MR and other signals have
      no such negative values, and get ``"zscore"``. nnU-Net clips CT to the 0.5-99.5
      percentiles of the labeled foreground; without labels a fixed window from air to dense
      bone keeps every tissue distinct and does not depend on which images were sampled
      (integer values, typical of CT, are not required: resampled CT is often stored as
      floats). An organ-specific window (e.g. ``ct:-160,240``) is an explicit setting.
    - ``roi_size``: the median shape after resampling, each side rounded down to a multiple of
      the network's total stride on that axis (``2**3 = 8`` for strides ``[2, 2, 2]``), at
      least :data:`MIN_SIDE` (smaller images are padded in training); then, while over the
      voxel budget, the side covering the most millimetres shrinks by one multiple (the
      largest side for isotropic data), so patches of anisotropic data span similar lengths
      on every axis, as nnU-Net's patches do.

    Args:
        fingerprint: From :func:`fingerprint_images`.
        strides: The network's downsampling strides (ints or one value per axis).
        max_voxels: Voxel budget of a patch (default :data:`DEFAULT_MAX_VOXELS`).
    """
    dims = fingerprint.spatial_dims
    shapes = np.asarray(fingerprint.shapes, dtype=float)
    spacings = np.asarray(fingerprint.spacings, dtype=float)
    median_spacing, median_shape = np.median(spacings, axis=0), np.median(shapes, axis=0)
    n = fingerprint.num_images
    reasons = [f"from {n} image(s); {len(fingerprint.skipped)} skipped"]
    target: np.ndarray | None = None
    if np.all(np.abs(spacings - median_spacing) <= 0.01 * median_spacing):
        reasons.append(f"target_spacing None: all images share the spacing {_fmt(median_spacing)}")
        resampled = median_shape
    else:
        target = median_spacing.copy()
        worst = int(np.argmax(target))
        others = [i for i in range(dims) if i != worst]
        why = "the median spacing"
        low_resolution = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
        few_voxels = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[others])
        if low_resolution and few_voxels:
            target[worst] = max(np.percentile(spacings[:, worst], 10), max(target[others]))
            why += f", axis {worst} (anisotropic) at its 10th percentile"
        target = np.round(target, 4)
        reasons.append(f"target_spacing {_fmt(target)}: {why} (spacings differ)")
        resampled = np.median(shapes * spacings / target, axis=0)
    grid = target if target is not None else median_spacing
    divisors = [
        math.prod(int(s[i] if isinstance(s, Sequence) else s) for s in strides) for i in range(dims)
    ]
    least = [math.ceil(MIN_SIDE / d) * d for d in divisors]
    roi = [max(m, int(s // d) * d) for s, d, m in zip(resampled, divisors, least, strict=True)]
    budget = max_voxels or DEFAULT_MAX_VOXELS[dims]
    why = f"the median resampled shape {_fmt(resampled)} rounded down to multiples of {divisors}"
    if any(r > s for r, s in zip(roi, resampled, strict=True)):
        why += f", at least {MIN_SIDE} per side (smaller images are padded)"
    if math.prod(roi) > budget:
        why += f", shrunk to at most {budget} voxels (the side spanning most mm first)"
    while math.prod(roi) > budget:
        axes = [i for i in range(dims) if roi[i] - divisors[i] >= least[i]]
        if not axes:
            break
        i = max(axes, key=lambda a: (roi[a] * grid[a], roi[a], -a))
        roi[i] -= divisors[i]
    reasons.append(f"roi_size {roi}: {why}")
    p = fingerprint.percentiles
    is_ct = p["0.5"] <= -900 and p["max"] >= 500
    evidence = f"0.5/50/99.5th percentiles {p['0.5']:g}/{p['50']:g}/{p['99.5']:g}, max {p['max']:g}"
    if is_ct:
        reasons.append(f"intensity {CT_WINDOW}: looks like CT ({evidence}: air and bone)")
    else:
        reasons.append(f"intensity zscore: not CT-like ({evidence}), e.g. MR")
    return Plan(
        roi_size=tuple(roi),
        target_spacing=None if target is None else tuple(float(v) for v in target),
        intensity=CT_WINDOW if is_ct else "zscore",
        modality="ct" if is_ct else "mr",
        num_images=n,
        median_shape=tuple(float(v) for v in median_shape),
        median_spacing=tuple(round(float(v), 4) for v in median_spacing),
        intensity_percentiles=dict(p),
        reasons=reasons,
        skipped=dict(fingerprint.skipped),
    )


def plan_preprocessing(
    images: Sequence[str | Path] | str | Path,
    strides: Sequence[int | Sequence[int]] = (2, 2, 2),
    max_voxels: int | None = None,
    spatial_dims: int | None = None,
    max_intensity_images: int = 10,
) -> Plan:
    """Plan the preprocessing of ``images``: :func:`fingerprint_images`, then
    :func:`plan_from_fingerprint` (whose docstring gives the rules).

    Args:
        images: NIfTI files (unreadable ones are skipped with a warning), or a folder of them.
        strides: The network's downsampling strides (cotrain's UNet default ``[2, 2, 2]``).
        max_voxels: Voxel budget of a patch (default 96^3 in 3D, 256^2 in 2D).
        spatial_dims: The model's spatial dimensions, or ``None`` for the images'.
        max_intensity_images: Images whose voxels are sampled for the intensity statistics.

    Raises:
        ValueError: If no image could be read.
    """
    if isinstance(images, str | Path):
        folder, images = images, list_images(images)
        if not images:
            raise ValueError(f"cannot plan preprocessing from {folder}: no NIfTI images in it")
    fingerprint = fingerprint_images(images, spatial_dims, max_intensity_images)
    plan = plan_from_fingerprint(fingerprint, strides, max_voxels)
    logger.info("planned preprocessing: %s", "; ".join(plan.reasons))
    return plan


def default_plan(reason: str) -> Plan:
    """A plan holding TrainConfig's defaults, for when no image could be read.

    Args:
        reason: Why nothing was planned (the start of the plan's one reason).
    """
    d = TrainConfig()
    values = (
        f"roi_size {list(d.roi_size)}, target_spacing {d.target_spacing}, intensity {d.intensity}"
    )
    return Plan(
        roi_size=d.roi_size,
        target_spacing=d.target_spacing,
        intensity=d.intensity,
        modality="unknown",
        num_images=0,
        median_shape=None,
        median_spacing=None,
        intensity_percentiles={},
        reasons=[f"{reason}; using the defaults {values}"],
    )


def apply_plan(settings: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
    """``settings`` with the planned values for the keys it does not give.

    A key given with any value wins over the plan (``target_spacing: None`` keeps the grid);
    ``roi_size`` or ``intensity`` given as ``None`` count as not given.

    Args:
        settings: TrainConfig values.
        plan: The plan.
    """
    filled = dict(settings)
    for key, value in plan.settings.items():
        if key not in filled or (filled[key] is None and key != "target_spacing"):
            filled[key] = list(value) if isinstance(value, tuple) else value
    return filled


def _fmt(values: Sequence[float] | np.ndarray) -> str:
    return "x".join(f"{float(v):g}" for v in values)
