"""Small synthetic 3D volumes with an organ-like structure, for tests and the offline demo.

Each case is a smooth, noisy MR-like volume holding one ellipsoidal "organ" at a random
position, size and orientation. With ``num_classes=3`` the organ is split along its long
axis into an anterior (1) and a posterior (2) part, like the hippocampus data set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["make_synthetic_case", "write_synthetic_msd"]


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
