"""Multi-process training with torch.distributed (one process per GPU, or gloo on CPU).

Launch with ``torchrun --nproc_per_node=N -m cotrain train ...``. Every process builds the same
ensemble (same seeds), draws different patches (its rank offsets the data seeds), and after each
backward pass the gradients are averaged over processes, which is the computation of
``DistributedDataParallel``. Modules are not wrapped in DDP because DCT-Seg's adversarial steps
differentiate members with respect to their inputs only, which DDP's reducer does not allow.
Rank 0 alone validates, writes checkpoints and publishes the model.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "agree_with_main_process",
    "all_reduce_gradients",
    "check_replicas_identical",
    "init_from_environment",
    "is_main_process",
    "rank",
    "shutdown",
    "world_size",
]


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0, the process that validates, saves and reports."""
    return rank() == 0


def init_from_environment(device: str | None = None) -> torch.device | None:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Args:
        device: Requested device type (``"cuda"``/``"cpu"``), or ``None`` for CUDA when present.

    Returns:
        This process's device when running distributed (``cuda:LOCAL_RANK`` or CPU), else ``None``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def all_reduce_gradients(module: nn.Module) -> None:
    """Average every parameter's gradient over processes (no-op in a single process)."""
    size = world_size()
    if size == 1:
        return
    for parameter in module.parameters():
        if parameter.grad is None:  # keep every process issuing the same collectives
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad.div_(size)


def agree_with_main_process(values: list[int], device: torch.device) -> list[int]:
    """The main process's ``values`` in every process (as they are, in a single process).

    Args:
        values: Integers each process computed (e.g. a planned run length from its own clock).
        device: Where the collective's tensor lives (a CUDA device for NCCL).
    """
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return [int(v) for v in tensor.tolist()]


def check_replicas_identical(module: nn.Module) -> None:
    """Raise ``RuntimeError`` if the processes' copies of ``module`` have drifted apart.

    Compares a float64 checksum of all parameters across processes (no-op in a single process).
    """
    if world_size() == 1:
        return
    checksum = (
        torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
    )
    gathered = [torch.zeros_like(checksum) for _ in range(world_size())]
    dist.all_gather(gathered, checksum)
    values = [float(v) for v in gathered]
    if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
        raise RuntimeError(f"distributed replicas differ: parameter checksums {values}")


def shutdown() -> None:
    """Leave the process group (a gloo group left open aborts the process at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
