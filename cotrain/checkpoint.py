"""Model and checkpoint files: what they hold, written atomically with a digest, verified when
read back.

Two kinds of file live in a run's output folder:

- ``model.pt``, the served ensemble: configuration, member weights, metrics. It is written
  only by a run that completed, to a temporary file that is then renamed into place, so a
  crash never leaves a half-written model where a server would load it.
- ``checkpoint.pt``, everything needed to resume: the model plus optimisers, LR schedule,
  gradient scaler, method state (critic, teachers, pair sampler), epoch, best metric, history.

Every file written here carries the SHA-256 digest of its content (``"sha256"``, over every
tensor's bytes and every value, in a fixed order); :func:`load_file` recomputes it and refuses
a file whose content does not match, so a damaged file (disk error, partial copy, edit) is
never used. A served model is replaced only by :func:`publish_model`, which verifies the new
file and keeps the one it replaces as ``NAME.prev.pt``; :func:`load_model_with_fallback`
returns to that previous model when the current one cannot be used.

The training engine writes and reads them through :func:`save_checkpoint`,
:func:`restore_checkpoint`, :func:`warm_start` and :func:`publish_weights`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotrain.config import TrainConfig
from cotrain.files import atomic_copy, atomic_write, fsync_directory

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILE",
    "DIGEST_KEY",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "CorruptModelError",
    "content_digest",
    "load_file",
    "load_model_with_fallback",
    "previous_model_path",
    "publish_model",
    "publish_weights",
    "restore_checkpoint",
    "save_atomically",
    "save_checkpoint",
    "warm_start",
]

#: The served ensemble a completed run writes into its output folder.
MODEL_FILE = "model.pt"
#: Everything needed to resume a run, rewritten after every epoch.
CHECKPOINT_FILE = "checkpoint.pt"

#: Format tag and version written into every model and checkpoint file. Version 2 added the
#: content digest; version 1 files (no digest) are still read.
MODEL_FORMAT = {"name": "cotrain-ensemble", "version": 2}
#: Key of the content digest in a saved payload.
DIGEST_KEY = "sha256"


class CorruptModelError(ValueError):
    """A model or checkpoint file that cannot be used: unreadable, foreign, or damaged."""


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` to ``digest`` in a canonical order (dict keys sorted, tensors as bytes)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)};".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def content_digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of everything in ``payload`` except its own ``"sha256"`` entry."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return digest.hexdigest()


def save_atomically(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` with its format tag and content digest, atomically (see
    :func:`cotrain.files.atomic_write`).

    Args:
        payload: Plain data and tensors.
        path: Destination; its folder is created if missing.
    """
    path = Path(path)
    body = {"format": MODEL_FORMAT, **payload}
    body[DIGEST_KEY] = content_digest(body)
    with atomic_write(path, "wb") as f:
        torch.save(body, f)
    return path


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a model or checkpoint file written by :func:`save_atomically` and verify it.

    Args:
        path: The file.
        map_location: Where tensors go.

    Raises:
        FileNotFoundError: If it does not exist.
        CorruptModelError: If it is unreadable, not a cotrain file, of a newer format
            version, or its content does not match its digest.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated, damaged or foreign file
        raise CorruptModelError(f"{path} is not a readable cotrain model file: {error}") from error
    fmt = payload.get("format", {}) if isinstance(payload, dict) else {}
    if not isinstance(fmt, dict) or fmt.get("name") != MODEL_FORMAT["name"]:
        raise CorruptModelError(f"{path} is not a cotrain model file")
    version = fmt.get("version", 0)
    if version > MODEL_FORMAT["version"]:
        raise CorruptModelError(
            f"{path} has format version {version}; this cotrain reads up to {MODEL_FORMAT['version']}"
        )
    if version >= 2:
        expected = payload.get(DIGEST_KEY)
        if not expected or content_digest(payload) != expected:
            raise CorruptModelError(
                f"{path} is corrupt: its content does not match its SHA-256 digest"
            )
    return payload


def previous_model_path(path: str | Path) -> Path:
    """Where :func:`publish_model` keeps the model it replaced: ``NAME.prev.pt`` beside
    ``NAME.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def publish_model(source: str | Path, destination: str | Path) -> Path:
    """Make ``source`` the served model ``destination``, keeping the replaced one.

    ``source`` is verified first (a damaged file is never published). A ``destination``
    that verifies is copied to :func:`previous_model_path` (atomically); then ``source`` is
    renamed onto ``destination`` in one step, so readers see the old or the new model and
    never a partial one. Both must be on the same file system.

    Args:
        source: A model file written by :func:`save_atomically` (moved, not copied).
        destination: The served model file.

    Returns:
        ``destination`` as a ``Path``.

    Raises:
        CorruptModelError: If ``source`` does not verify (nothing is changed).
    """
    source, destination = Path(source), Path(destination)
    load_file(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_file():
        try:
            load_file(destination)
        except (CorruptModelError, FileNotFoundError) as e:
            logger.warning("not keeping %s as the previous model: %s", destination, e)
        else:
            atomic_copy(destination, previous_model_path(destination))
    os.replace(source, destination)
    fsync_directory(destination.parent)
    logger.info("published %s", destination)
    return destination


def load_model_with_fallback(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], Path]:
    """Load the served model ``path``, or the previous one if ``path`` cannot be used.

    Args:
        path: The served model file.
        map_location: Where tensors go.

    Returns:
        The payload and the file it came from (``path`` or its ``NAME.prev.pt``).

    Raises:
        FileNotFoundError: If neither file exists.
        CorruptModelError: If no existing file verifies; the message names both problems.
    """
    path = Path(path)
    previous = previous_model_path(path)
    try:
        return load_file(path, map_location), path
    except (CorruptModelError, FileNotFoundError) as error:
        if not previous.is_file():
            raise
        logger.error("%s cannot be used (%s); loading the previous model %s", path, error, previous)
        try:
            return load_file(previous, map_location), previous
        except CorruptModelError as previous_error:
            raise CorruptModelError(
                f"no usable model: {error}; previous model: {previous_error}"
            ) from previous_error


def method_state(method: nn.Module) -> dict[str, Any]:
    """The method's own state and optimisers (a critic and its RMSprop, EMA teachers, a pair
    sampler's position): what a warm-started retrain carries over (see :func:`warm_start`)."""
    return {
        "method": method.state_dict(),
        "auxiliary_optimizers": {
            name: optimizer.state_dict()
            for name, optimizer in method.auxiliary_optimizers().items()
        },
    }


def model_payload(
    config: TrainConfig, ensemble: nn.Module, weights: dict[str, torch.Tensor], state: Any
) -> dict[str, Any]:
    """What ``model.pt`` holds: the run's configuration, the ensemble's spec and ``weights``,
    the validation metrics, the epoch and ``trained_iterations``: the iterations trained by
    this run and the runs it continued (``None`` when one of those did not record it; the
    next retrain's ramps continue from it). ``state`` is the engine's ``TrainState``."""
    before = state.trained_before
    return {
        "trained_iterations": None if before is None else before + state.iterations_done,
        "config": config.to_dict(),
        "ensemble": {"spec": ensemble.spec, "state_dict": weights},
        "metrics": {
            "best_metric": state.best_metric,
            "best_epoch": state.best_epoch,
            **state.metrics,
        },
        "epoch": state.epoch,
        "created": time.time(),
    }


def save_checkpoint(
    path: str | Path,
    config: TrainConfig,
    ensemble: nn.Module,
    state: Any,
    training: dict[str, Any],
    method: nn.Module,
    best_weights: dict[str, torch.Tensor] | None,
) -> Path:
    """Write ``checkpoint.pt``: the model, every object with a ``state_dict`` in ``training``
    (optimiser, LR schedule, gradient scaler), the method's state and its own optimisers,
    the best weights so far and the engine's ``TrainState``."""
    payload = model_payload(config, ensemble, ensemble.state_dict(), state)
    payload.update({name: part.state_dict() for name, part in training.items()})
    payload.update(method_state(method))
    payload.update({"best_weights": best_weights, "state": state.to_dict()})
    return save_atomically(payload, path)


def restore_checkpoint(
    path: str | Path,
    config: TrainConfig,
    ensemble: nn.Module,
    training: dict[str, Any],
    method: nn.Module,
    map_location: str | torch.device = "cpu",
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Load ``checkpoint.pt`` into the run's objects (the inverse of :func:`save_checkpoint`).

    Returns:
        The saved ``TrainState`` fields and the best weights so far.
    """
    payload = load_file(path, map_location=map_location)
    if payload["config"] != config.to_dict():
        logger.warning("resuming with a configuration that differs from the checkpoint's")
    ensemble.load_state_dict(payload["ensemble"]["state_dict"])
    for name, part in training.items():
        part.load_state_dict(payload[name])
    method.load_state_dict(payload["method"])
    for name, optimizer in method.auxiliary_optimizers().items():
        optimizer.load_state_dict(payload["auxiliary_optimizers"][name])
    logger.info("resumed from %s at epoch %d", path, payload["state"]["epoch"])
    return payload["state"], payload["best_weights"]


def warm_start(
    model_path: str | Path, ensemble: nn.Module, map_location: str | torch.device = "cpu"
) -> dict[str, Any] | None:
    """Load a served model's weights into ``ensemble`` (its previous version if it cannot be
    read; see :func:`load_model_with_fallback`).

    Returns:
        The model file's payload (for :func:`continue_method`), or ``None``, with a warning,
        if no file could be read or its ensemble differs from ``ensemble``.
    """
    try:
        payload, source = load_model_with_fallback(model_path, map_location)
    except (CorruptModelError, FileNotFoundError) as error:
        logger.warning("not warm-starting: %s; training from scratch", error)
        return None
    if payload["ensemble"]["spec"] != ensemble.spec:
        logger.warning("not warm-starting from %s: its ensemble differs from this run's", source)
        return None
    ensemble.load_state_dict(payload["ensemble"]["state_dict"])
    logger.info("warm start from %s", source)
    return payload


def continue_method(payload: dict[str, Any], method: nn.Module, method_name: str) -> bool:
    """Load the method's own state that a served model's run left (:func:`method_state`) into
    ``method``, when that run used the same method: a retrain continues its critic, teachers
    and pair order instead of starting them afresh.

    Args:
        payload: A served model's payload, as :func:`warm_start` returns it.
        method: The run's method, attached to the warm-started ensemble.
        method_name: Its name.

    Returns:
        Whether the state was carried over (not from another method, from a model published
        before models carried it, or when it does not fit, e.g. another critic size).
    """
    carried = payload.get("method_state")
    if not carried or payload["config"].get("method") != method_name:
        return False
    try:
        method.load_state_dict(carried["method"])
        for name, optimizer in method.auxiliary_optimizers().items():
            optimizer.load_state_dict(carried["auxiliary_optimizers"][name])
    except (KeyError, RuntimeError, ValueError) as error:
        logger.warning("not continuing the method's state: it does not fit (%s)", error)
        return False
    logger.info("continuing the served model's %s state", method_name)
    return True


def publish_weights(
    path: str | Path,
    config: TrainConfig,
    ensemble: nn.Module,
    weights: dict[str, torch.Tensor],
    state: Any,
    method: nn.Module | None = None,
) -> Path:
    """Write ``model.pt`` with ``weights`` atomically (and the method's own state, for the
    next warm start to continue from, when ``method`` is given).

    Raises:
        FloatingPointError: If a weight is NaN or infinite (nothing is written).
    """
    broken = [
        name
        for name, tensor in weights.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if broken:
        raise FloatingPointError(
            f"not publishing {Path(path).name}: {len(broken)} weight tensors hold NaN or "
            f"infinite values (e.g. {broken[0]})"
        )
    payload = model_payload(config, ensemble, weights, state)
    if method is not None:
        payload["method_state"] = method_state(method)
    return save_atomically(payload, path)
