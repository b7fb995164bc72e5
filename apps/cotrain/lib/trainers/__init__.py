"""Train tasks."""

from __future__ import annotations

from lib.trainers.co_training import CoTrainTask

__all__ = ["CoTrainTask"]
