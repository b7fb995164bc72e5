"""Active learning strategies."""

from __future__ import annotations

from lib.activelearning.disagreement import Disagreement
from lib.activelearning.expected_error import ExpectedError

__all__ = ["Disagreement", "ExpectedError"]
