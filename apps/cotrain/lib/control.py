"""``/cotrain`` endpoints: the co-training state and the retrain-on-submit switch at runtime.

MONAI Label's REST API has no way to change an app setting while the server runs. These
endpoints add one for ``auto_train`` (retrain on submit) and report what the stock API does
not: each model's method, switch and served model file (the 3D Slicer panel in
``plugins/slicer`` shows them beside MONAI Label's ``/info`` train stats).

- ``GET /cotrain/state``: every model's ``method``, ``members``, ``auto_train`` (and whether
  it comes from ``--conf`` or the runtime switch), ``min_labels``, ``served_model`` (file,
  published or not, modification time) and ``training`` (a run going on / waiting).
- ``PUT /cotrain/auto_train?model=NAME&enabled=true|false``: turn retrain on submit on or off
  for one model; answers the model's new state.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from monailabel.config import RBAC_ADMIN, RBAC_USER, settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from cotrain.files import atomic_write
from lib.configs import CoTrainTaskConfig

logger = logging.getLogger(__name__)

#: File in each model's work folder holding the settings changed at runtime.
RUNTIME_SETTINGS_FILE = "runtime_settings.json"
#: Path prefix of the endpoints.
ROUTE_PREFIX = "/cotrain"

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
        with atomic_write(path, "w") as f:
            json.dump(saved, f, indent=2)
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


def model_state(app: Any, name: str, config: CoTrainTaskConfig) -> dict[str, Any]:
    """What ``GET /cotrain/state`` reports for one model of ``app`` (a ``CoTrainApp``)."""
    saved = read_runtime_settings(runtime_settings_path(config))
    running, pending = app.scheduler.status(name)
    return {
        "method": config.settings.train_config.method,
        "members": config.settings.train_config.views,
        "labels": dict(config.labels),
        "auto_train": config.settings.auto_train,
        "auto_train_source": "runtime" if isinstance(saved.get("auto_train"), bool) else "conf",
        "auto_train_changed": saved.get("auto_train_changed"),
        "min_labels": config.settings.min_labels,
        "served_model": served_model(config),
        "training": {"running": running, "pending": pending},
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
    """Every model's method, retrain-on-submit switch, served model and training flags."""
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
