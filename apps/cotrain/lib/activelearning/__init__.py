"""Active learning strategies."""

from __future__ import annotations

from lib.activelearning.disagreement import Disagreement

__all__ = ["Disagreement"]
