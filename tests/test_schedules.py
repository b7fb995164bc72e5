"""Ramp-up knots, each member's labeled subset and member pair sampling."""

from __future__ import annotations

import math

import pytest

from cotrain.schedules import (
    MemberPairSampler,
    gaussian_rampup,
    split_labeled_subsets,
)


def test_gaussian_rampup_at_its_knots() -> None:
    assert gaussian_rampup(0.0, 0.5, t_start=1, t_end=50) == 0.0
    assert gaussian_rampup(0.999, 0.5, t_start=1, t_end=50) == 0.0
    assert gaussian_rampup(1.0, 0.5, t_start=1, t_end=50) == pytest.approx(0.5 * math.exp(-5))
    assert gaussian_rampup(25.5, 0.5, t_start=1, t_end=50) == pytest.approx(
        0.5 * math.exp(-5 * 0.25)
    )
    assert gaussian_rampup(50.0, 0.5, t_start=1, t_end=50) == 0.5
    assert gaussian_rampup(500.0, 0.5, t_start=1, t_end=50) == 0.5
    values = [gaussian_rampup(t, 1.0, 20, 80) for t in range(20, 81)]
    assert values == sorted(values)  # monotone on the ramp


def test_zero_length_ramp_is_a_step() -> None:
    assert gaussian_rampup(0.0, 2.0, 0.0, 0.0) == 2.0


def test_subsets_share_all_cases_by_default() -> None:
    assert split_labeled_subsets(7, 3) == [list(range(7))] * 3


def test_subsets_have_shared_part_and_exclusive_chunks() -> None:
    subsets = split_labeled_subsets(10, 2, shared_fraction=0.4, seed=3)
    shared = set(subsets[0]) & set(subsets[1])
    assert len(shared) == 4
    exclusive = [set(v) - shared for v in subsets]
    assert exclusive[0].isdisjoint(exclusive[1])
    assert set(subsets[0]) | set(subsets[1]) == set(range(10))
    assert {len(e) for e in exclusive} == {3}


def test_subsets_never_empty_with_few_cases() -> None:
    subsets = split_labeled_subsets(1, 4, shared_fraction=0.0)
    assert all(subsets)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_pairs_are_distinct_and_cover_every_member_each_round(k: int) -> None:
    sampler = MemberPairSampler(k, seed=1)
    rounds = math.ceil(k / 2)
    for _ in range(10):
        covered = set()
        for _ in range(rounds):
            i, j = sampler()
            assert i != j and 0 <= i < k and 0 <= j < k
            covered |= {i, j}
        assert covered == set(range(k))


def test_pair_sampler_state_round_trips() -> None:
    a = MemberPairSampler(4, seed=7)
    a()
    b = MemberPairSampler(4, seed=0)
    b.load_state_dict(a.state_dict())
    assert [a() for _ in range(6)] == [b() for _ in range(6)]
