"""Data: listing cases, MONAI transforms for labeled, unlabeled and whole-volume inputs, loaders.

Labeled patches are foreground-biased crops (``RandCropByLabelClassesd``: half the patches are
centred on a foreground voxel, the foreground classes in equal shares), because background
dominates medical volumes; the candidate centres of each class are found once per volume. Unlabeled patches
are uniform random crops. Everything deterministic (loading, orientation, spacing, intensity)
is cached in memory by ``CacheDataset``, once per run even when several members draw from it.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader
from monai.transforms import RandomizableTrait
from torch.utils.data import Dataset

from cotrain.config import TrainConfig, parse_intensity
from cotrain.files import NIFTI_SUFFIXES, nifti_name

logger = logging.getLogger(__name__)

__all__ = [
    "RandomPatches",
    "cache_budget_bytes",
    "cache_volumes",
    "cached_bytes",
    "infinite_batches",
    "list_msd_cases",
    "make_loader",
    "preprocessing",
    "preprocessing_definition",
    "read_case_list",
    "split_deterministic",
    "strong_augmentation",
    "training_transforms",
]


def list_msd_cases(root: str | Path) -> list[dict[str, str]]:
    """Cases of a Medical Segmentation Decathlon folder, sorted by name.

    Args:
        root: Folder with ``imagesTr/NAME.nii.gz`` and, where labeled, ``labelsTr/NAME.nii.gz``.

    Returns:
        One dict per image: ``{"name", "image"}`` plus ``"label"`` where a label file exists.
    """
    root = Path(root)
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{root} is not an MSD folder: {images_dir} does not exist")
    cases = []
    for image in sorted(images_dir.iterdir()):
        name = nifti_name(image)
        if name is None:
            continue
        case = {"name": name, "image": str(image)}
        for suffix in NIFTI_SUFFIXES:
            label = root / "labelsTr" / f"{name}{suffix}"
            if label.exists():
                case["label"] = str(label)
                break
        cases.append(case)
    if not cases:
        raise FileNotFoundError(f"no .nii or .nii.gz images in {images_dir}")
    return cases


def read_case_list(path: str | Path) -> list[str]:
    """Case names from a text file, one per line (blank lines and ``#`` comments ignored)."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def preprocessing_definition(
    config: TrainConfig, keys: Sequence[str] = ("image", "label")
) -> list[dict[str, Any]]:
    """The deterministic preprocessing as MONAI config items: load, channel first, RAS,
    optional resampling, intensity normalisation.

    This is its one definition: :func:`preprocessing` builds the transforms from it, and an
    exported MONAI bundle writes it out (for the image alone), so both preprocess alike.

    Args:
        config: Provides ``target_spacing`` and ``intensity``.
        keys: ``"image"`` and optionally ``"label"``.

    Returns:
        ``{"_target_": "NAME", **arguments}`` per MONAI dictionary transform, plain JSON data.
    """
    keys = list(keys)
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {
            "_target_": "Orientationd",
            "keys": keys,
            "axcodes": "RAS"[: config.spatial_dims],
            "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
        },
    ]
    if config.target_spacing is not None:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        steps.append(
            {
                "_target_": "Spacingd",
                "keys": keys,
                "pixdim": list(config.target_spacing),
                "mode": modes,
            }
        )
    kind, window = parse_intensity(config.intensity)
    if kind == "zscore":
        steps.append(
            {
                "_target_": "NormalizeIntensityd",
                "keys": "image",
                "nonzero": True,
                "channel_wise": True,
            }
        )
    else:
        low, high = window
        steps.append(
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": low,
                "a_max": high,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        )
    steps.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    if "label" in keys:
        steps.append({"_target_": "EnsureTyped", "keys": "label", "dtype": "$torch.long"})
    return steps


def preprocessing(config: TrainConfig, keys: Sequence[str] = ("image", "label")) -> mt.Compose:
    """The transforms of :func:`preprocessing_definition`, built by MONAI's config parser.

    They are invertible (MONAI ``Invertd``), which is how predictions return to the image's grid.

    Args:
        config: Provides ``target_spacing`` and ``intensity``.
        keys: ``"image"`` and optionally ``"label"``.
    """
    definition = {"_target_": "Compose", "transforms": preprocessing_definition(config, keys)}
    return ConfigParser({"preprocessing": definition}).get_parsed_content("preprocessing")


#: Voxels kept per class as crop centres (evenly spaced over the class's voxels, as nnU-Net
#: keeps class locations), so a CT's centres take kilobytes, not a copy of the volume.
CROP_CENTRES_PER_CLASS = 10_000
#: Key suffix of the cached crop centres (MONAI ``ClassesToIndicesd``'s default).
CLASS_INDICES = "_cls_indices"


def training_transforms(config: TrainConfig, labeled: bool) -> mt.Compose:
    """Preprocessing plus padding to the patch size, a random patch and its augmentation.

    Args:
        config: Provides the patch size (``roi_size``) and ``augmentation``.
        labeled: Foreground-biased crops with the label (True) or uniform crops of the image.
    """
    keys = ["image", "label"] if labeled else ["image"]
    roi = config.roi_size
    steps: list = [*preprocessing(config, keys).transforms, mt.SpatialPadd(keys, spatial_size=roi)]
    if labeled:  # cached as one byte per voxel, not eight; a class index again after cropping
        steps.append(mt.CastToTyped("label", dtype=torch.uint8))
        classes = config.num_classes
        steps += [
            # Where each class is, found once per volume (and cached), not at every crop.
            mt.ClassesToIndicesd(
                "label", num_classes=classes, max_samples_per_class=CROP_CENTRES_PER_CLASS
            ),
            mt.RandCropByLabelClassesd(
                keys,
                label_key="label",
                spatial_size=roi,
                ratios=[1.0] + [1.0 / (classes - 1)] * (classes - 1),
                num_classes=classes,
                num_samples=1,
                indices_key=f"label{CLASS_INDICES}",
                warn=False,  # a class absent from a case is simply not a centre there
            ),
            mt.DeleteItemsd(f"label{CLASS_INDICES}"),
        ]
    else:
        steps.append(mt.RandSpatialCropd(keys, roi_size=roi, random_size=False))
    if config.augmentation == "strong":
        steps += strong_augmentation(keys, config.spatial_dims)
    steps += [
        mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(config.spatial_dims)
    ]
    if labeled:
        steps.append(mt.EnsureTyped("label", dtype=torch.long))
    return mt.Compose(steps)


def strong_augmentation(keys: Sequence[str], spatial_dims: int) -> list[mt.Transform]:
    """nnU-Net's augmentation of a patch, with MONAI's transforms and nnU-Net's probabilities.

    Rotation (up to 30 degrees about each axis) and scaling (0.7-1.4) with probability 0.2,
    Gaussian noise (0.1), Gaussian blur (0.2), brightness (0.15), contrast (0.15) and gamma
    (0.7-1.5, 0.3). Labels follow the spatial transform with nearest-neighbour sampling.

    Args:
        keys: ``"image"`` and optionally ``"label"``.
        spatial_dims: 2 or 3.
    """
    angle = np.deg2rad(30.0)
    return [
        mt.RandAffined(
            keys,
            prob=0.2,
            rotate_range=[angle] * (1 if spatial_dims == 2 else 3),
            scale_range=[0.3] * spatial_dims,
            mode=["bilinear" if k == "image" else "nearest" for k in keys],
            padding_mode="zeros",
        ),
        mt.RandGaussianNoised("image", prob=0.1, std=0.1),
        mt.RandGaussianSmoothd(
            "image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)
        ),
        mt.RandScaleIntensityd("image", factors=0.25, prob=0.15),
        mt.RandScaleIntensityFixedMeand("image", factors=0.25, prob=0.15, preserve_range=True),
        mt.RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
    ]


def split_deterministic(transform: mt.Compose) -> tuple[mt.Compose, mt.Compose]:
    """``transform`` as its deterministic prefix (what a cache holds) and its random rest."""
    first_random = transform.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, mt.Transform)
    )
    if first_random is None:
        first_random = len(transform.transforms)
    return (
        mt.Compose(transform.transforms[:first_random]),
        mt.Compose(transform.transforms[first_random:]),
    )


def cache_volumes(
    cases: Sequence[dict[str, str]], transform: mt.Compose, config: TrainConfig
) -> tuple[CacheDataset, mt.Compose]:
    """Cache the deterministic part of ``transform`` once, for every loader that draws from it.

    Args:
        cases: ``{"image", "label"?}`` dicts.
        transform: Transforms such as :func:`training_transforms`: a deterministic prefix
            (loading, preprocessing, padding), then random ones.
        config: Provides ``cache_rate``.

    Returns:
        The volumes after the deterministic prefix (``cache_rate`` of them held in memory),
        and the random rest of ``transform``.
    """
    deterministic, random_part = split_deterministic(transform)
    items = [{k: v for k, v in c.items() if k in ("image", "label")} for c in cases]
    volumes = CacheDataset(
        items, deterministic, cache_rate=config.cache_rate, num_workers=None, progress=False
    )
    return volumes, random_part


def cached_bytes(volume: Any) -> int:
    """Bytes held by the tensors and arrays of one cached item (a dict of them)."""
    values = volume.values() if isinstance(volume, dict) else [volume]
    total = 0
    for value in values:
        if isinstance(value, torch.Tensor):
            total += value.element_size() * value.nelement()
        elif isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, list | tuple):
            total += sum(cached_bytes(v) for v in value)
    return total


def cache_budget_bytes(config: TrainConfig) -> int:
    """The memory the cached volumes may take: ``config.cache_gb``, else a quarter of the
    machine's physical memory."""
    if config.cache_gb is not None:
        return int(config.cache_gb * 2**30)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        physical = 16 * 2**30
    return physical // 4


class RandomPatches(Dataset):
    """Random patches of some of the cached volumes, with this dataset's own random transforms.

    Several of them share one :func:`cache_volumes` cache (each ensemble member draws from its
    own subset of the labeled volumes, which are held in memory once).

    Args:
        volumes: The cached volumes.
        indices: Which of them this dataset draws from.
        transform: The random transforms (a copy is taken, seeded by the loader).
    """

    def __init__(
        self, volumes: CacheDataset, indices: Sequence[int], transform: mt.Compose
    ) -> None:
        self.volumes = volumes
        self.indices = list(indices)
        self.transform = copy.deepcopy(transform)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        # The cached volume is shared: the transforms get their own copy (as CacheDataset does).
        return self.transform(copy.deepcopy(self.volumes[self.indices[index]]))


def make_loader(
    patches: RandomPatches, batch_size: int, config: TrainConfig, seed: int
) -> DataLoader:
    """An endless loader of random patches (sampling with replacement).

    Args:
        patches: Where the patches come from.
        batch_size: Patches per batch.
        config: Provides ``num_workers``.
        seed: Seed of the sampler and of the random transforms.
    """
    sampler = torch.utils.data.RandomSampler(
        patches,
        replacement=True,
        num_samples=2**31 - 1,
        generator=torch.Generator().manual_seed(seed),
    )
    return DataLoader(
        patches,
        batch_size=batch_size,
        sampler=sampler,
        # MONAI's loader seeds the dataset's random transforms from this generator (from
        # torch's global one without it, the same seed for every loader).
        generator=torch.Generator().manual_seed(seed),
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
    )


def infinite_batches(loader: DataLoader) -> Iterator[dict]:
    """Iterate a loader forever."""
    while True:
        yield from loader
