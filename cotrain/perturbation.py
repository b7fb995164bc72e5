"""Per-member copies of the unlabeled batch: each member sees its own perturbed copy.

When every member sees the same unlabeled image, the agreement terms only pull members that
already agree closer together (their Jensen-Shannon divergence is ~0.003 nats per voxel on
hippocampus, ../shared/papers/NOTES.md). Giving each member its own random flip and intensity
perturbation turns agreement into consistency across perturbations, the signal semi-supervised
segmentation methods draw from unlabeled data (transformation-consistent self-ensembling,
Li et al. 2020; CPS, Chen et al. 2021). Flips are exactly invertible, so each member's
prediction is flipped back onto the shared grid before the members are compared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt
from monai.utils import convert_to_tensor

logger = logging.getLogger(__name__)

__all__ = ["MemberCopies", "UnlabeledPerturbation"]


@dataclass
class MemberCopies:
    """Each member's perturbed copy of an unlabeled batch.

    Attributes:
        images: ``(k, B, C_in, *spatial)``: member i's input is ``images[i]``.
        flipped_dims: For each member, the tensor dimensions of ``(B, C, *spatial)`` its copy
            is flipped along.
    """

    images: torch.Tensor
    flipped_dims: list[tuple[int, ...]]

    def align(self, member_outputs: torch.Tensor) -> torch.Tensor:
        """Map each member's output on its own copy back onto the shared (unflipped) grid.

        Args:
            member_outputs: ``(k, B, C, *spatial)``, member i's output on ``images[i]``.
        """
        return torch.stack(
            [
                torch.flip(output, dims) if dims else output
                for output, dims in zip(member_outputs, self.flipped_dims, strict=True)
            ]
        )


class UnlabeledPerturbation:
    """Makes :class:`MemberCopies`: a random flip per member and spatial axis (probability 0.5)
    and a random intensity perturbation per member and image (MONAI transforms).

    The intensity perturbation acts on normalised images (z-scores or [0, 1] CT windows): a
    gamma change of contrast, a scale and a shift of the intensities, and Gaussian noise.

    Args:
        spatial_dims: 2 or 3.
        seed: Seed of the flips and of the per-image transforms.
        noise_std: Standard deviation of the Gaussian noise.
        gamma: Range of the contrast gamma.
        scale: Intensities are multiplied by ``1 + u``, ``u`` uniform in ``[-scale, scale]``.
        shift: A uniform offset in ``[-shift, shift]`` is added.
        cutout_size: If given, a box of this size (voxels), at a random place in each copy, is
            set to 0 (the mean of z-scored images): the member must segment it from context,
            and learns that from the members that saw it (MONAI ``RandCoarseDropout``).
    """

    def __init__(
        self,
        spatial_dims: int,
        seed: int = 0,
        noise_std: float = 0.1,
        gamma: tuple[float, float] = (0.7, 1.5),
        scale: float = 0.1,
        shift: float = 0.1,
        cutout_size: tuple[int, ...] | None = None,
    ) -> None:
        self.spatial_dims = spatial_dims
        self.random = np.random.RandomState(seed)
        steps: list = [
            mt.RandAdjustContrast(prob=1.0, gamma=gamma),
            mt.RandScaleIntensity(factors=scale, prob=1.0),
            mt.RandShiftIntensity(offsets=shift, prob=1.0),
            mt.RandGaussianNoise(prob=1.0, std=noise_std),
        ]
        if cutout_size is not None:
            steps.append(
                mt.RandCoarseDropout(holes=1, spatial_size=cutout_size, fill_value=0.0, prob=1.0)
            )
        #: Per image: the intensity perturbation, then the optional cut-out.
        self.transforms = mt.Compose(steps)
        self.transforms.set_random_state(seed + 1)

    def __call__(self, images: torch.Tensor, num_members: int) -> MemberCopies:
        """Perturbed copies of ``images`` (``(B, C_in, *spatial)``), one per member."""
        copies, flipped_dims = [], []
        for _ in range(num_members):
            perturbed = torch.stack(
                [
                    convert_to_tensor(self.transforms(image), track_meta=False).to(images)
                    for image in images
                ]
            )
            dims = tuple(
                2 + axis for axis in range(self.spatial_dims) if self.random.random_sample() < 0.5
            )
            copies.append(torch.flip(perturbed, dims) if dims else perturbed)
            flipped_dims.append(dims)
        return MemberCopies(torch.stack(copies), flipped_dims)
