"""Evaluation metrics in the image's own grid: Dice and HD95 per class (MONAI metrics)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

logger = logging.getLogger(__name__)

__all__ = ["dice_and_hd95", "load_reference", "mean_over_cases"]


def dice_and_hd95(
    prediction: np.ndarray,
    reference: np.ndarray,
    labels: dict[str, int],
    spacing: tuple[float, ...] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Dice and 95th-percentile Hausdorff distance of each foreground class.

    Args:
        prediction: Label map (values are label values).
        reference: Ground-truth label map of the same shape.
        labels: Class names to values.
        spacing: Voxel size, so HD95 is in mm (voxels when ``None``).

    Returns:
        ``{"dice": {name: value}, "hd95": {name: value or None}}``; HD95 is ``None`` when the
        class is missing from the prediction or the reference (it is undefined then).
    """
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from reference {reference.shape}"
        )
    num_classes = 1 + max(labels.values())
    pred = one_hot(torch.as_tensor(prediction.astype(np.int64))[None, None], num_classes)
    ref = one_hot(torch.as_tensor(reference.astype(np.int64))[None, None], num_classes)
    dice = compute_dice(pred, ref, include_background=False, ignore_empty=False)[0]
    hd95 = compute_hausdorff_distance(
        pred, ref, include_background=False, percentile=95, spacing=spacing
    )[0]
    result: dict[str, dict[str, float | None]] = {"dice": {}, "hd95": {}}
    for name, value in labels.items():
        result["dice"][name] = float(dice[value - 1])
        distance = float(hd95[value - 1])
        result["hd95"][name] = distance if math.isfinite(distance) else None
    return result


def load_reference(path: str | Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """A ground-truth label file as ``(label values, voxel spacing in mm, affine)``."""
    image = nib.load(str(path))
    reference = np.asarray(image.dataobj).astype(np.int64)
    spacing = tuple(float(s) for s in image.header.get_zooms()[: reference.ndim])
    return reference, spacing, image.affine


def mean_over_cases(
    results: list[dict[str, dict[str, float | None]]], labels: dict[str, int]
) -> dict[str, Any]:
    """Average :func:`dice_and_hd95` results over cases, per class, skipping undefined values.

    Returns:
        ``{"dice": {name: mean}, "hd95": {name: mean or None}, "mean_dice", "mean_hd95"}``, the
        last two averaged over the classes that have a value (``None`` when none has).
    """
    summary: dict[str, Any] = {"dice": {}, "hd95": {}}
    for metric in ("dice", "hd95"):
        for name in labels:
            values = [r[metric][name] for r in results if r[metric][name] is not None]
            summary[metric][name] = float(np.mean(values)) if values else None
        defined = [v for v in summary[metric].values() if v is not None]
        summary[f"mean_{metric}"] = float(np.mean(defined)) if defined else None
    return summary
