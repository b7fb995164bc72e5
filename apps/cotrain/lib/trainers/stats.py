"""Train stats: the file through which a training process reports its progress to the server.

MONAI Label runs a train task in a subprocess; the server reads the task's progress from
``train_stats.json`` (``stats()``, shown in ``/info`` and by Slicer's progress bar).
:class:`TrainStatsWriter` rewrites it atomically while the run goes on; :func:`read_train_stats`
reads it back and reports a run whose process died without writing its outcome as ``FAILED``.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path
from typing import Any

import psutil

from cotrain.engine import TrainCallback, TrainState
from cotrain.files import write_json_atomically

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"


def process_start_time(pid: int | None = None) -> float:
    """When process ``pid`` (default: this one) started, in seconds since the epoch."""
    return psutil.Process(pid).create_time()


def process_running(pid: Any, started: Any) -> bool:
    """Whether process ``pid`` that started at ``started`` still runs (not a reused pid, not a
    zombie)."""
    try:
        process = psutil.Process(int(pid))
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - float(started)) < 1.0
    except (psutil.Error, TypeError, ValueError):
        return False


def read_train_stats(path: str | Path) -> dict[str, Any]:
    """The latest stats written by a run (empty before any run).

    A run whose process ended without writing its outcome (killed, or the server stopped
    during training) is reported ``FAILED`` with the reason; the file is left for the next
    run to overwrite.
    """
    try:
        with open(path) as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return {}
    if stats.get("status") == "RUNNING" and not process_running(
        stats.get("pid"), stats.get("pid_started")
    ):
        stats["status"] = "FAILED"
        stats["error"] = (
            f"the training process (pid {stats.get('pid')}) ended without reporting a "
            "result: it was killed (e.g. SIGKILL or out of memory) or the server stopped "
            "during training; the served model is unchanged"
        )
        stats["total_time"] = stats.pop("current_time", "0:00:00")
    return stats


class TrainStatsWriter(TrainCallback):
    """Keeps ``train_stats.json`` up to date with the library's training state.

    The keys MONAI Label clients read are ``epoch``, ``total_epochs``, ``best_metric`` and
    ``total_time`` (present only once the run ended; Slicer treats it as "finished"). The
    file also holds the loss terms, each member's validation Dice, the soft vote's Dice and
    the members' disagreement (mean Jensen-Shannon divergence; 0 is full agreement).

    Args:
        path: The stats file.
        info: Constant fields of this run (model, run id, data counts, ...).
        min_interval_s: Least time between two writes within an epoch.
    """

    def __init__(self, path: str | Path, info: dict[str, Any], min_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.info = dict(info)
        self.min_interval_s = min_interval_s
        self.start_ts = time.time()
        self._last_write = 0.0

    def stats(
        self, state: TrainState | None, status: str, in_epoch: bool = False
    ) -> dict[str, Any]:
        """The stats dict for ``state`` (``None``: before the first epoch).

        ``progress`` (0..1) counts iterations: ``state.iteration`` belongs to the epoch
        after ``state.epoch`` while it runs (``in_epoch``), and is complete at epoch end.
        """
        elapsed = int(time.time() - self.start_ts)
        stats: dict[str, Any] = {
            **self.info,
            "status": status,
            "start_ts": int(self.start_ts),
            "elapsed_s": round(time.time() - self.start_ts, 1),
            "epoch": 0,
            "total_epochs": self.info.get("total_epochs", 0),
            "best_metric": 0.0,
            "best_metric_epoch": 0,
            "progress": 0.0,
        }
        if state is not None:
            metrics = dict(state.metrics)
            total = max(state.total_epochs * state.iterations_per_epoch, 1)
            done = state.epoch * state.iterations_per_epoch + (state.iteration if in_epoch else 0)
            stats.update(
                {
                    "epoch": state.epoch,
                    "total_epochs": state.total_epochs,
                    "iteration": state.iteration,
                    "iterations_per_epoch": state.iterations_per_epoch,
                    "progress": round(min(done / total, 1.0), 4),
                    # The planned length (a time budget may have shortened the run) and when
                    # it should end at the speed measured so far.
                    "planned_iterations": total,
                    "expected_end_ts": (
                        int(time.time() + state.elapsed_s * (total - done) / done) if done else None
                    ),
                    # -1 means "not validated yet" in the library; clients show 0..1.
                    "best_metric": max(float(state.best_metric), 0.0),
                    "best_metric_epoch": state.best_epoch,
                    "losses": dict(state.losses),
                    "vote_dice": metrics.get("vote_dice"),
                    "member_dice": metrics.get("member_dice"),
                    "disagreement": metrics.get("disagreement"),
                    "metrics": metrics,
                }
            )
        key = "current_time" if status == "RUNNING" else "total_time"
        stats[key] = str(datetime.timedelta(seconds=elapsed))
        return stats

    def write(
        self,
        state: TrainState | None,
        status: str = "RUNNING",
        in_epoch: bool = False,
        **extra: Any,
    ) -> dict[str, Any]:
        """Write the stats file now and return what was written."""
        stats = {**self.stats(state, status, in_epoch), **extra}
        write_json_atomically(stats, self.path)
        self._last_write = time.monotonic()
        return stats

    def on_train_start(self, state: TrainState) -> None:
        self.write(state)

    def on_iteration_end(self, state: TrainState) -> None:
        if time.monotonic() - self._last_write >= self.min_interval_s:
            self.write(state, in_epoch=True)

    def on_epoch_end(self, state: TrainState) -> None:
        self.write(state)
        losses = ", ".join(f"{k}={v:.4f}" for k, v in state.losses.items() if "/" not in k)
        logger.info(
            "epoch %d/%d: %s; best vote Dice %.4f",
            state.epoch,
            state.total_epochs,
            losses,
            state.best_metric,
        )
