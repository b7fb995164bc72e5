"""Members run stacked (one vectorised call) give what they give one after the other."""

from __future__ import annotations

import pytest
import torch

from cotrain.methods import METHOD_CLASSES, build_method
from cotrain.networks import Ensemble
from cotrain.perturbation import UnlabeledPerturbation
from tests.test_losses import TINY, make_batch


def _pair(k: int) -> tuple[Ensemble, Ensemble]:
    loop = Ensemble(k, 3, 1, 3, seed=4, network=TINY)
    stacked = Ensemble(k, 3, 1, 3, seed=4, network=TINY)
    stacked.stacked = True
    return loop, stacked


def _gradients(ensemble: Ensemble) -> list[torch.Tensor]:
    return [p.grad.clone() for p in ensemble.parameters()]


@pytest.mark.parametrize("k", [2, 3])
def test_stacked_forward_and_forward_each_equal_the_loop(k: int) -> None:
    loop, stacked = _pair(k)
    x = torch.randn(2, 1, 16, 16, 16)
    each = torch.randn(k, 2, 1, 16, 16, 16)
    outputs = []
    for ensemble in (loop, stacked):
        out = ensemble(x)
        out_each = ensemble.forward_each(each)
        out_two = ensemble.forward_each([each[0], each[1]], members=(1, 0))
        (out.square().mean() + out_each.mean() + out_two.abs().mean()).backward()
        outputs.append((out.detach(), out_each.detach(), out_two.detach()))
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(_gradients(loop), _gradients(stacked), strict=True):
        # Grouped convolutions sum in another order: float32 differences near 1e-5.
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="3 inputs for 2 members"):
        loop.forward_each(torch.randn(3, 2, 1, 16, 16, 16), members=(0, 1))


@pytest.mark.parametrize("method_name", sorted(METHOD_CLASSES))
def test_every_methods_loss_and_gradients_are_the_same_stacked(method_name: str) -> None:
    """Each method's terms and the members' gradients, loop against stacked (perturbed
    unlabeled copies where the method takes them, so per-member inputs are exercised)."""
    results = []
    for ensemble in _pair(2):
        torch.manual_seed(0)
        method = build_method(method_name, 2, 3, 1, 3, seed=0)
        method.attach(ensemble)
        batch = make_batch(2)
        batch.labeled = [(x, (x > 0.3).long() + (x > 1.0).long()) for x, _ in batch.labeled]
        if METHOD_CLASSES[method_name].perturbable:
            batch.unlabeled_copies = UnlabeledPerturbation(3, seed=0)(batch.unlabeled, 2)
        terms = method.loss_terms(ensemble, batch)
        sum(terms.values()).backward()
        results.append(({n: t.item() for n, t in terms.items()}, _gradients(ensemble)))
    (loop_terms, loop_grads), (stacked_terms, stacked_grads) = results
    assert loop_terms == pytest.approx(stacked_terms, rel=1e-4, abs=1e-6)
    for a, b in zip(loop_grads, stacked_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
