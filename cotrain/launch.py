"""Run one training in several local processes: one per GPU, or gloo processes on CPU.

This is the in-process counterpart of ``torchrun --nproc_per_node=N -m cotrain train``. The
MONAI Label train task uses it so that a server with several GPUs trains on all of them, the
way MONAI Label's own ``BasicTrainTask`` does (``torch.multiprocessing.spawn``, one process per
GPU). Each process runs :class:`cotrain.engine.Trainer` with the same arguments; the engine
averages gradients over the processes and lets rank 0 alone report, validate and publish (see
:mod:`cotrain.distributed`).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from cotrain.distributed import init_from_environment, is_main_process, shutdown
from cotrain.engine import Trainer, TrainState

logger = logging.getLogger(__name__)

__all__ = ["free_port", "gpu_ids", "process_count", "train_in_processes"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the process group's rendezvous needs a real
    port: port 0 cannot be shared between processes)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def gpu_ids(gpus: str | None = "all") -> list[int]:
    """The CUDA devices named by ``gpus``.

    Args:
        gpus: ``"all"`` (or empty) for every visible device, or indices such as ``"0,2"``
            (MONAI Label's ``gpus`` train option).

    Returns:
        Device indices; empty without CUDA.

    Raises:
        ValueError: If an index is not a number or names a device that does not exist.
    """
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus or str(gpus).strip().lower() == "all":
        return list(range(available))
    try:
        ids = [int(g) for g in str(gpus).split(",") if g.strip()]
    except ValueError as e:
        raise ValueError(f"gpus {gpus!r}: expected 'all' or indices such as '0,1'") from e
    missing = [g for g in ids if not 0 <= g < available]
    if missing:
        raise ValueError(f"gpus {gpus!r}: no CUDA device {missing} ({available} visible)")
    return ids


def process_count(
    device_type: str, processes: int = 0, multi_gpu: bool = True, gpus: str | None = "all"
) -> tuple[int, list[int]]:
    """How many processes to train with, and on which GPUs.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.
        processes: Requested number of processes; 0 chooses: one per GPU named by ``gpus`` on
            CUDA when ``multi_gpu`` is on, else 1. On CPU, N > 1 runs N gloo processes (the
            same code path as several GPUs, which is how it is tested).
        multi_gpu: Whether several GPUs may be used.
        gpus: GPUs to use (see :func:`gpu_ids`).

    Returns:
        ``(count, gpu indices)``; the indices are empty on CPU.

    Raises:
        ValueError: If ``processes`` is negative or asks for more GPUs than are named.
    """
    if processes < 0:
        raise ValueError(f"processes must be >= 0, got {processes}")
    if device_type != "cuda":
        return max(processes, 1), []
    ids = gpu_ids(gpus) if multi_gpu else gpu_ids(gpus)[:1]
    if processes > len(ids):
        raise ValueError(
            f"processes {processes}: only {len(ids)} GPU(s) available ({gpus=}, {multi_gpu=})"
        )
    count = processes or max(len(ids), 1)
    return count, ids[:count]


def _exit_when_orphaned(parent_pid: int) -> None:
    """End this worker if its parent dies (a killed train task must not leave GPUs busy)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(2.0)
        logger.error("training parent process %d is gone; worker exits", parent_pid)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _worker(
    local_rank: int,
    world_size: int,
    port: int,
    trainer_kwargs: dict[str, Any],
    device_type: str,
    state_file: str,
    parent_pid: int,
    log_level: int,
) -> None:
    """One process of :func:`train_in_processes` (``torch.multiprocessing.spawn`` target)."""
    # A spawned process starts without the parent's logging set-up: log the same way, to the
    # same stderr (the server's log), so rank 0's epoch lines are seen.
    logging.basicConfig(
        level=log_level,
        format=f"[%(asctime)s] [%(process)d] [rank {local_rank}] [%(levelname)s] (%(name)s) - %(message)s",
    )
    _exit_when_orphaned(parent_pid)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    if device_type == "cpu":  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    device = init_from_environment(device_type)
    try:
        state = Trainer(**trainer_kwargs, device=device).fit()
        if is_main_process():
            with open(state_file, "wb") as f:
                pickle.dump(state, f)
    finally:
        shutdown()


def train_in_processes(
    num_processes: int,
    trainer_kwargs: Mapping[str, Any],
    device_type: str = "cuda",
    gpus: list[int] | None = None,
) -> TrainState:
    """Train with ``num_processes`` local processes and return rank 0's final state.

    Args:
        num_processes: Number of processes (one per GPU on CUDA).
        trainer_kwargs: :class:`cotrain.engine.Trainer` arguments except ``device``; they and
            the callbacks among them are pickled to every process, and only rank 0's callbacks
            are called.
        device_type: ``"cuda"`` (NCCL, process i on ``gpus[i]``) or ``"cpu"`` (gloo).
        gpus: CUDA device indices, one per process (default ``0..num_processes-1``).

    Returns:
        The final :class:`cotrain.engine.TrainState` of rank 0.

    Raises:
        torch.multiprocessing.ProcessRaisedException: With the failing process's traceback
            if any process raised; the other processes are then terminated.
        torch.multiprocessing.ProcessExitedException: If a process died (killed, out of memory).
    """
    environment = dict(os.environ)
    if device_type == "cuda" and gpus:
        # Children see only their GPUs, numbered 0..n-1 (LOCAL_RANK picks one).
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        physical = visible.split(",") if visible else [str(g) for g in range(max(gpus) + 1)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical[g] for g in gpus)
    logger.info("training in %d %s processes", num_processes, device_type)
    try:
        with tempfile.TemporaryDirectory(prefix="cotrain-spawn-") as tmp:
            state_file = str(Path(tmp) / "state.pkl")
            mp.spawn(
                _worker,
                nprocs=num_processes,
                args=(
                    num_processes,
                    free_port(),
                    dict(trainer_kwargs),
                    device_type,
                    state_file,
                    os.getpid(),
                    logging.getLogger().getEffectiveLevel(),
                ),
                join=True,
            )
            with open(state_file, "rb") as f:
                return pickle.load(f)
    finally:
        os.environ.clear()
        os.environ.update(environment)
