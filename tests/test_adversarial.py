"""FGSM and VAT perturbations: the requested size, a real increase of the loss they target,
and no side effect on the network (eval mode inside, normalisation statistics untouched)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cotrain.adversarial import fgsm_perturbation, l2_normalize, vat_perturbation
from cotrain.networks import build_member


def small_net(seed: int = 0, norm: str | tuple = ("instance", {"affine": True})) -> nn.Module:
    torch.manual_seed(seed)
    return build_member(3, 1, 3, channels=(4, 8), strides=(2,), norm=norm)


def kl_to_clean(model: nn.Module, x: torch.Tensor, r: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        clean = torch.softmax(model(x), 1)
        return F.kl_div(torch.log_softmax(model(x + r), 1), clean, reduction="batchmean").item()


def test_fgsm_has_requested_linf_norm_and_increases_cross_entropy() -> None:
    model = small_net()
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.randint(0, 3, (2, 1, 16, 16, 16))
    r = fgsm_perturbation(model, x, y, epsilon=0.05)
    assert r.shape == x.shape and not r.requires_grad
    assert torch.allclose(r.abs(), torch.full_like(r, 0.05))
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y[:, 0]).item()
        adversarial = F.cross_entropy(model(x + r), y[:, 0]).item()
        random_sign = torch.sign(torch.randn_like(x)) * 0.05
        random = F.cross_entropy(model(x + random_sign), y[:, 0]).item()
    assert adversarial > clean
    assert adversarial > random


def test_vat_has_requested_l2_norm_per_sample_and_beats_random_directions() -> None:
    model = small_net()
    x = torch.randn(2, 1, 16, 16, 16)
    r = vat_perturbation(model, x, epsilon=2.0, xi=10.0, power_iterations=1)
    torch.testing.assert_close(r.flatten(1).norm(dim=1), torch.full((2,), 2.0))
    adversarial = kl_to_clean(model, x, r)
    randoms = [kl_to_clean(model, x, 2.0 * l2_normalize(torch.randn_like(x))) for _ in range(5)]
    assert adversarial > max(randoms)


def test_vat_probe_step_survives_3d_volumes() -> None:
    # With the 2D default xi=1e-6 the KL change is below float precision over a 3D volume and
    # the direction is noise; xi=10 must give a direction that clearly beats random ones.
    model = small_net(seed=1)
    x = torch.randn(1, 1, 32, 32, 32)
    r = vat_perturbation(model, x, epsilon=4.0, xi=10.0)
    assert kl_to_clean(model, x, r) > 2 * kl_to_clean(
        model, x, 4.0 * l2_normalize(torch.randn_like(x))
    )


@pytest.mark.parametrize("make", ["fgsm", "vat"])
def test_perturbations_restore_training_mode_and_leave_batchnorm_statistics(make: str) -> None:
    model = small_net(norm="batch")
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert stats, "the test needs a network with running statistics"
    x = torch.randn(2, 1, 16, 16, 16)
    if make == "fgsm":
        fgsm_perturbation(model, x, torch.randint(0, 3, (2, 1, 16, 16, 16)), 0.05)
    else:
        vat_perturbation(model, x, 2.0)
    assert model.training
    for k, v in model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), f"{k} changed"
    assert all(p.grad is None for p in model.parameters())


def test_vat_with_the_steps_own_clean_prediction_gives_the_same_direction() -> None:
    """DCT-Seg hands VAT the training step's prediction (train mode, with a graph) instead of
    a second clean forward pass: for cotrain's members the perturbation is the same."""
    model = small_net()
    x = torch.randn(2, 1, 16, 16, 16)
    model.train()
    step_logits = model(x)  # as in a training step: train mode, part of the graph
    torch.manual_seed(3)
    reused = vat_perturbation(model, x, epsilon=2.0, clean_logits=step_logits)
    torch.manual_seed(3)
    computed = vat_perturbation(model, x, epsilon=2.0)
    torch.testing.assert_close(reused, computed)
    assert not reused.requires_grad and model.training


def test_fgsm_through_the_steps_own_graph_gives_the_same_perturbation_and_keeps_the_graph() -> None:
    """Outside autocast DCT-Seg takes FGSM's gradient through the supervised pass of the step
    (its images requiring grad) instead of a forward pass of its own: the same perturbation,
    and the step's graph stays usable for its backward pass."""
    model = small_net()
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.randint(0, 3, (2, 1, 16, 16, 16))
    model.train()
    step_input = x.clone().requires_grad_(True)
    step_logits = model(step_input)
    reused = fgsm_perturbation(model, step_input, y, 0.05, clean_logits=step_logits)
    computed = fgsm_perturbation(model, x, y, 0.05)
    assert (reused == computed).float().mean() > 0.999  # sign ties may differ in the last bit
    assert not reused.requires_grad and all(p.grad is None for p in model.parameters())
    step_logits.sum().backward()  # the graph was kept
    assert all(p.grad is not None for p in model.parameters())


def test_fgsm_refuses_logits_without_a_graph_to_the_image() -> None:
    model = small_net()
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="requires grad"):
        fgsm_perturbation(model, x, torch.zeros(1, 1, 16, 16, 16), 0.05, clean_logits=model(x))
