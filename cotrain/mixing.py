"""Copy-paste mixing of labeled and unlabeled patches (bidirectional copy-paste, BCP: Bai et
al., CVPR 2023), the ingredient of the strongest semi-supervised 3D methods on the left atrium.

A random box ``M`` covering a fraction of each side of the patch is cut from one image and
pasted into the other, in both directions, with the targets mixed the same way:

``x_in = M x_l + (1 - M) x_u``,  ``y_in = M y_l + (1 - M) y_u``;
``x_out = M x_u + (1 - M) x_l``, ``y_out = M y_u + (1 - M) y_l``,

where ``y_l`` is the ground truth of the labeled patch and ``y_u`` a pseudo-label of the
unlabeled one. Every mixed image holds both ground truth and pseudo-labeled voxels, so what
a network learns from labels and from unlabeled data is learned on the same images: the
labeled set is no longer memorised apart from the unlabeled distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["copy_paste", "random_box_mask"]


def random_box_mask(
    spatial_shape: Sequence[int],
    fraction: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A box of ``round(fraction * side)`` voxels along each axis at a random position.

    Args:
        spatial_shape: The patch's spatial shape.
        fraction: Side of the box as a fraction of the patch's side, in (0, 1).
        device: Device of the mask.
        generator: Random generator of the position (torch's global one by default).

    Returns:
        ``(1, 1, *spatial_shape)`` bool, True inside the box.

    Raises:
        ValueError: If ``fraction`` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the box fraction must be in (0, 1), got {fraction}")
    mask = torch.zeros((1, 1, *spatial_shape), dtype=torch.bool, device=device)
    box = [slice(None), slice(None)]
    for side in spatial_shape:
        length = max(1, round(fraction * side))
        start = int(torch.randint(0, side - length + 1, (1,), generator=generator))
        box.append(slice(start, start + length))
    mask[tuple(box)] = True
    return mask


def copy_paste(
    labeled_images: torch.Tensor,
    labeled_targets: torch.Tensor,
    unlabeled_images: torch.Tensor,
    pseudo_labels: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of the copy-paste: labeled box into unlabeled, and back.

    Args:
        labeled_images: ``(n, C_in, *spatial)``.
        labeled_targets: ``(n, 1, *spatial)`` class indices.
        unlabeled_images: ``(n, C_in, *spatial)``, paired with the labeled ones by index.
        pseudo_labels: ``(n, 1, *spatial)`` class indices of the unlabeled images.
        mask: ``(1, 1, *spatial)`` bool (:func:`random_box_mask`).

    Returns:
        ``(images, targets)``, ``(2n, ...)`` each: the ``n`` inward mixes (labeled box in
        the unlabeled image) then the ``n`` outward ones.
    """
    if labeled_images.shape != unlabeled_images.shape:
        raise ValueError(
            f"labeled images {tuple(labeled_images.shape)} and unlabeled images "
            f"{tuple(unlabeled_images.shape)} must have one shape"
        )
    pseudo_labels = pseudo_labels.to(labeled_targets.dtype)
    inward = torch.where(mask, labeled_images, unlabeled_images)
    outward = torch.where(mask, unlabeled_images, labeled_images)
    inward_targets = torch.where(mask, labeled_targets, pseudo_labels)
    outward_targets = torch.where(mask, pseudo_labels, labeled_targets)
    return torch.cat([inward, outward]), torch.cat([inward_targets, outward_targets])
