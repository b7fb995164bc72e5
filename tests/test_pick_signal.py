"""bench/pick_signal.py: how well each active-learning score ranks studies by real error."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import pick_signal  # noqa: E402


def test_a_score_that_follows_the_error_ranks_first_and_one_that_does_not_is_seen() -> None:
    errors = [0.1, 0.4, 0.2, 0.3, 0.05]
    rows = [
        {
            "error": e,
            "disagreement": -e,  # ranks the best-segmented first
            "dice_error": 2 * e + 0.01,  # follows the error
            "disagreement_per_foreground": 1.0,  # no information: ties, id order
            "member_dice_disagreement": e,
            "image_voxels": i,
        }
        for i, e in enumerate(errors)
    ]
    scores = pick_signal.rank_scores(rows, top=2)
    assert scores["dice_error"]["spearman"] == pytest.approx(1.0)
    assert scores["dice_error"]["top_error"] == pytest.approx(0.35)  # 0.4 and 0.3
    assert scores["disagreement"]["spearman"] == pytest.approx(-1.0)
    assert scores["disagreement"]["top_error"] == pytest.approx(0.075)
    assert math.isnan(scores["disagreement_per_foreground"]["spearman"])
    lines = pick_signal.report(
        [{"model": "m.pt", "labeled": 4, "studies": 5, "mean_error": 0.21, "scores": scores}], top=2
    )
    assert "| `m.pt` | 4 | 5 | 0.210 | -1.000 (0.075) | +1.000 (0.350) | n/a (" in lines[-1]


def test_members_that_label_alike_do_not_disagree() -> None:
    logits = torch.randn(1, 1, 3, 6, 6, 6).repeat(2, 1, 1, 1, 1, 1)
    assert pick_signal.member_dice_disagreement(logits) == pytest.approx(0.0)
    logits[1] = -logits[1]
    assert pick_signal.member_dice_disagreement(logits) > 0.5
