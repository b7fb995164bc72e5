"""``/cotrain`` endpoints: the co-training state and the retrain-on-submit switch at runtime.

MONAI Label's REST API has no way to change an app setting while the server runs. These
endpoints add one for ``auto_train`` (retrain on submit) and report what the stock API does
not: each model's method, switch and served model file (the 3D Slicer panel in
``plugins/slicer`` shows them beside MONAI Label's ``/info`` train stats).

- ``GET /cotrain/state``: every model's ``method``, ``members``, ``auto_train`` (and whether
  it comes from ``--conf`` or the runtime switch), ``min_labels``, ``served_model`` (file,
  published or not, modification time) and ``training``: ``running`` / ``pending`` (a run
  going on / waiting), ``status`` (``NOT STARTED``, ``QUEUED``, ``STARTING``, ``RUNNING``,
  ``DONE``, ``FAILED`` or ``STOPPED``; see :func:`training_status`), ``error`` (why the latest
  run failed or stopped, else ``null``) and ``task_status`` (MONAI Label's latest train task
  of the model: ``SUBMITTED``, ``RUNNING``, ``DONE``, ``ERROR``, ``STOPPED``; ``null`` if none).
- ``PUT /cotrain/auto_train?model=NAME&enabled=true|false``: turn retrain on submit on or off
  for one model; answers the model's new state.

The training status is worked out here, once, from what only the server knows together: the
model's train stats (``train_stats.json``, MONAI Label's ``/info`` ``train_stats``), MONAI
Label's own train tasks (``monailabel.utils.async_tasks``, what ``/train/`` answers) and the
scheduler's flags. Clients (the 3D Slicer panel) show it as is.

The switch is what :meth:`CoTrainApp.on_save_label` reads (``settings.auto_train`` of the
model's task config). It is saved in ``MODEL_DIR/NAME/runtime_settings.json`` (written
atomically) and restored when the app starts, so it outlives a server restart and wins over
``--conf auto_train``; delete the file to go back to ``--conf``.

MONAI Label creates the app inside its FastAPI ``lifespan`` (``monailabel.app``), after the
FastAPI instance exists, and then calls ``on_init_complete``: that is where
:func:`register_routes` adds the router. Train and scoring subprocesses create the app too,
but never import ``monailabel.app``, so no routes are added there. Requests find the app
through ``app_instance()``, like MONAI Label's own endpoints. With authentication on, reading
the state needs the user role and changing the switch the admin role (as starting training).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from monailabel.config import RBAC_ADMIN, RBAC_USER, settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from cotrain.files import write_json_atomically
from lib.configs import CoTrainTaskConfig
from lib.scheduler import monailabel_train_tasks, task_model

logger = logging.getLogger(__name__)

#: File in each model's work folder holding the settings changed at runtime.
RUNTIME_SETTINGS_FILE = "runtime_settings.json"
#: Path prefix of the endpoints.
ROUTE_PREFIX = "/cotrain"

#: Training statuses of ``GET /cotrain/state`` (``training.status``).
NOT_STARTED = "NOT STARTED"
QUEUED = "QUEUED"
STARTING = "STARTING"
RUNNING = "RUNNING"
DONE = "DONE"
FAILED = "FAILED"
STOPPED = "STOPPED"
#: The error reported for a run stopped with ``DELETE /train/``.
STOPPED_ERROR = "stopped by a user"

_write_lock = threading.Lock()


def runtime_settings_path(config: CoTrainTaskConfig) -> Path:
    """Where the runtime settings of a model are saved (``MODEL_DIR/NAME/runtime_settings.json``)."""
    return Path(config.work_dir) / RUNTIME_SETTINGS_FILE


def read_runtime_settings(path: Path) -> dict[str, Any]:
    """The saved runtime settings (empty if none; an unreadable file is logged and ignored)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable runtime settings %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def restore_runtime_settings(models: Mapping[str, CoTrainTaskConfig]) -> None:
    """Apply each model's saved ``auto_train`` switch over its ``--conf`` value."""
    for name, config in models.items():
        saved = read_runtime_settings(runtime_settings_path(config)).get("auto_train")
        if not isinstance(saved, bool):
            continue
        if saved != config.settings.auto_train:
            logger.info(
                "+++ %s: auto_train=%s, switched at runtime (%s); overrides --conf auto_train=%s",
                name,
                saved,
                runtime_settings_path(config),
                config.settings.auto_train,
            )
        config.settings.auto_train = saved


def set_auto_train(config: CoTrainTaskConfig, enabled: bool, user: str | None = None) -> None:
    """Turn retrain on submit on or off for one model: save the switch, then apply it.

    Raises:
        OSError: If the switch cannot be saved (the running setting is then unchanged).
    """
    path = runtime_settings_path(config)
    with _write_lock:
        saved = read_runtime_settings(path)
        saved.update(
            {
                "auto_train": bool(enabled),
                "auto_train_changed": datetime.datetime.now().astimezone().isoformat(),
                "auto_train_changed_by": user,
            }
        )
        write_json_atomically(saved, path)
        config.settings.auto_train = bool(enabled)
    logger.info("%s: auto_train set to %s by %s", config.name, enabled, user or "anonymous")


def served_model(config: CoTrainTaskConfig) -> dict[str, Any]:
    """The served ensemble file: name, whether one was published, modification time and size."""
    path = Path(config.path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {"file": path.name, "published": False}
    return {
        "file": path.name,
        "published": True,
        "modified_time": stat.st_mtime,
        "mtime_ns": stat.st_mtime_ns,
        "size": stat.st_size,
    }


def latest_train_task(model: str, tasks: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The latest of MONAI Label's train tasks (oldest first) that trains ``model``."""
    latest = None
    for task in tasks:
        if isinstance(task, Mapping) and task_model(task) == model:
            latest = task
    return latest


def _task_error(task: Mapping[str, Any]) -> str | None:
    """The last output line of a train task (``details``: a deque in the server, a list in
    ``/train/``'s answer)."""
    details = task.get("details")
    if details is None or isinstance(details, str | bytes):
        return None
    lines = [str(line) for line in list(details) if str(line).strip()]
    return lines[-1] if lines else None


def training_status(
    stats: Mapping[str, Any] | None,
    task: Mapping[str, Any] | None,
    running: bool = False,
    pending: bool = False,
) -> tuple[str, str | None]:
    """The status of a model's latest training run, and why it failed or stopped.

    The rules, in order:

    - a run of the model is going on (task ``RUNNING`` or the scheduler's ``running``):
      ``RUNNING`` once the stats say so, else ``STARTING`` (the stats file is the previous
      run's until the new run rewrites it);
    - a run waits (task ``SUBMITTED`` or ``pending``): ``QUEUED``;
    - the task was stopped (``DELETE /train/``) and the stats read ``RUNNING``, ``FAILED``
      (stopping kills the run, whose stats then read "ended without reporting") or nothing:
      ``STOPPED``;
    - the stats' own ``RUNNING``, ``DONE`` or ``FAILED`` (e.g. after a restart: no task);
    - the task ended with ``ERROR`` (no stats written): ``FAILED``; ``DONE``: ``DONE``;
    - otherwise ``NOT STARTED``.

    Args:
        stats: The model's train stats (``status``: ``RUNNING``, ``DONE``, ``FAILED``;
            ``error``), as ``CoTrainTask.stats()`` and ``/info``'s ``train_stats`` give them.
        task: MONAI Label's latest train task of the model (``status``: ``SUBMITTED``,
            ``RUNNING``, ``DONE``, ``ERROR``, ``STOPPED``; ``details``), ``None`` if none.
        running: The scheduler's flag: a run of the model is going on.
        pending: The scheduler's flag: a run of the model waits to start.

    Returns:
        ``(status, error)``: one of :data:`NOT_STARTED`, :data:`QUEUED`, :data:`STARTING`,
        :data:`RUNNING`, :data:`DONE`, :data:`FAILED`, :data:`STOPPED`; an error only for
        ``FAILED`` (the stats' ``error``, else the task's last output line) and ``STOPPED``
        (:data:`STOPPED_ERROR`), else ``None``.
    """
    stats = stats or {}
    task = task or {}
    stats_status = stats.get("status")
    task_status = task.get("status")
    if task_status == "RUNNING" or running:
        return (RUNNING if stats_status == RUNNING else STARTING), None
    if task_status == "SUBMITTED" or pending:
        return QUEUED, None
    if task_status == "STOPPED" and stats_status in (RUNNING, FAILED, None):
        return STOPPED, STOPPED_ERROR
    if stats_status in (RUNNING, DONE):
        return str(stats_status), None
    if stats_status == FAILED or task_status == "ERROR":
        error = stats.get("error") or _task_error(task)
        return FAILED, str(error) if error else None
    if task_status == "DONE":
        return DONE, None
    return NOT_STARTED, None


def model_training(app: Any, name: str) -> dict[str, Any]:
    """``training`` of ``GET /cotrain/state`` for one model of ``app`` (a ``CoTrainApp``).

    The train stats are the model's train task's (``stats()``, as in ``/info``), read before
    MONAI Label's tasks: a run that ends between the two reads then shows ``RUNNING`` once
    more, not ``STARTING``.
    """
    trainer = (getattr(app, "_trainers", None) or {}).get(name)
    try:
        stats = trainer.stats() if trainer is not None else {}
    except (OSError, ValueError) as e:
        logger.warning("cannot read the train stats of %s: %s", name, e)
        stats = {}
    stats = stats if isinstance(stats, Mapping) else {}
    task = latest_train_task(name, monailabel_train_tasks())
    running, pending = app.scheduler.status(name)
    status, error = training_status(stats, task, running, pending)
    return {
        "running": running,
        "pending": pending,
        "status": status,
        "error": error,
        "task_status": task.get("status") if task else None,
    }


def model_state(app: Any, name: str, config: CoTrainTaskConfig) -> dict[str, Any]:
    """What ``GET /cotrain/state`` reports for one model of ``app`` (a ``CoTrainApp``)."""
    saved = read_runtime_settings(runtime_settings_path(config))
    return {
        "method": config.settings.train_config.method,
        "members": config.settings.train_config.members,
        "labels": dict(config.labels),
        "auto_train": config.settings.auto_train,
        "auto_train_source": "runtime" if isinstance(saved.get("auto_train"), bool) else "conf",
        "auto_train_changed": saved.get("auto_train_changed"),
        "min_labels": config.settings.min_labels,
        "served_model": served_model(config),
        "training": model_training(app, name),
    }


def _app_models(app: Any) -> dict[str, CoTrainTaskConfig]:
    models = getattr(app, "models", None)
    if not isinstance(models, dict):
        raise HTTPException(status_code=500, detail="the server's app is not the co-training app")
    return models


router = APIRouter(prefix=ROUTE_PREFIX, tags=["Co-training"])


@router.get("/state", summary=f"{RBAC_USER}Co-training state of every model")
def api_state(
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
) -> dict[str, Any]:
    """Every model's method, retrain-on-submit switch, served model and training status."""
    app = app_instance()
    models = _app_models(app)
    return {"models": {name: model_state(app, name, config) for name, config in models.items()}}


@router.put("/auto_train", summary=f"{RBAC_ADMIN}Turn retrain on submit on or off")
def api_set_auto_train(
    model: str,
    enabled: bool,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
) -> dict[str, Any]:
    """Turn retrain on submit (``auto_train``) of ``model`` on or off; answers its new state."""
    app = app_instance()
    models = _app_models(app)
    config = models.get(model)
    if config is None:
        raise HTTPException(
            status_code=404,
            detail=f"unknown model {model!r}; this server serves: {', '.join(models) or 'none'}",
        )
    try:
        set_auto_train(config, enabled, getattr(user, "username", None))
    except OSError as e:
        logger.error("cannot save auto_train of %s: %s", model, e)
        raise HTTPException(
            status_code=500, detail=f"cannot save the auto_train switch of {model!r}: {e}"
        ) from None
    return model_state(app, model, config)


def register_routes() -> bool:
    """Add the ``/cotrain`` endpoints to the running MONAI Label server's FastAPI app.

    Call it once the app instance exists in the server (``on_init_complete``). Does nothing
    outside the server (no ``monailabel.app`` imported) or if the routes are already there.

    Returns:
        Whether the endpoints are served.
    """
    module = sys.modules.get("monailabel.app")
    fastapi_app = getattr(module, "app", None)
    if not isinstance(fastapi_app, FastAPI):
        logger.info("not in the MONAI Label server: %s endpoints not added", ROUTE_PREFIX)
        return False
    prefix = settings.MONAI_LABEL_API_STR
    paths = {getattr(route, "path", None) for route in fastapi_app.router.routes}
    if f"{prefix}{ROUTE_PREFIX}/state" not in paths:
        fastapi_app.include_router(router, prefix=prefix)
        fastapi_app.openapi_schema = None  # list them in /docs too
        logger.info(
            "+++ added endpoints GET %s%s/state, PUT %s%s/auto_train",
            prefix,
            ROUTE_PREFIX,
            prefix,
            ROUTE_PREFIX,
        )
    return True
