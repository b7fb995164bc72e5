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
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import name_to_device

from cotrain.checkpoint import MODEL_FILE, publish_model
from cotrain.config import TrainConfig
from cotrain.engine import Trainer
from cotrain.files import write_json_atomically
from cotrain.input_checks import check_cases
from cotrain.launch import process_count, train_in_processes
from cotrain.methods import METHOD_CLASSES
from cotrain.schedules import split_validation
from lib.settings import parse_bool
from lib.trainers.fault_injection import FaultInjector, requested_fault
from lib.trainers.stats import STATS_FILE, TrainStatsWriter, process_start_time, read_train_stats

logger = logging.getLogger(__name__)

#: Verdicts of earlier image and label checks (see :func:`cotrain.input_checks.check_cases`).
CASE_CHECKS_FILE = "case_checks.json"


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


class CoTrainTask(TrainTask):
    """MONAI Label train task running :class:`cotrain.engine.Trainer`.

    Request keys (all optional): ``max_epochs`` (or ``epochs``), ``pretrained`` (warm start
    from the served model, default true), ``val_split``, ``device``, ``time_budget_minutes``
    (this run's wall-time bound; 0: none; by default the model's ``retrain_minutes`` for a warm
    start and ``first_train_minutes`` otherwise), ``supervised_warmup_iterations`` (for the
    methods with unlabeled terms; by default the model's, else its device's), and MONAI Label's
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
        budget_minutes: A run's default time budget from its device type and whether it
            warm-starts (:meth:`lib.settings.ModelSettings.budget_minutes`); none by default.
        device_settings: The TrainConfig settings whose default depends on the run's device
            type (:meth:`lib.settings.ModelSettings.device_settings`); none by default.
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
        budget_minutes: Callable[[str, bool], float] | None = None,
        device_settings: Callable[[str], dict[str, Any]] | None = None,
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
        self.budget_minutes = budget_minutes or (lambda device_type, warm_start: 0.0)
        self.device_settings = device_settings or (lambda device_type: {})
        self.stats_path = self.work_dir / STATS_FILE

    def config(self) -> dict[str, Any]:
        """Options a client may change per run (Slicer shows them as train options)."""
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        warmup = {}
        if METHOD_CLASSES[self.train_config.method].uses_unlabeled:  # the baseline has none
            warmup["supervised_warmup_iterations"] = self.run_config(
                {}, device_type
            ).supervised_warmup_iterations
        return {
            "max_epochs": self.train_config.epochs,
            "time_budget_minutes": self.budget_minutes(device_type, self.model_path.exists()),
            **warmup,
            "pretrained": True,
            "val_split": self.val_split,
            "multi_gpu": True,
            "gpus": "all",
        }

    def info(self) -> dict[str, Any]:
        """``/info`` entry: description, options and labels."""
        return {**super().info(), "labels": dict(self.train_config.labels)}

    def stats(self) -> dict[str, Any]:
        """The latest stats written by a run (see :func:`lib.trainers.stats.read_train_stats`)."""
        return read_train_stats(self.stats_path)

    def run_config(
        self, request: dict[str, Any], device_type: str = "cpu", warm_start: bool = False
    ) -> TrainConfig:
        """This run's configuration: the model's with its device's settings, and the request's
        epochs, time budget and supervised warm-up.

        Args:
            request: The train request.
            device_type: ``"cuda"`` or ``"cpu"`` (the default budget and warm-up depend on it).
            warm_start: Whether the run starts from the served model (a retrain).
        """
        values = {**self.train_config.to_dict(), **self.device_settings(device_type)}
        epochs = request.get("max_epochs", request.get("epochs"))
        if epochs is not None:
            values["epochs"] = int(epochs)
        warmup = request.get("supervised_warmup_iterations")
        if warmup is not None:
            values["supervised_warmup_iterations"] = int(warmup)
        budget = request.get("time_budget_minutes")
        values["time_budget_minutes"] = float(
            budget if budget is not None else self.budget_minutes(device_type, warm_start)
        )
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
            pretrained = parse_bool(request.get("pretrained", True))
            init_model = self.model_path if pretrained and self.model_path.exists() else None
            device = torch.device(name_to_device(request.get("device")))
            config = self.run_config(request, device.type, init_model is not None)
            fault = requested_fault(request, self.test_fault_injection)
            writer.info.update(
                {
                    "method": config.method,
                    "total_epochs": config.epochs,
                    "time_budget_minutes": config.time_budget_minutes,
                    "supervised_warmup_iterations": config.supervised_warmup_iterations,
                }
            )
            train, validation, unlabeled = self._cases(request, datastore, config, writer)

            processes, gpus = process_count(
                device.type,
                int(request.get("processes", self.processes)),
                parse_bool(request.get("multi_gpu", True)),
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
        # Said before reading: a label saved after this may be missed by this run, so the
        # scheduler queues a follow-up run for it (see lib/scheduler.py).
        writer.info["reading_labels_ts"] = time.time()
        writer.write(None)
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
        train, validation = split_validation(labeled, val_split, self.val_min_labels)
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
