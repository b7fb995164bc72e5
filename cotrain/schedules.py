"""Schedules and sampling: the Gaussian ramp-up of the loss weights, each member's labeled
subset, the labeled cases held out for validation, and the member pairs that DCT-Seg updates
each iteration."""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cotrain.files import nifti_name

logger = logging.getLogger(__name__)

__all__ = [
    "MemberPairSampler",
    "PolynomialWarmupLR",
    "gaussian_rampup",
    "split_labeled_subsets",
    "split_validation",
    "validation_hash",
]


def gaussian_rampup(t: float, maximum: float, t_start: float, t_end: float) -> float:
    """Gaussian ramp-up of both papers (Peng et al. 2020, Eq. 8).

    ``0`` for ``t < t_start``; ``maximum * exp(-5 (1 - (t - t_start)/(t_end - t_start))^2)`` for
    ``t_start <= t < t_end``; ``maximum`` for ``t >= t_end``.

    Args:
        t: Current time (epochs, fractional allowed).
        maximum: Value after the ramp.
        t_start: Time at which the ramp starts (value ``maximum * exp(-5)`` there).
        t_end: Time at which the value reaches ``maximum``.
    """
    if t < t_start:
        return 0.0
    if t >= t_end or t_end <= t_start:
        return float(maximum)
    phase = 1.0 - (t - t_start) / (t_end - t_start)
    return float(maximum * math.exp(-5.0 * phase * phase))


class PolynomialWarmupLR(torch.optim.lr_scheduler.LRScheduler):
    """nnU-Net's polynomial decay, ``lr = base * (1 - t / total) ** 0.9``, after an optional
    linear warm-up over the first ``warmup_iters`` steps.

    ``total_iters`` may change while it runs (a time budget that shortens the run); the decay
    then ends at the new total. A warm-started run warms up: its optimiser's moments start
    from zero, and a first step of full size would undo part of what the served model learned.

    Args:
        optimizer: The optimiser whose learning rate is scheduled.
        total_iters: Steps of the run.
        power: Exponent of the decay.
        warmup_iters: Steps of linear warm-up (0: none).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_iters: int,
        power: float = 0.9,
        warmup_iters: int = 0,
    ) -> None:
        self.total_iters = total_iters
        self.power = power
        self.warmup_iters = warmup_iters
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step = min(self.last_epoch, self.total_iters)
        factor = (1.0 - step / max(self.total_iters, 1)) ** self.power
        if self.warmup_iters:
            factor *= min(1.0, (self.last_epoch + 1) / (self.warmup_iters + 1))
        return [base * factor for base in self.base_lrs]


def split_labeled_subsets(
    num_labeled: int, num_members: int, shared_fraction: float = 1.0, seed: int = 0
) -> list[list[int]]:
    """Each member's labeled subset: a shared part plus exclusive chunks (DCT-Seg, Sec. 3.2.1,
    where a member's subset is its "view").

    The cases are shuffled; the first ``round(shared_fraction * n)`` go to every member and the
    rest is dealt into ``num_members`` exclusive chunks. With ``shared_fraction=1`` (the official
    default) every member sees every labeled case.

    Args:
        num_labeled: Number of labeled cases n.
        num_members: Number of members k.
        shared_fraction: Fraction of the cases that all members share.
        seed: Seed of the shuffle.

    Returns:
        For each member, the sorted indices of its labeled cases (never empty when ``n >= 1``).
    """
    if num_labeled < 1:
        raise ValueError("at least one labeled case is needed")
    order = list(range(num_labeled))
    random.Random(seed).shuffle(order)
    num_shared = round(shared_fraction * num_labeled)
    shared, rest = order[:num_shared], order[num_shared:]
    subsets = [sorted(shared + rest[m::num_members]) for m in range(num_members)]
    for m, subset in enumerate(subsets):
        if not subset:  # too few cases to deal one to every member: lend the shared pool's
            subsets[m] = sorted(order[: max(1, num_shared)])
    return subsets


def validation_hash(case: Mapping[str, str]) -> float:
    """A case's place in ``[0, 1)`` for :func:`split_validation`: the first 64 bits of the
    SHA-256 of its image id (the image's file name without ``.nii``/``.nii.gz``), so it depends
    on nothing but the image, not on the folder it is read from nor on the other cases."""
    image = Path(case["image"])
    name = nifti_name(image) or image.name
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_validation(
    labeled: Sequence[dict[str, str]], val_split: float, val_min_labels: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Hold out about ``val_split`` of the labeled cases for validation, once there are enough,
    such that a case keeps its role as labels are added.

    A case's role follows from its image id alone (:func:`validation_hash`, ``h``):

    - below ``max(val_min_labels, 2)`` labeled cases nothing is held out;
    - else the validation cases are those with ``h < val_split`` (so their fraction approaches
      ``val_split``); adding a label never moves another case between training and validation;
    - two guards, for few labels: while no case has ``h < val_split``, the one with the
      smallest ``h`` is the stand-in validation case; and while every case has
      ``h < val_split``, the one with the largest ``h`` trains (at least one case trains).

    So once validation has started, no case changes role except the guards' cases, in two
    bounded ways: the stand-in returns to training when a case with a smaller ``h`` is labeled
    (the new case is the stand-in now, or, if its ``h < val_split``, a validation case for good);
    and the guard's training case moves to validation when a case with a larger ``h`` is labeled.
    A case with ``h < val_split`` is a validation case for good once validation has started
    (unless it is the guard's training case); a case with ``h >= val_split`` trains for good
    once it is not (or no longer) the stand-in. The stand-in is needed only while no labeled
    case hashes below ``val_split`` (each new label ends that with probability ``val_split``);
    the second guard only while every one does (probability ``val_split ** n``).

    The count of validation cases varies as a binomial one would (its standard deviation is
    ``sqrt(n * val_split * (1 - val_split))``, about 2.5 of 40 at 0.2): that is the price of
    roles that do not depend on the other cases.

    Args:
        labeled: Labeled cases (``"image"`` and ``"label"`` paths).
        val_split: Fraction to hold out (0 disables validation).
        val_min_labels: Hold out nothing below this many labeled cases.

    Returns:
        ``(train, validation)``, each in the order of ``labeled``.
    """
    labeled = list(labeled)
    if val_split <= 0 or len(labeled) < max(val_min_labels, 2):
        return labeled, []
    hashes = [validation_hash(c) for c in labeled]
    held_out = {i for i, h in enumerate(hashes) if h < val_split}
    if not held_out:
        held_out = {min(range(len(labeled)), key=hashes.__getitem__)}
    elif len(held_out) == len(labeled):
        held_out.discard(max(range(len(labeled)), key=hashes.__getitem__))
    train = [c for i, c in enumerate(labeled) if i not in held_out]
    validation = [c for i, c in enumerate(labeled) if i in held_out]
    return train, validation


class MemberPairSampler:
    """Random pairs of distinct members such that every member is in a pair every ``ceil(k/2)``
    draws (DCT-Seg, Algorithm 1: "all networks are updated at each ceil(k/2) iterations").

    Args:
        num_members: k >= 2.
        seed: Seed of the shuffles.
    """

    def __init__(self, num_members: int, seed: int = 0) -> None:
        if num_members < 2:
            raise ValueError("pairs need at least 2 members")
        self.num_members = num_members
        self._rng = random.Random(seed)
        self._queue: list[tuple[int, int]] = []

    def _refill(self) -> None:
        order = list(range(self.num_members))
        self._rng.shuffle(order)
        if len(order) % 2:  # odd k: the last member pairs with a random other one
            order.append(self._rng.choice(order[:-1]))
        self._queue = [(order[i], order[i + 1]) for i in range(0, len(order), 2)]

    def __call__(self) -> tuple[int, int]:
        """The next pair ``(i, j)`` with ``i != j``."""
        if not self._queue:
            self._refill()
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "queue": list(self._queue)}

    def load_state_dict(self, state: dict) -> None:
        self._rng.setstate(_as_rng_state(state["rng"]))
        self._queue = [tuple(p) for p in state["queue"]]


def _as_rng_state(state: Sequence) -> tuple:
    """``random.Random`` state back from a checkpoint (tuples may come back as lists)."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
