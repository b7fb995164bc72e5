"""Infer tasks."""

from __future__ import annotations

from lib.infers.ensemble import EnsembleInfer

__all__ = ["EnsembleInfer"]
