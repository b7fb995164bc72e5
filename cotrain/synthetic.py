"""Small synthetic 3D volumes with an organ-like structure, for tests and the offline demo.

Each case is a smooth, noisy MR-like volume holding one ellipsoidal "organ" at a random
position, size and orientation. With ``num_classes=3`` the organ is split along its long
axis into an anterior (1) and a posterior (2) part, like the hippocampus data set.
:func:`write_synthetic_ct` writes a CT-like int16 volume (Hounsfield units: air, a body, a
liver, a kidney and a spine) for the speed and scale benchmarks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CT_ORGANS", "make_synthetic_case", "write_synthetic_ct", "write_synthetic_msd"]


def make_synthetic_case(
    shape: Sequence[int] = (32, 32, 32),
    seed: int = 0,
    num_classes: int = 2,
    noise: float = 0.35,
) -> tuple[np.ndarray, np.ndarray]:
    """Make one synthetic image and its label.

    Args:
        shape: Spatial shape of the volume (3 values; a 2D shape gives a 2D case).
        seed: Random seed; the same seed gives the same case.
        num_classes: Number of classes including background (2 or 3).
        noise: Standard deviation of the Gaussian noise relative to the organ contrast.

    Returns:
        ``(image, label)``: a float32 image and an uint8 label of the requested shape.
    """
    if num_classes not in (2, 3):
        raise ValueError(f"num_classes must be 2 or 3, got {num_classes}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    center = [rng.uniform(0.35, 0.65) * s for s in shape]
    radii = [rng.uniform(0.18, 0.28) * s for s in shape]
    # A random rotation in the plane of the first two axes makes the organ's pose vary.
    angle = rng.uniform(0, np.pi)
    d = [g - c for g, c in zip(grids, center, strict=True)]
    d0 = np.cos(angle) * d[0] - np.sin(angle) * d[1]
    d1 = np.sin(angle) * d[0] + np.cos(angle) * d[1]
    rotated = [d0, d1, *d[2:]]
    distance = sum((r_ / rad) ** 2 for r_, rad in zip(rotated, radii, strict=True))
    organ = distance <= 1.0

    label = organ.astype(np.uint8)
    if num_classes == 3:
        label[organ & (rotated[0] > 0)] = 2

    background = rng.uniform(0.2, 0.4)
    image = np.full(shape, background, dtype=np.float32)
    image[label == 1] = 1.0
    image[label == 2] = 0.8
    # Smooth bias field and noise, like an MR scan with intensity inhomogeneity.
    bias = 1.0 + 0.15 * np.sin(grids[0] / shape[0] * np.pi * rng.uniform(0.5, 1.5))
    image = image * bias + rng.normal(0.0, noise * (1.0 - background), size=shape)
    scale = rng.uniform(50.0, 500.0)  # raw scanner-like intensity range
    return (image * scale).astype(np.float32), label


def write_synthetic_msd(
    root: str | Path,
    num_cases: int,
    shape: Sequence[int] = (32, 32, 32),
    num_classes: int = 2,
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[str]:
    """Write synthetic cases in Medical Segmentation Decathlon layout.

    Writes ``root/imagesTr/case_NNN.nii.gz`` and ``root/labelsTr/case_NNN.nii.gz``.

    Args:
        root: Folder to write into (created if missing).
        num_cases: Number of cases.
        shape: Spatial shape of each volume.
        num_classes: Number of classes including background.
        seed: Seed of the first case; case ``i`` uses ``seed + i``.
        spacing: Voxel size in mm, written into the NIfTI affine.

    Returns:
        The case names, sorted.
    """
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    # NIfTI affines are 4x4 also for 2D images (unit spacing on the missing axis).
    affine = np.diag([*[float(s) for s in spacing], *[1.0] * (3 - len(spacing)), 1.0])
    names = []
    for i in range(num_cases):
        name = f"case_{i:03d}"
        image, label = make_synthetic_case(shape, seed=seed + i, num_classes=num_classes)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
        names.append(name)
    logger.info("wrote %d synthetic cases to %s", num_cases, root)
    return names


#: CT "organs": label value -> (name, HU, centre and radii as fractions of the field of view).
CT_ORGANS: dict[int, tuple[str, int, tuple[float, ...], tuple[float, ...]]] = {
    1: ("liver", 60, (0.36, 0.45, 0.5), (0.16, 0.13, 0.3)),
    2: ("kidney", 30, (0.64, 0.6, 0.5), (0.05, 0.06, 0.15)),
    3: ("spine", 700, (0.5, 0.72, 0.5), (0.04, 0.05, 0.6)),
}


def write_synthetic_ct(
    image_path: str | Path,
    label_path: str | Path,
    shape: Sequence[int],
    spacing: Sequence[float],
    seed: int = 0,
    jitter: float = 0.0,
) -> dict[str, int]:
    """Write a CT-like int16 volume (air, a body, the :data:`CT_ORGANS`, noise) and its label.

    Args:
        image_path: Where the image goes (NIfTI).
        label_path: Where its label goes (values as in :data:`CT_ORGANS`).
        shape: Spatial shape (3 values).
        spacing: Voxel size in mm.
        seed: Seed of the noise and the jitter.
        jitter: Each organ's centre moves by up to this fraction of the field of view and
            its radii scale by up to this fraction, so that a folder of studies differs (0:
            the same anatomy in every study).

    Returns:
        Voxels of each organ, by name.
    """
    rng = np.random.default_rng(seed)
    # Coordinates as fractions of the field of view, so that smaller volumes hold the same organs.
    x, y, z = np.ix_(*[(np.arange(n, dtype=np.float32) + 0.5) / n for n in shape])

    def ellipsoid(centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
        return (
            ((x - centre[0]) / radii[0]) ** 2
            + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2
        ) <= 1.0

    # An elliptic cylinder along z (the "& z" only broadcasts it to the volume's shape).
    body = (((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.32) ** 2 <= 1.0) & (z >= 0)
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body] = 40.0
    label = np.zeros(shape, dtype=np.uint8)
    counts = {}
    for value, (name, hu, centre, radii) in CT_ORGANS.items():
        if jitter:
            centre = tuple(c + rng.uniform(-jitter, jitter) for c in centre)
            radii = tuple(r * (1.0 + rng.uniform(-jitter, jitter)) for r in radii)
        organ = ellipsoid(centre, radii) & body
        image[organ] = hu
        label[organ] = value
        counts[name] = int(organ.sum())
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * 15.0 * body
    affine = np.diag([*map(float, spacing), 1.0])
    nib.save(nib.Nifti1Image(np.clip(image, -1024, 3071).astype(np.int16), affine), str(image_path))
    nib.save(nib.Nifti1Image(label, affine), str(label_path))
    return counts
