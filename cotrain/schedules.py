"""Schedules and sampling: the Gaussian ramp-up of the loss weights, each member's labeled
subset, the labeled cases held out for validation, and the member pairs that DCT-Seg updates
each iteration."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

logger = logging.getLogger(__name__)

__all__ = ["MemberPairSampler", "gaussian_rampup", "split_labeled_subsets", "split_validation"]


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


def split_validation(
    labeled: list[dict[str, str]], val_split: float, val_min_labels: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Hold out ``val_split`` of the labeled cases for validation, once there are enough.

    Args:
        labeled: Labeled cases.
        val_split: Fraction to hold out (0 disables validation).
        val_min_labels: Hold out nothing below this many labeled cases.
        seed: Seed of the (reproducible) choice.

    Returns:
        ``(train, validation)``; at least one case stays for training.
    """
    if val_split <= 0 or len(labeled) < max(val_min_labels, 2):
        return list(labeled), []
    count = min(max(1, round(len(labeled) * val_split)), len(labeled) - 1)
    order = list(range(len(labeled)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
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
