"""Scoring methods."""

from __future__ import annotations

from lib.scoring.disagreement import EnsembleDisagreement

__all__ = ["EnsembleDisagreement"]
