"""Per-member copies of the unlabeled batch: each member gets its own flip and intensity
perturbation, and the agreement terms compare predictions on the shared grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cotrain.losses import jensen_shannon_agreement
from cotrain.methods import Batch, CoTrainingMethod
from cotrain.perturbation import MemberCopies, UnlabeledPerturbation


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_members_get_different_copies_that_align_back_onto_the_image() -> None:
    images = torch.randn(2, 1, 8, 10, 12, generator=torch.Generator().manual_seed(0))
    copies = UnlabeledPerturbation(3, seed=0)(images, num_members=8)

    assert copies.images.shape == (8, *images.shape)
    assert any(copies.flipped_dims), "no member got a flip"
    # Every copy is perturbed, and no two members see the same input.
    for i in range(8):
        assert not torch.allclose(copies.images[i], images)
        for j in range(i):
            assert not torch.allclose(copies.images[i], copies.images[j])
    # Aligned, each copy is the image up to its intensity perturbation; a flipped copy that is
    # not flipped back is not.
    aligned = copies.align(copies.images)
    for copy, dims in zip(aligned, copies.flipped_dims, strict=True):
        assert correlation(copy, images) > 0.7
        if dims:
            assert correlation(torch.flip(copy, dims), images) < 0.3


def test_cutout_blanks_one_box_of_the_given_size_in_each_copy() -> None:
    images = torch.randn(1, 1, 16, 20, 24) + 5.0  # no voxel is 0 before the cut-out
    copies = UnlabeledPerturbation(3, seed=1, noise_std=0.0, cutout_size=(4, 5, 6))(images, 3)
    boxes = []
    for copy in copies.align(copies.images):
        blank = (copy[0, 0] == 0).nonzero()
        assert len(blank) == 4 * 5 * 6
        extent = (blank.max(0).values - blank.min(0).values + 1).tolist()
        assert extent == [4, 5, 6]
        boxes.append(tuple(blank.min(0).values.tolist()))
    assert len(set(boxes)) > 1, "every member's box is in the same place"


def test_same_seed_same_views() -> None:
    images = torch.randn(1, 1, 8, 8, 8)
    a = UnlabeledPerturbation(3, seed=3)(images, 2)
    b = UnlabeledPerturbation(3, seed=3)(images, 2)
    assert torch.equal(a.images, b.images)
    assert a.flipped_dims == b.flipped_dims


class PointwiseMembers(nn.Module):
    """Two identical 1x1x1-convolution members: they commute with flips."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv3d(1, 3, kernel_size=1)
        self.members = nn.ModuleList([conv, conv])

    def __len__(self) -> int:
        return 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])

    def forward_each(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m, x in zip(self.members, inputs, strict=True)])


def test_agreement_compares_members_on_the_shared_grid() -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 1, 6, 7, 8)
    # Member 1 sees the image flipped along the first spatial axis, and nothing else.
    copies = MemberCopies(torch.stack([image, torch.flip(image, (2,))]), [(), (2,)])
    ensemble = PointwiseMembers()
    batch = Batch(labeled=[], unlabeled=image, unlabeled_copies=copies)

    inputs, logits, aligned = CoTrainingMethod.unlabeled_predictions(ensemble, batch)

    assert torch.equal(inputs, copies.images)
    # Identical members on the same anatomy agree once aligned, not before.
    assert jensen_shannon_agreement(aligned).item() == pytest.approx(0.0, abs=1e-6)
    assert jensen_shannon_agreement(logits).item() > 1e-3
