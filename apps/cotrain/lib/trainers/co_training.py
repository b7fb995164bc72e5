"""Train task: co-train the ensemble on the submitted labels plus every unlabeled image.

MONAI Label runs a train task in a subprocess (``monailabel.interfaces.utils.app -m train``),
one at a time. The server reads the task's progress from ``train_stats.json`` (``stats()``,
shown in ``/info`` and by Slicer's progress bar), which this task rewrites atomically while it
runs. Each run trains into its own folder ``WORK_DIR/runs/RUN_ID``; only when the library
has written that run's ``model.pt`` is it published over the served model with
:func:`cotrain.checkpoint.publish_model` (verified, previous model kept as ``NAME.prev.pt``,
one rename), so every member is published together and a failed or stopped run leaves the
served model as it was.

What can go wrong, and what the stats then say:

- an image or label that cannot be used (unreadable, 2D, empty, wrong grid, bad values): the
  case is skipped, with its reason in the log and under ``skipped`` in the stats;
- an exception or a NaN loss: ``status`` ``FAILED`` with the reason under ``error``; the
  subprocess exits non-zero, so MONAI Label's train task reads ``ERROR`` with the same reason
  in its last output lines;
- the subprocess killed (SIGKILL, out of memory, server stopped): it cannot write anything,
  so :meth:`CoTrainTask.stats` reports ``FAILED`` once the process recorded in the stats
  (``pid``) no longer runs.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import name_to_device

from cotrain.checkpoint import MODEL_FILE, publish_model
from cotrain.config import TrainConfig
from cotrain.engine import TrainCallback, Trainer, TrainState
from cotrain.files import atomic_write
from cotrain.input_checks import check_cases
from cotrain.launch import process_count, train_in_processes
from lib.trainers.fault_injection import FaultInjector, requested_fault

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"
#: Verdicts of earlier image and label checks (see :func:`cotrain.input_checks.check_cases`).
CASE_CHECKS_FILE = "case_checks.json"


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


def _json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by ``None`` (strict JSON readers reject them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _describe(error: BaseException) -> str:
    """``Type: message`` of an error and of the errors that caused it."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = getattr(current, "msg", None) or str(current)  # MONAILabelException: msg
        parts.append(f"{type(current).__name__}: {message}")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


def request_flag(request: dict[str, Any], key: str, default: bool) -> bool:
    """A yes/no train option: JSON booleans, or strings such as ``"true"``/``"false"``."""
    value = request.get(key, default)
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def write_json_atomically(data: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` as JSON to a temporary file beside ``path`` and rename it into place."""
    with atomic_write(path, "w") as f:
        json.dump(_json_safe(data), f, indent=2)


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


def split_validation(
    labeled: list[dict[str, str]], val_split: float, val_min_labels: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Hold out ``val_split`` of the labeled cases for validation, once there are enough.

    Args:
        labeled: Labeled cases.
        val_split: Fraction to hold out (0 disables validation).
        val_min_labels: Hold out nothing below this many labeled cases.
        seed: Seed of the (reproducible) choice.

    Returns:
        ``(train, validation)``; at least one case stays for training.
    """
    if val_split <= 0 or len(labeled) < max(val_min_labels, 2):
        return list(labeled), []
    count = min(max(1, round(len(labeled) * val_split)), len(labeled) - 1)
    order = list(range(len(labeled)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    train = [c for i, c in enumerate(labeled) if i not in held_out]
    validation = [c for i, c in enumerate(labeled) if i in held_out]
    return train, validation


class CoTrainTask(TrainTask):
    """MONAI Label train task running :class:`cotrain.engine.Trainer`.

    Request keys (all optional): ``max_epochs`` (or ``epochs``), ``pretrained`` (warm start
    from the served model, default true), ``val_split``, ``device``, and MONAI Label's
    multi-GPU options ``multi_gpu`` (default true: one process per GPU when there are several)
    and ``gpus`` (``"all"`` or indices such as ``"0,1"``), plus ``processes`` (a number of
    processes; on CPU, N > 1 trains with N gloo processes, the multi-GPU code path).

    Args:
        name: Model name.
        model_path: The served ensemble file.
        work_dir: Folder for run folders and ``train_stats.json``.
        train_config: Training configuration of this model.
        val_split: Default fraction of labels held out for validation.
        val_min_labels: Least number of labels before any is held out.
        keep_runs: Run folders kept (the newest); older ones are removed at the next run.
        processes: Default number of training processes (0: one per GPU, see
            :func:`cotrain.launch.process_count`).
        description: ``/info`` description.
        test_fault_injection: TEST HOOK: honour ``test_fault`` in train requests (see
            :mod:`lib.trainers.fault_injection`).
    """

    def __init__(
        self,
        name: str,
        model_path: str,
        work_dir: str,
        train_config: TrainConfig,
        val_split: float = 0.2,
        val_min_labels: int = 5,
        keep_runs: int = 2,
        processes: int = 0,
        description: str = "",
        test_fault_injection: bool = False,
    ) -> None:
        super().__init__(description or f"Co-train {name}")
        self.name = name
        self.model_path = Path(model_path)
        self.work_dir = Path(work_dir)
        self.train_config = train_config
        self.val_split = val_split
        self.val_min_labels = val_min_labels
        self.keep_runs = keep_runs
        self.processes = processes
        self.test_fault_injection = test_fault_injection
        self.stats_path = self.work_dir / STATS_FILE

    def config(self) -> dict[str, Any]:
        """Options a client may change per run (Slicer shows them as train options)."""
        return {
            "max_epochs": self.train_config.epochs,
            "pretrained": True,
            "val_split": self.val_split,
            "multi_gpu": True,
            "gpus": "all",
        }

    def info(self) -> dict[str, Any]:
        """``/info`` entry: description, options and labels."""
        return {**super().info(), "labels": dict(self.train_config.labels)}

    def stats(self) -> dict[str, Any]:
        """The latest stats written by a run (empty before any run).

        A run whose process ended without writing its outcome (killed, or the server stopped
        during training) is reported ``FAILED`` with the reason; the file is left for the next
        run to overwrite.
        """
        try:
            with open(self.stats_path) as f:
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

    def run_config(self, request: dict[str, Any]) -> TrainConfig:
        """This run's configuration: the model's, with the request's epochs."""
        values = self.train_config.to_dict()
        epochs = request.get("max_epochs", request.get("epochs"))
        if epochs is not None:
            values["epochs"] = int(epochs)
        return TrainConfig.from_dict(values)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Train on the datastore's final labels and unlabeled images, then publish.

        Images and labels that cannot be used are skipped (``skipped`` in the stats says
        why). Any failure is written to the stats (``FAILED`` and ``error``) and re-raised.

        Args:
            request: Train request (see the class docstring).
            datastore: The studies.

        Returns:
            The final train stats.

        Raises:
            MONAILabelException: If there is no usable final label to train on.
            Exception: Whatever the training raised; the served model is then unchanged.
        """
        logger.info("train request for %s: %s", self.name, request)
        run_id = datetime.datetime.now().strftime("%Y%m%d_%H%M%S_%f")
        writer = TrainStatsWriter(
            self.stats_path,
            {
                "name": self.name,
                "run_id": run_id,
                "pid": os.getpid(),
                "pid_started": process_start_time(),
            },
        )
        writer.write(None)
        trainer: Trainer | None = None
        try:
            config = self.run_config(request)
            fault = requested_fault(request, self.test_fault_injection)
            writer.info.update({"method": config.method, "total_epochs": config.epochs})
            train, validation, unlabeled = self._cases(request, datastore, config, writer)

            pretrained = request_flag(request, "pretrained", True)
            init_model = self.model_path if pretrained and self.model_path.exists() else None
            device = torch.device(name_to_device(request.get("device")))
            processes, gpus = process_count(
                device.type,
                int(request.get("processes", self.processes)),
                request_flag(request, "multi_gpu", True),
                request.get("gpus", "all"),
            )
            writer.info.update(
                {
                    "warm_start": init_model is not None,
                    "device": str(device),
                    "processes": processes,
                }
            )
            writer.write(None)

            run_dir = self.work_dir / "runs" / run_id
            self._remove_old_runs(run_dir.parent)
            logger.info(
                "%s: run %s on %s x %d: %d labeled, %d validation, %d unlabeled; warm start: %s",
                self.name,
                run_id,
                device,
                processes,
                len(train),
                len(validation),
                len(unlabeled),
                init_model,
            )
            trainer_kwargs = {
                "config": config,
                "labeled": train,
                "unlabeled": unlabeled,
                "output_dir": run_dir,
                "validation": validation or None,
                "callbacks": [writer],
                "init_model": init_model,
            }
            if processes > 1:
                if fault is not None:
                    raise ValueError("test_fault needs a single training process")
                state = train_in_processes(processes, trainer_kwargs, device.type, gpus)
            else:
                trainer = Trainer(**trainer_kwargs, device=device)
                if fault is not None:
                    trainer.callbacks.append(FaultInjector(fault, trainer))
                state = trainer.fit()
            published = publish_model(run_dir / MODEL_FILE, self.model_path)
        except BaseException as e:
            reason = _describe(e)
            writer.write(trainer.state if trainer else None, status="FAILED", error=reason)
            logger.error(
                "%s: run %s failed; the served model is unchanged: %s", self.name, run_id, reason
            )
            raise
        return writer.write(state, status="DONE", published=str(published))

    def _cases(
        self,
        request: dict[str, Any],
        datastore: Datastore,
        config: TrainConfig,
        writer: TrainStatsWriter,
    ) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
        """The usable ``(train, validation, unlabeled)`` cases; the others are logged and
        listed in the stats under ``skipped`` (image file name -> reason).

        Raises:
            MONAILabelException: If no usable final label is left.
        """
        labeled = sorted(datastore.datalist(), key=lambda c: c["image"])
        labeled_images = {c["image"] for c in labeled}
        unlabeled = [
            {"image": uri}
            for uri in sorted(datastore.get_image_uri(i) for i in datastore.get_unlabeled_images())
            if uri and uri not in labeled_images
        ]
        checks_path = self.work_dir / CASE_CHECKS_FILE
        try:
            known = json.loads(checks_path.read_text())
        except (OSError, ValueError):
            known = {}
        dims = config.spatial_dims
        labeled, skipped, verdicts = check_cases(labeled, config.labels, dims, known)
        unlabeled, skipped_unlabeled, unlabeled_verdicts = check_cases(unlabeled, None, dims, known)
        skipped.update(skipped_unlabeled)
        write_json_atomically({**verdicts, **unlabeled_verdicts}, checks_path)
        skipped_names = {os.path.basename(image): reason for image, reason in skipped.items()}
        for name, reason in skipped_names.items():
            logger.warning("%s: skipping %s: %s", self.name, name, reason)
        writer.info["skipped"] = skipped_names
        if not labeled:
            message = f"{self.name}: no final labels in the datastore; submit at least one label"
            if skipped_names:
                detail = "; ".join(f"{k}: {v}" for k, v in skipped_names.items())
                message = f"{self.name}: no usable final labels (skipped: {detail})"
            raise MONAILabelException(MONAILabelError.APP_TRAIN_FAILED, message)
        val_split = float(request.get("val_split", self.val_split))
        train, validation = split_validation(labeled, val_split, self.val_min_labels, config.seed)
        writer.info.update(
            {"labeled": len(train), "validation": len(validation), "unlabeled": len(unlabeled)}
        )
        return train, validation, unlabeled

    def _remove_old_runs(self, runs_dir: Path) -> None:
        """Keep the newest ``keep_runs - 1`` run folders, making room for the new one."""
        if not runs_dir.is_dir():
            return
        runs = sorted(p for p in runs_dir.iterdir() if p.is_dir())
        for old in runs[: max(0, len(runs) - max(self.keep_runs - 1, 0))]:
            shutil.rmtree(old, ignore_errors=True)
