"""Loss terms: their values where the answer is known, and that every term's gradient reaches
every parameter it should (both reference implementations have terms that never train)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cotrain.inference import soft_vote
from cotrain.losses import (
    adversarial_diversity_loss,
    critic_adversarial_loss,
    critic_discriminator_loss,
    cross_pseudo_supervision_loss,
    foreground_focus,
    jensen_shannon_agreement,
    jensen_shannon_map,
    symmetric_cross_entropy_agreement,
)
from cotrain.methods import METHOD_CLASSES, Batch, build_method
from cotrain.networks import Ensemble, frozen
from cotrain.perturbation import UnlabeledPerturbation

TINY = {"channels": [4, 8], "strides": [2]}
# Methods whose agreement term can be focused on the foreground (``agreement_focus``).
FOCUSABLE_METHODS = ("jsd", "dct_seg", "duo_segnet")


def make_batch(k: int, seed: int = 0, size: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    labeled = []
    for _ in range(k):
        image = torch.randn(2, 1, size, size, size, generator=g)
        labeled.append((image, (image > 0.3).long()))
    return Batch(labeled=labeled, unlabeled=torch.randn(2, 1, size, size, size, generator=g))


def assert_gradient_reaches(module: nn.Module, what: str) -> None:
    """Every parameter has a gradient, and every convolution kernel a non-zero one.

    (Biases directly followed by instance normalisation get an exactly cancelled gradient by
    construction, so the kernels are the parameters that must move.)
    """
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f"{what}: no gradient reaches {name}"
        if parameter.dim() > 1:
            assert parameter.grad.abs().sum() > 0, f"{what}: zero gradient at {name}"


def zero_grads(*modules: nn.Module) -> None:
    for m in modules:
        m.zero_grad(set_to_none=True)


def test_jsd_is_zero_for_identical_members_and_positive_otherwise() -> None:
    logits = torch.randn(1, 2, 3, 8, 8, 8)
    identical = logits.expand(3, -1, -1, -1, -1, -1)
    assert jensen_shannon_agreement(identical).item() == pytest.approx(0.0, abs=1e-6)
    different = torch.randn(3, 2, 3, 8, 8, 8)
    value = jensen_shannon_agreement(different).item()
    assert 0.0 < value <= math.log(3)


def test_jsd_reaches_log_k_for_confident_disjoint_members() -> None:
    logits = torch.full((2, 1, 2, 4, 4, 4), -30.0)
    logits[0, :, 0] = 30.0  # member 0 certain of class 0
    logits[1, :, 1] = 30.0  # member 1 certain of class 1
    assert jensen_shannon_map(logits).mean().item() == pytest.approx(math.log(2), rel=1e-4)


def test_foreground_focus_averages_agreement_over_the_organ_not_the_background() -> None:
    # Both members are sure of background everywhere except a 2x2x2 block, where member 0
    # says foreground and member 1 is unsure; a confident disagreement-free background
    # dilutes the plain mean by the block's share of the volume.
    logits = torch.zeros(2, 1, 2, 8, 8, 8)
    logits[:, :, 0] = 10.0
    logits[0, :, :, :2, :2, :2] = torch.tensor([-10.0, 10.0]).view(2, 1, 1, 1)
    logits[1, :, :, :2, :2, :2] = 0.0
    region = foreground_focus(logits, 0.5)
    assert region.shape == (1, 8, 8, 8)
    assert region.sum().item() == 8 and region[0, :2, :2, :2].all()
    focused = jensen_shannon_agreement(logits, region).item()
    block = jensen_shannon_map(logits)[0, :2, :2, :2].mean().item()
    assert focused == pytest.approx(block, rel=1e-5)
    assert focused > 50 * jensen_shannon_agreement(logits).item()
    a, b = logits
    assert symmetric_cross_entropy_agreement(a, b, region).item() > 10 * (
        symmetric_cross_entropy_agreement(a, b).item()
    )


@pytest.mark.parametrize("method_name", FOCUSABLE_METHODS)
def test_agreement_focus_parameter_reaches_the_methods_agreement_term(method_name: str) -> None:
    torch.manual_seed(0)
    ensemble = Ensemble(2, 3, 1, 2, network=TINY)
    batch = make_batch(2)
    with torch.no_grad():
        aligned = ensemble(batch.unlabeled)
    region = foreground_focus(aligned, 0.6)
    assert 0 < region.sum() < region.numel()
    if method_name == "duo_segnet":
        expected = symmetric_cross_entropy_agreement(aligned[0], aligned[1], region)
    else:
        expected = jensen_shannon_agreement(aligned, region)
    plain, focused = (
        build_method(method_name, 2, 3, 1, 2, params={"agreement_focus": focus}).loss_terms(
            ensemble, batch
        )["agreement"]
        for focus in (0.0, 0.6)
    )
    assert focused.item() == pytest.approx(expected.item(), rel=1e-5)
    assert focused.item() != pytest.approx(plain.item(), rel=1e-3)


def test_foreground_focus_rejects_a_threshold_outside_zero_one() -> None:
    with pytest.raises(ValueError, match="agreement_focus must be in"):
        build_method("dct_seg", 2, 3, 1, 2, params={"agreement_focus": 1.5})
    with pytest.raises(ValueError, match="threshold must be in"):
        foreground_focus(torch.zeros(2, 1, 2, 4, 4, 4), 0.0)


def test_soft_vote_is_mean_of_member_softmax() -> None:
    logits = torch.randn(3, 2, 4, 6, 6, 6)
    expected = (
        torch.softmax(logits[0], 1) + torch.softmax(logits[1], 1) + torch.softmax(logits[2], 1)
    ) / 3
    torch.testing.assert_close(soft_vote(logits), expected)
    assert torch.allclose(soft_vote(logits).sum(dim=1), torch.ones(2, 6, 6, 6))


def test_symmetric_cross_entropy_is_smallest_for_agreeing_confident_members() -> None:
    confident = torch.zeros(1, 2, 4, 4, 4)
    confident[:, 1] = 20.0
    other = torch.zeros(1, 2, 4, 4, 4)
    other[:, 0] = 20.0
    agree = symmetric_cross_entropy_agreement(confident, confident).item()
    disagree = symmetric_cross_entropy_agreement(confident, other).item()
    assert agree == pytest.approx(0.0, abs=1e-4)
    assert disagree > 10.0


def test_symmetric_cross_entropy_entropy_weight_splits_entropy_from_disagreement() -> None:
    """``entropy_weight`` 0 leaves the symmetric KL: zero for members that agree however
    unsure (where the paper's loss is their entropies), positive where they disagree; values
    in between interpolate linearly."""
    unsure = torch.zeros(1, 2, 4, 4, 4)  # p = (0.5, 0.5) everywhere
    assert symmetric_cross_entropy_agreement(unsure, unsure).item() == pytest.approx(
        2 * math.log(2), rel=1e-5
    )
    assert symmetric_cross_entropy_agreement(unsure, unsure, entropy_weight=0.0).item() == (
        pytest.approx(0.0, abs=1e-6)
    )
    a, b = torch.randn(2, 2, 3, 4, 4, 4)
    paper, kl, half = (
        symmetric_cross_entropy_agreement(a, b, entropy_weight=w).item() for w in (1.0, 0.0, 0.5)
    )
    assert kl > 0
    assert half == pytest.approx((paper + kl) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="entropy_weight"):
        build_method("duo_segnet", 2, 3, 1, 2, params={"entropy_weight": -1.0})


def test_diversity_loss_is_zero_when_other_matches_source_and_only_other_learns() -> None:
    source = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    other = source.detach().clone().requires_grad_(True)
    assert adversarial_diversity_loss(source, other).item() == pytest.approx(0.0, abs=1e-5)
    loss = adversarial_diversity_loss(source, torch.randn(2, 3, 4, 4, 4) + other)
    loss.backward()
    assert source.grad is None  # the source's prediction is a detached target
    assert other.grad.abs().sum() > 0


def test_cross_pseudo_supervision_uses_argmax_targets() -> None:
    a = torch.randn(2, 3, 4, 4, 4)
    assert cross_pseudo_supervision_loss(a, a).item() == pytest.approx(
        2 * torch.nn.functional.cross_entropy(a, a.argmax(1)).item(), rel=1e-5
    )


# Which members each term of each method must reach (k = 2: all members everywhere).
TERMS = {
    "supervised": ["supervised"],
    "jsd": ["supervised", "agreement"],
    "dct_seg": ["supervised", "agreement", "diversity"],
    "duo_segnet": ["supervised", "agreement", "adversarial"],
    "cps": ["supervised", "pseudo_supervision"],
    "mean_teacher": ["supervised", "consistency"],
}


@pytest.mark.parametrize(
    ("method_name", "perturbed", "params"),
    [(name, False, {}) for name in sorted(TERMS)]
    + [(name, True, {}) for name, cls in METHOD_CLASSES.items() if cls.perturbable]
    + [(name, True, {"agreement_focus": 0.3}) for name in FOCUSABLE_METHODS]
    + [("duo_segnet", True, {"entropy_weight": 0.0})]
    + [("dct_seg", True, {"lambda_mix": 1.0}), ("duo_segnet", False, {"lambda_mix": 1.0})],
)
def test_every_loss_term_sends_gradient_to_every_member(
    method_name: str, perturbed: bool, params: dict
) -> None:
    torch.manual_seed(0)
    ensemble = Ensemble(2, 3, 1, 2, network=TINY)
    method = build_method(method_name, 2, 3, 1, 2, params=params)
    method.attach(ensemble)
    batch = make_batch(2)
    if perturbed:
        batch.unlabeled_copies = UnlabeledPerturbation(3, seed=0)(batch.unlabeled, 2)
    terms = method.loss_terms(ensemble, batch)
    assert sorted(terms) == sorted(
        TERMS[method_name] + (["mixed"] if "lambda_mix" in params else [])
    )
    for name, term in terms.items():
        zero_grads(ensemble, method)
        term.backward(retain_graph=True)
        for i, member in enumerate(ensemble.members):
            assert_gradient_reaches(member, f"{method_name}.{name} -> member {i}")
        assert term.item() > 0


def test_dct_seg_diversity_updates_only_the_sampled_pair() -> None:
    torch.manual_seed(0)
    ensemble = Ensemble(3, 3, 1, 2, network=TINY)
    method = build_method("dct_seg", 3, 3, 1, 2)
    seen = set()
    for _ in range(2):  # ceil(3/2) = 2 draws cover every member
        expected_pair = method.pairs._queue[0] if method.pairs._queue else None
        zero_grads(ensemble)
        terms = method.loss_terms(ensemble, make_batch(3))
        terms["diversity"].backward()
        reached = {
            i
            for i, m in enumerate(ensemble.members)
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        }
        assert len(reached) == 2
        if expected_pair is not None:
            assert reached == set(expected_pair)
        seen |= reached
    assert seen == {0, 1, 2}


def test_duo_segnet_critic_gets_gradients_from_its_own_loss_and_members_from_theirs() -> None:
    torch.manual_seed(0)
    ensemble = Ensemble(2, 3, 1, 2, network=TINY)
    method = build_method("duo_segnet", 2, 3, 1, 2)
    batch = make_batch(2)
    terms = method.loss_terms(ensemble, batch)
    # The members' adversarial term reaches the members through the critic.
    zero_grads(ensemble, method)
    terms["adversarial"].backward()
    for i, member in enumerate(ensemble.members):
        assert_gradient_reaches(member, f"adversarial -> member {i}")
    # ... without computing the critic's weight gradients, which its own step would discard.
    assert all(p.grad is None for p in method.critic.parameters())
    assert all(p.requires_grad for p in method.critic.parameters())
    # The critic's own loss reaches every critic parameter, and no member.
    zero_grads(ensemble, method)
    before = [p.detach().clone() for p in method.critic.parameters()]
    critic_loss = method.critic_loss(batch, method._labeled_probabilities)
    # It judges ground truth and predictions in one call: the same loss as one call each.
    separate = 0.0
    for (images, targets), fake in zip(batch.labeled, method._labeled_probabilities, strict=True):
        real = F.one_hot(targets[:, 0].long(), 2).movedim(-1, 1).float()
        separate = separate + critic_discriminator_loss(
            method.critic(images, real), method.critic(images, fake)
        )
    torch.testing.assert_close(critic_loss, separate / len(batch.labeled))
    critic_loss.backward()
    assert_gradient_reaches(method.critic, "critic loss -> critic")
    assert all(p.grad is None for p in ensemble.parameters())
    # And its step changes the critic.
    method.critic_optimizer.step()
    assert any(
        not torch.equal(a, b) for a, b in zip(before, method.critic.parameters(), strict=True)
    )


def test_duo_segnet_judges_all_members_in_one_critic_call_as_one_call_each() -> None:
    """The members' adversarial term, judged in one critic call over every member's labeled
    and unlabeled predictions, equals the sum of one call per pair in value and in the
    members' gradients; inputs of different shapes are judged one call each."""
    torch.manual_seed(0)
    ensemble = Ensemble(2, 3, 1, 2, network=TINY)
    method = build_method("duo_segnet", 2, 3, 1, 2)
    batch = make_batch(2)
    images = [x for x, _ in batch.labeled] + [batch.unlabeled] * 2
    probabilities = [torch.softmax(ensemble.members[i](x), 1) for i, x in enumerate(images[:2])]
    probabilities += list(torch.softmax(ensemble(batch.unlabeled), 2).unbind(0))
    with frozen(method.critic):
        batched = method._adversarial_loss(images, probabilities)
        batched_grads = torch.autograd.grad(batched, list(ensemble.parameters()), retain_graph=True)
        separate = sum(
            critic_adversarial_loss(method.critic(x, p))
            for x, p in zip(images, probabilities, strict=True)
        )
        separate_grads = torch.autograd.grad(separate, list(ensemble.parameters()))
    torch.testing.assert_close(batched, separate)
    for a, b in zip(batched_grads, separate_grads, strict=True):
        torch.testing.assert_close(a, b)
    smaller = [x[..., :-2] for x in images[:1]]
    mixed = method._judge(images[1:2] + smaller, probabilities[1:2] + [probabilities[0][..., :-2]])
    assert [m.shape[0] for m in mixed] == [len(images[1]), len(smaller[0])]


def test_mean_teacher_follows_students_by_ema() -> None:
    torch.manual_seed(0)
    ensemble = Ensemble(1, 3, 1, 2, network=TINY)
    method = build_method("mean_teacher", 1, 3, 1, 2, params={"ema_decay": 0.5})
    method.attach(ensemble)
    student = next(ensemble.members[0].parameters())
    teacher = next(method.teachers[0].parameters())
    with torch.no_grad():
        student.add_(1.0)
    old_teacher = teacher.detach().clone()
    method.after_member_step(ensemble, make_batch(1))
    torch.testing.assert_close(teacher, 0.5 * old_teacher + 0.5 * student.detach())
    assert not teacher.requires_grad


def test_unknown_method_parameter_is_named() -> None:
    with pytest.raises(ValueError, match="lambda_typo"):
        build_method("dct_seg", 2, 3, 1, 2, params={"lambda_typo": 1.0})


def test_all_methods_are_registered() -> None:
    assert set(METHOD_CLASSES) == set(TERMS)


def _count_forward_passes(ensemble: Ensemble) -> list[int]:
    counts = [0] * len(ensemble)
    for i, member in enumerate(ensemble.members):
        member.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_dct_seg_leaves_out_the_diversity_work_while_its_weight_is_zero() -> None:
    """Before the diversity ramp starts no adversarial example is made, and the member pairs
    drawn stay those of a run that computes it (the skipping changes nothing else)."""
    torch.manual_seed(0)
    ensemble = Ensemble(3, 3, 1, 2, network=TINY)
    counts = _count_forward_passes(ensemble)
    skipping = build_method("dct_seg", 3, 3, 1, 2)
    weights = skipping.loss_weights(0.05)
    assert weights["diversity"] == 0.0 and weights["agreement"] > 0.0
    terms = skipping.loss_terms(ensemble, make_batch(3), weights)
    assert terms["diversity"].item() == 0.0
    assert counts == [2, 2, 2]  # its labeled batch and the unlabeled batch, nothing more
    computing = build_method("dct_seg", 3, 3, 1, 2)
    computing.loss_terms(ensemble, make_batch(3))
    assert skipping.pairs() == computing.pairs()


@pytest.mark.parametrize("method_name", ["dct_seg", "duo_segnet"])
def test_mix_every_n_steps_keeps_its_mean_weight_and_skips_the_mixed_passes(
    method_name: str,
) -> None:
    """With ``mix_every 2`` the copy-paste term weighs twice its ramp on every other step and
    nothing in between, where the members make no pass over mixed patches."""
    torch.manual_seed(0)
    ensemble = Ensemble(2, 3, 1, 2, network=TINY)
    counts = _count_forward_passes(ensemble)
    params = {"lambda_mix": 1.0}
    method = build_method(method_name, 2, 3, 1, 2, params={**params, "mix_every": 2})
    every_step = build_method(method_name, 2, 3, 1, 2, params=params).loss_weights(0.5)["mixed"]
    seen, passes = [], []
    for step in range(4):
        weights = method.loss_weights(0.5)
        if method_name == "dct_seg":
            weights["diversity"] = 0.0  # its adversarial passes are not counted here
        before = list(counts)
        terms = method.loss_terms(ensemble, make_batch(2, seed=step), weights)
        seen.append(weights["mixed"])
        passes.append([after - b for after, b in zip(counts, before, strict=True)])
        assert (terms["mixed"].item() > 0) == (weights["mixed"] > 0)
    assert every_step > 0 and seen == [2 * every_step, 0.0] * 2
    assert passes == [[3, 3], [2, 2]] * 2  # labeled, unlabeled (and mixed) batches
    with pytest.raises(ValueError, match="mix_every must be >= 1"):
        build_method(method_name, 2, 3, 1, 2, params={"lambda_mix": 1.0, "mix_every": 0})


def test_dct_seg_diversity_every_n_steps_keeps_its_mean_weight_and_resumes() -> None:
    torch.manual_seed(0)
    ensemble = Ensemble(2, 3, 1, 2, network=TINY)
    method = build_method("dct_seg", 2, 3, 1, 2, params={"diversity_every": 3})
    every_step = build_method("dct_seg", 2, 3, 1, 2).loss_weights(0.5)["diversity"]
    seen = []
    for step in range(6):
        weights = method.loss_weights(0.5)
        terms = method.loss_terms(ensemble, make_batch(2, seed=step), weights)
        seen.append(weights["diversity"])
        assert (terms["diversity"].item() > 0) == (weights["diversity"] > 0)
    assert seen == [3 * every_step, 0.0, 0.0] * 2
    resumed = build_method("dct_seg", 2, 3, 1, 2, params={"diversity_every": 3})
    resumed.load_state_dict(method.state_dict())
    assert resumed.steps == 6 and resumed.loss_weights(0.5)["diversity"] == 3 * every_step
    with pytest.raises(ValueError, match="diversity_every must be >= 1"):
        build_method("dct_seg", 2, 3, 1, 2, params={"diversity_every": 0})
