"""Studies folders for the MONAI Label app: an offline demo and an import from MSD layout.

A MONAI Label *studies* folder (its ``LocalDatastore``) keeps the images at its top level
and the submitted ("final") labels, under the image's file name, in ``labels/final/``::

    studies/
        case_000.nii.gz
        case_001.nii.gz
        labels/final/case_000.nii.gz

Images without a file in ``labels/final/`` are the unlabeled pool. MONAI Label writes its
own bookkeeping (``datastore_v2.json``) on first start, so none is written here.

This module does not import MONAI Label; it only writes files in that layout.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from cotrain.files import nifti_name
from cotrain.synthetic import make_synthetic_case

logger = logging.getLogger(__name__)

__all__ = ["FINAL_LABELS_DIR", "StudiesFolder", "import_msd_studies", "write_demo_studies"]

#: Where MONAI Label's local datastore keeps submitted labels, relative to the studies folder.
FINAL_LABELS_DIR = Path("labels") / "final"


@dataclass(frozen=True)
class StudiesFolder:
    """What a studies folder holds after it was written.

    Attributes:
        folder: The studies folder (pass it to ``monailabel start_server --studies``).
        labeled: Image ids (file names without extension) with a final label, sorted.
        unlabeled: Image ids without a label, sorted.
    """

    folder: Path
    labeled: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)

    @property
    def images(self) -> list[str]:
        """All image ids, sorted."""
        return sorted(self.labeled + self.unlabeled)


def _prepare_folder(folder: str | Path, overwrite: bool) -> Path:
    """Create ``folder`` and its final-label folder; refuse to mix with existing images.

    Args:
        folder: The studies folder.
        overwrite: Allow a folder that already holds NIfTI images (files of the same name
            are replaced, others are left as they are).

    Returns:
        The folder as a ``Path``.

    Raises:
        FileExistsError: If the folder already holds NIfTI images and ``overwrite`` is off.
    """
    folder = Path(folder)
    if folder.is_dir() and not overwrite:
        existing = [p.name for p in folder.iterdir() if nifti_name(p) is not None]
        if existing:
            raise FileExistsError(
                f"{folder} already holds {len(existing)} images (e.g. {existing[0]}); "
                "choose an empty folder or pass overwrite=True"
            )
    (folder / FINAL_LABELS_DIR).mkdir(parents=True, exist_ok=True)
    return folder


def write_demo_studies(
    folder: str | Path,
    num_images: int = 12,
    num_labeled: int = 2,
    shape: Sequence[int] = (32, 32, 32),
    seed: int = 0,
    num_classes: int = 2,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    truth_dir: str | Path | None = None,
    overwrite: bool = False,
) -> StudiesFolder:
    """Write a small synthetic studies folder for an offline MONAI Label demo.

    Image ``i`` is ``case_{i:03d}`` made by :func:`cotrain.synthetic.make_synthetic_case`
    with seed ``seed + i``; the first ``num_labeled`` images get their label in
    ``labels/final/`` (as if already submitted), the others are unlabeled.

    Args:
        folder: Studies folder to write (created if missing).
        num_images: Number of images.
        num_labeled: How many of them (the first ones) already have a final label.
        shape: Spatial shape of each volume.
        seed: Seed of the first case; case ``i`` uses ``seed + i``.
        num_classes: Classes including background (2: one organ; 3: organ in two parts).
        spacing: Voxel size in mm, written into the NIfTI affine.
        truth_dir: If given, the labels of *all* images are also written there (outside
            the studies folder is best), to measure predictions against them.
        overwrite: Allow writing into a folder that already holds images.

    Returns:
        The folder and its labeled and unlabeled image ids.

    Raises:
        ValueError: If the counts are inconsistent.
        FileExistsError: If the folder already holds images and ``overwrite`` is off.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0 <= num_labeled <= num_images:
        raise ValueError(f"num_labeled must be in [0, {num_images}], got {num_labeled}")
    if len(spacing) != len(shape):
        raise ValueError(f"spacing {tuple(spacing)} must have {len(shape)} values like shape")
    folder = _prepare_folder(folder, overwrite)
    truth = Path(truth_dir) if truth_dir is not None else None
    if truth is not None:
        truth.mkdir(parents=True, exist_ok=True)

    # A spacing and origin that are not the identity, so that a prediction returned on the
    # wrong grid shows up as a wrong affine.
    affine = np.eye(4)
    affine[: len(spacing), : len(spacing)] = np.diag([float(s) for s in spacing])
    affine[: len(spacing), 3] = [-0.5 * float(s) * n for s, n in zip(spacing, shape, strict=True)]

    labeled: list[str] = []
    unlabeled: list[str] = []
    for i in range(num_images):
        name = f"case_{i:03d}"
        image, label = make_synthetic_case(shape, seed=seed + i, num_classes=num_classes)
        nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
        label_image = nib.Nifti1Image(label.astype(np.uint8), affine)
        if i < num_labeled:
            nib.save(label_image, folder / FINAL_LABELS_DIR / f"{name}.nii.gz")
            labeled.append(name)
        else:
            unlabeled.append(name)
        if truth is not None:
            nib.save(label_image, truth / f"{name}.nii.gz")
    logger.info("wrote demo studies to %s: %d images, %d labeled", folder, num_images, len(labeled))
    return StudiesFolder(folder=folder, labeled=labeled, unlabeled=unlabeled)


def import_msd_studies(
    msd_dir: str | Path,
    folder: str | Path,
    num_labeled: int,
    overwrite: bool = False,
) -> StudiesFolder:
    """Turn a Medical Segmentation Decathlon folder into a MONAI Label studies folder.

    Every ``imagesTr/NAME.nii.gz`` is copied to ``folder/NAME.nii.gz``. The labels of the
    first ``num_labeled`` images (sorted by name) are copied to ``folder/labels/final/``, as
    if they had been submitted; the labels of the other images are not copied, so those
    images form the unlabeled pool.

    Args:
        msd_dir: Folder with ``imagesTr/`` and ``labelsTr/`` (e.g. ``data/hippocampus``).
        folder: Studies folder to write (created if missing).
        num_labeled: How many images start with a final label.
        overwrite: Allow writing into a folder that already holds images.

    Returns:
        The folder and its labeled and unlabeled image ids.

    Raises:
        FileNotFoundError: If ``msd_dir`` has no images, or a needed label is missing.
        ValueError: If ``num_labeled`` is negative or larger than the number of images.
        FileExistsError: If the folder already holds images and ``overwrite`` is off.
    """
    msd_dir = Path(msd_dir)
    images_dir = msd_dir / "imagesTr"
    labels_dir = msd_dir / "labelsTr"
    images: dict[str, Path] = {}
    if images_dir.is_dir():
        for path in images_dir.iterdir():
            image_id = nifti_name(path)
            if image_id is not None:
                images[image_id] = path
    if not images:
        raise FileNotFoundError(f"no NIfTI images in {images_dir}")
    if not 0 <= num_labeled <= len(images):
        raise ValueError(f"num_labeled must be in [0, {len(images)}], got {num_labeled}")

    names = sorted(images)
    label_paths: dict[str, Path] = {}
    for name in names[:num_labeled]:
        label = labels_dir / images[name].name
        if not label.is_file():
            raise FileNotFoundError(f"no label for image {name}: {label} is missing")
        label_paths[name] = label

    folder = _prepare_folder(folder, overwrite)
    for name in names:
        shutil.copyfile(images[name], folder / images[name].name)
        if name in label_paths:
            shutil.copyfile(label_paths[name], folder / FINAL_LABELS_DIR / images[name].name)
    logger.info(
        "imported %d images from %s into %s, %d with a final label",
        len(names),
        msd_dir,
        folder,
        num_labeled,
    )
    return StudiesFolder(folder=folder, labeled=names[:num_labeled], unlabeled=names[num_labeled:])
