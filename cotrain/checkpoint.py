"""Model and checkpoint files: written atomically, read back with the configuration they need.

Two kinds of file live in a run's output folder:

- ``model.pt``, the served ensemble: configuration, member weights, metrics. It is written
  only by a run that completed, to a temporary file that is then renamed into place, so a
  crash never leaves a half-written model where a server would load it.
- ``checkpoint.pt``, everything needed to resume: the model plus optimisers, LR schedule,
  gradient scaler, method state (critic, teachers, pair sampler), epoch, best metric, history.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["MODEL_FORMAT", "load_file", "save_atomically"]

#: Format tag and version written into every model and checkpoint file.
MODEL_FORMAT = {"name": "cotrain-ensemble", "version": 1}


def save_atomically(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` with ``torch.save`` to a temporary file, fsync it, rename it to ``path``.

    Args:
        payload: Plain data and tensors.
        path: Destination; its folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": MODEL_FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a model or checkpoint file written by :func:`save_atomically`.

    Args:
        path: The file.
        map_location: Where tensors go.

    Raises:
        FileNotFoundError: If it does not exist.
        ValueError: If it is not a cotrain file or is of a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable cotrain model file: {error}") from error
    fmt = payload.get("format", {}) if isinstance(payload, dict) else {}
    if fmt.get("name") != MODEL_FORMAT["name"]:
        raise ValueError(f"{path} is not a cotrain model file")
    if fmt.get("version", 0) > MODEL_FORMAT["version"]:
        raise ValueError(
            f"{path} has format version {fmt['version']}; this cotrain reads up to {MODEL_FORMAT['version']}"
        )
    return payload
