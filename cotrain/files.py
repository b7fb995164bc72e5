"""File helpers shared by the library and the app: atomic writes and copies, strict JSON,
NIfTI names, and whether a path stays inside a folder."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "NIFTI_SUFFIXES",
    "atomic_copy",
    "atomic_write",
    "fsync_directory",
    "is_inside",
    "json_safe",
    "nifti_name",
    "write_json_atomically",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def fsync_directory(folder: str | Path) -> None:
    """Flush a folder's entries (e.g. a rename into it) to disk; a no-op where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it onto ``path``.

    Readers see the old file or the complete new one, never a partial write; on an error the
    temporary file is removed and ``path`` is left as it was. The temporary file's name starts
    with a dot and ends with ``.tmp``, so folder scans for ``*.nii.gz`` or ``*.json`` skip it.

    Args:
        path: Destination; its folder is created if missing.
        mode: ``"wb"`` or ``"w"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_copy(source: str | Path, destination: str | Path) -> Path:
    """Copy ``source`` to ``destination`` with :func:`atomic_write` (all or nothing).

    Returns:
        ``destination`` as a ``Path``.
    """
    destination = Path(destination)
    with open(source, "rb") as src, atomic_write(destination, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return destination


def nifti_name(path: str | Path) -> str | None:
    """The case name of a NIfTI file (file name without ``.nii``/``.nii.gz``), or ``None``
    for other files and hidden ones (e.g. macOS ``._case.nii.gz`` forks in MSD archives)."""
    name = Path(path).name
    if name.startswith("."):
        return None
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, after resolving ``..`` and links."""
    resolved = Path(os.path.realpath(path))
    root = Path(os.path.realpath(folder))
    return resolved == root or root in resolved.parents


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: tuples as lists, NaN and infinite floats as ``None`` (strict
    JSON readers reject them), one-element tensors as numbers, keys as strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        return json_safe(value.item())  # a torch tensor, without importing torch here
    return value


def write_json_atomically(data: Any, path: str | Path) -> None:
    """Write ``data`` as strict JSON (:func:`json_safe`) to ``path`` with :func:`atomic_write`."""
    with atomic_write(path, "w") as f:
        json.dump(json_safe(data), f, indent=2)
