"""Retrain on submit: at most one training running and at most one pending per model.

MONAI Label runs train tasks one at a time: ``AsyncTask.run("train", enqueue=True)`` puts a
task (status ``SUBMITTED``) in a single-worker queue; the worker turns it ``RUNNING`` when it
starts its subprocess, which reads the datastore a few seconds later (once it has started
and reported ``reading_labels_ts`` in its train stats). So a label saved while a task of the
model is still ``SUBMITTED``, or ``RUNNING`` but not yet reading labels, will be seen by that
task, and another task would add nothing: the request is *coalesced* (a radiologist who submits
two labels in a row gets one retrain, not two). Otherwise (nothing queued; a run may be going on) one task
is queued, which trains on everything submitted up to its start. No label is missed, and
bursts of submits cost one follow-up run, not one run each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

#: Outcomes of :meth:`TrainScheduler.request`, per model.
STARTED = "started"  # queued with nothing running: starts now
QUEUED = "queued"  # queued behind a running training
COALESCED = "coalesced"  # a pending training of the model already covers this request


def monailabel_train_tasks() -> list[dict[str, Any]]:
    """Every train task the MONAI Label server knows (status, request, ...)."""
    from monailabel.utils.async_tasks.task import AsyncTask

    tasks, _ = AsyncTask.status("train", all=True)
    return list(tasks or [])


def task_model(task: Mapping[str, Any]) -> str | None:
    """The model a MONAI Label train task trains (``request.model``)."""
    request = task.get("request")
    return request.get("model") if isinstance(request, Mapping) else None


class TrainScheduler:
    """Decides, for each label submit, whether a model needs another training run.

    Args:
        submit: Queues one training run of the named model (e.g. the app's
            ``async_training(model, enqueue=True)``).
        list_tasks: Returns the known train tasks as MONAI Label reports them: dicts with
            ``status`` (``SUBMITTED``, ``RUNNING``, ``DONE``, ``ERROR``, ``STOPPED``) and
            ``request`` (with ``model``).
        reading_labels: Whether the running training of a model has begun reading the labels
            (from its train stats); while it has not, it will see a label saved now. Always
            ``True`` by default (a running training never covers a new label).
    """

    def __init__(
        self,
        submit: Callable[[str], Any],
        list_tasks: Callable[[], list[dict[str, Any]]] = monailabel_train_tasks,
        reading_labels: Callable[[str], bool] = lambda model: True,
    ) -> None:
        self._submit = submit
        self._list_tasks = list_tasks
        self._reading_labels = reading_labels
        self._lock = threading.Lock()

    def status(self, model: str) -> tuple[bool, bool]:
        """``(running, pending)`` for ``model``: a run of it is going on / waiting to start."""
        tasks = [t for t in self._list_tasks() if task_model(t) == model]
        running = any(t.get("status") == "RUNNING" for t in tasks)
        pending = any(t.get("status") == "SUBMITTED" for t in tasks)
        return running, pending

    def request(self, models: Iterable[str]) -> dict[str, str]:
        """Ask for a training run of each model that covers every label saved so far.

        Args:
            models: Models to (re)train.

        Returns:
            Model -> :data:`STARTED`, :data:`QUEUED` or :data:`COALESCED`.
        """
        outcome: dict[str, str] = {}
        with self._lock:
            for model in models:
                running, pending = self.status(model)
                if pending or (running and not self._reading_labels(model)):
                    outcome[model] = COALESCED
                    continue
                busy = any(t.get("status") in ("RUNNING", "SUBMITTED") for t in self._list_tasks())
                self._submit(model)
                outcome[model] = QUEUED if busy else STARTED
        if outcome:
            logger.info("training requests: %s", outcome)
        return outcome
