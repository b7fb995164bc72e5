"""Copy-paste mixing (the ``lambda_mix`` option of DCT-Seg and Duo-SegNet): the mixed images
and targets, the pseudo-labels coming from the other members, and the option staying off
in the papers' settings."""

from __future__ import annotations

import pytest
import torch

from cotrain.methods import Batch, build_method
from cotrain.mixing import copy_paste, random_box_mask
from cotrain.networks import Ensemble
from tests.test_losses import TINY, make_batch


def test_box_mask_covers_the_fraction_of_each_side_inside_the_patch() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = random_box_mask((12, 9, 6), 2 / 3, generator=g)
        assert mask.shape == (1, 1, 12, 9, 6)
        assert int(mask.sum()) == 8 * 6 * 4
        extent = [int(mask.any(dim=d).sum()) for d in ((1, 3, 4), (1, 2, 4), (1, 2, 3))]
        assert extent == [8, 6, 4]
    with pytest.raises(ValueError, match="fraction must be in"):
        random_box_mask((8, 8, 8), 1.0)


def test_copy_paste_puts_truth_in_the_box_and_pseudo_labels_outside_and_back() -> None:
    labeled = torch.full((2, 1, 6, 6, 6), 1.0)
    unlabeled = torch.full((2, 1, 6, 6, 6), -1.0)
    truth = torch.full((2, 1, 6, 6, 6), 2)
    pseudo = torch.zeros((2, 1, 6, 6, 6), dtype=torch.long)
    mask = random_box_mask((6, 6, 6), 0.5, generator=torch.Generator().manual_seed(1))
    images, targets = copy_paste(labeled, truth, unlabeled, pseudo, mask)
    assert images.shape == (4, 1, 6, 6, 6) and targets.shape == (4, 1, 6, 6, 6)
    box = mask.expand(2, 1, 6, 6, 6)
    inward, outward = images[:2], images[2:]
    assert (inward[box] == 1).all() and (inward[~box] == -1).all()
    assert (outward[box] == -1).all() and (outward[~box] == 1).all()
    assert (targets[:2][box] == 2).all() and (targets[:2][~box] == 0).all()
    assert (targets[2:][box] == 0).all() and (targets[2:][~box] == 2).all()
    with pytest.raises(ValueError, match="must have one shape"):
        copy_paste(labeled, truth, unlabeled[:, :, :4], pseudo, mask)


def test_mixed_targets_outside_the_box_are_the_other_members_vote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Member 0's unlabeled voxels are labelled by member 1's argmax, and the reverse."""
    import cotrain.methods.base as base

    torch.manual_seed(0)
    ensemble = Ensemble(2, 3, 1, 2, network=TINY)
    batch = make_batch(2)
    with torch.no_grad():
        aligned = ensemble(batch.unlabeled)
    pseudo_labels: list[torch.Tensor] = []

    def recording(labeled, targets, unlabeled, pseudo, mask):
        pseudo_labels.append(pseudo)
        return copy_paste(labeled, targets, unlabeled, pseudo, mask)

    monkeypatch.setattr(base, "copy_paste", recording)
    method = build_method("dct_seg", 2, 3, 1, 2, params={"lambda_mix": 1.0})
    term = method.copy_paste_term(ensemble, batch, aligned, 0.5)
    assert term.item() > 0
    own = [aligned[m].argmax(1, keepdim=True) for m in (0, 1)]
    assert not torch.equal(own[0], own[1])  # so that the test tells them apart
    assert torch.equal(pseudo_labels[0], own[1])
    assert torch.equal(pseudo_labels[1], own[0])


@pytest.mark.parametrize("method_name", ["dct_seg", "duo_segnet"])
def test_copy_paste_is_off_in_the_papers_settings_and_skipped_at_weight_zero(
    method_name: str,
) -> None:
    torch.manual_seed(0)
    ensemble = Ensemble(2, 3, 1, 2, network=TINY)
    batch: Batch = make_batch(2)
    paper = build_method(method_name, 2, 3, 1, 2)
    paper.attach(ensemble)
    assert "mixed" not in paper.loss_terms(ensemble, batch)
    assert "mixed" not in paper.loss_weights(0.5)
    mixing = build_method(method_name, 2, 3, 1, 2, params={"lambda_mix": 0.5})
    mixing.attach(ensemble)
    assert mixing.loss_weights(1.0)["mixed"] == pytest.approx(0.5)
    weights = dict(mixing.loss_weights(1.0), mixed=0.0)
    assert mixing.loss_terms(ensemble, batch, weights)["mixed"].item() == 0.0
    with pytest.raises(ValueError, match="lambda_mix must be"):
        build_method(method_name, 2, 3, 1, 2, params={"lambda_mix": -1.0})
    with pytest.raises(ValueError, match="mix_box must be"):
        build_method(method_name, 2, 3, 1, 2, params={"mix_box": 0.0})
