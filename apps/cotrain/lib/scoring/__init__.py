"""Scoring methods."""

from __future__ import annotations

from lib.scoring.disagreement import (
    SCORE_KEY_PREFIX,
    EnsembleDisagreement,
    last_run,
    score_key,
    scoring_status,
)

__all__ = [
    "SCORE_KEY_PREFIX",
    "EnsembleDisagreement",
    "last_run",
    "score_key",
    "scoring_status",
]
