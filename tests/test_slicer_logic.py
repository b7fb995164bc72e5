"""The 3D Slicer panel's logic (``plugins/slicer/CoTrain/CoTrainLib``), without Slicer.

The panel's whole logic (server calls, state, texts) is driven here against a real MONAI Label
server running the co-training app: the state before training, retrain on submit switched
off and on at runtime (and kept across a restart), a training started and one stopped from
the panel, the uncertainty map downloaded on the image's grid, and clear errors (not trained
yet, unknown model, a training already running, server down, authentication on). Also: the
logic imports only the standard library (it must run in Slicer's Python, which has no
``monailabel``), the Bearer token goes with every request, and the Slicer layer compiles.
Slicer itself is not installed here, so ``CoTrain.py`` is only compiled, never run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from cotrain.studies import write_demo_studies
from tests.app_helpers import (
    NO_SCORING_ENV,
    REPO_ROOT,
    MonaiLabelServer,
    copy_app,
    use_app_lib,
    wait_for,
)

use_app_lib()

from lib import control  # noqa: E402

PLUGIN_DIR = REPO_ROOT / "plugins" / "slicer" / "CoTrain"
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

from CoTrainLib import (  # noqa: E402
    AuthenticationError,
    CoTrainController,
    CoTrainError,
    EndpointMissingError,
    NotTrainedError,
    ServerUnreachableError,
    TrainingBusyError,
    UnknownModelError,
    panel_texts,
)
from CoTrainLib.state import (  # noqa: E402
    DONE,
    FAILED,
    NOT_STARTED,
    QUEUED,
    RUNNING,
    STARTING,
    STOPPED,
    PanelState,
    choose_image_id,
    parse_training,
)

#: Trains in seconds on a CPU: 32^3 images, 24^3 patches, a 3-level UNet, 2 members,
#: 2 iterations per epoch, validation on 1 of 3 labels (for the members' Dice).
FAST_CONF = {
    "models": "dct_seg",
    "labels": '{"organ":1}',
    "members": "2",
    "roi_size": "[24,24,24]",
    "intensity": "zscore",
    "epochs": "1",
    "iterations_per_epoch": "2",
    "batch_size": "1",
    "unlabeled_batch_size": "1",
    "network": '{"channels":[8,16,32],"strides":[2,2]}',
    "num_workers": "0",
    "min_labels": "3",
    "val_min_labels": "3",
    "val_split": "0.3",
}
TRAIN_TIMEOUT_S = 300.0


def _wait_state(
    controller: CoTrainController,
    server: MonaiLabelServer,
    accept: Callable[[PanelState], bool],
    what: str,
    timeout_s: float = TRAIN_TIMEOUT_S,
) -> PanelState:
    """Refresh the panel state until ``accept`` says yes (log tail on time-out)."""

    def probe() -> PanelState | None:
        state = controller.refresh("dct_seg")
        return state if accept(state) else None

    try:
        return wait_for(probe, timeout_s, what, 0.5)
    except TimeoutError as e:
        state = controller.refresh("dct_seg")
        raise AssertionError(f"{e}; last state {panel_texts(state)}\n{server.log_tail()}") from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_task(server: MonaiLabelServer) -> dict[str, Any] | None:
    """MONAI Label's latest train task (``GET /train/``), ``None`` if it has none."""
    try:
        with urllib.request.urlopen(f"{server.url}/train/", timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:  # "No Train Tasks Found"
            return None
        raise


@pytest.mark.server
def test_panel_logic_against_the_server(tmp_path: Path) -> None:
    truth = tmp_path / "truth"
    studies = write_demo_studies(
        tmp_path / "studies", num_images=6, num_labeled=2, shape=(32, 32, 32), truth_dir=truth
    )
    app_dir = copy_app(tmp_path / "app")
    served_file = app_dir / "model" / "dct_seg.pt"
    switch_file = app_dir / "model" / "dct_seg" / "runtime_settings.json"
    log = tmp_path / "server.log"
    with MonaiLabelServer(app_dir, studies.folder, FAST_CONF, log, NO_SCORING_ENV) as server:
        controller = CoTrainController.connect(server.url)

        # Before any training: counts, the switch from --conf, nothing served.
        state = controller.refresh()
        assert state.models == ["dct_seg"] and state.model.name == "dct_seg"
        assert (state.studies_labeled, state.studies_unlabeled, state.studies_total) == (2, 4, 6)
        model = state.model
        assert (model.method, model.members, model.labels) == ("dct_seg", 2, {"organ": 1})
        assert model.auto_train is True and model.auto_train_source == "conf"
        assert model.min_labels == 3
        assert model.training.status == NOT_STARTED
        assert model.served_model is not None and not model.served_model.published
        texts = panel_texts(state)
        assert texts["training"] == "not trained yet: no training has run"
        assert texts["served_model"] == "none: not trained yet"
        assert texts["studies"] == "2 labeled, 4 unlabeled (6 studies)"
        assert texts["method"] == "DCT-Seg, 2 members (model dct_seg; labels: organ)"
        assert texts["auto_train"].startswith("on: saving a final label starts training once 3")
        with pytest.raises(NotTrainedError, match="not trained yet") as error:
            controller.fetch_uncertainty_map("dct_seg", "case_004", str(tmp_path / "maps"))
        assert error.value.status == 503

        # Retrain on submit off: the 3rd label (= min_labels) is stored but trains nothing.
        state = controller.set_auto_train("dct_seg", False)
        assert state.model.auto_train is False and state.model.auto_train_source == "runtime"
        assert json.loads(switch_file.read_text())["auto_train"] is False
        message = controller.submit_label("case_002", str(truth / "case_002.nii.gz"))
        assert message == "Label saved (3 labeled); retrain on submit is off: no training started"
        state = controller.refresh("dct_seg")
        assert state.studies_labeled == 3 and state.model.training.status == NOT_STARTED
        assert _train_task(server) is None
        assert panel_texts(state)["auto_train"].startswith("off: saved labels are stored")

        # On again (the switch is what the next submit reads).
        state = controller.set_auto_train("dct_seg", True)
        assert state.model.auto_train is True
        assert json.loads(switch_file.read_text())["auto_train"] is True

        # Start training from the panel: progress, loss terms, per-member Dice, DONE.
        task = controller.start_training("dct_seg", max_epochs=2)
        assert task["request"]["model"] == "dct_seg"
        state = _wait_state(
            controller, server, lambda s: s.model.training.status != STARTING, "the run to start"
        )
        if state.model.training.status == RUNNING:
            with pytest.raises(TrainingBusyError, match="already running"):
                controller.start_training("dct_seg")
        state = _wait_state(
            controller, server, lambda s: s.model.training.status in (DONE, FAILED), "DONE"
        )
        training = state.model.training
        assert training.status == DONE, panel_texts(state)
        assert training.epoch == training.total_epochs == 2
        assert {"supervised", "total"} <= set(training.losses)
        assert training.member_dice is not None and len(training.member_dice) == 2
        assert training.vote_dice is not None and training.disagreement is not None
        assert (training.labeled, training.validation, training.unlabeled) == (2, 1, 3)
        served = state.model.served_model
        assert served is not None and served.published and served.modified_time
        texts = panel_texts(state)
        assert texts["training"].startswith("done: epoch 2/2 in ")
        assert re.fullmatch(
            r"members \d\.\d{3} / \d\.\d{3}, vote \d\.\d{3}, disagreement \d\.\d{4}", texts["dice"]
        ), texts["dice"]
        assert "supervised " in texts["losses"] and "total " in texts["losses"]
        assert texts["served_model"].startswith("dct_seg.pt, published ")
        assert texts["studies"].endswith("latest run: 2 labeled + 1 for validation, 3 unlabeled")

        # The uncertainty map: a NIfTI on the image's own grid.
        umap = controller.fetch_uncertainty_map("dct_seg", "case_004", str(tmp_path / "maps"))
        image = nib.load(studies.folder / "case_004.nii.gz")
        uncertainty = nib.load(umap.path)
        assert uncertainty.shape == image.shape
        np.testing.assert_allclose(uncertainty.affine, image.affine, atol=1e-4)
        values = np.asarray(uncertainty.dataobj, dtype=np.float32)
        assert np.isfinite(values).all() and values.min() >= -1e-6
        assert umap.max is not None and abs(float(values.max()) - umap.max) < 1e-3
        assert umap.model_file == "dct_seg.pt"

        # Stop a long run: the state says STOPPED and the served model is unchanged.
        published = (served.mtime_ns, _sha256(served_file))
        controller.start_training("dct_seg", max_epochs=1000)
        _wait_state(
            controller, server, lambda s: s.model.training.status == RUNNING, "the long run"
        )
        stopped = controller.stop_training()
        assert stopped["status"] == "STOPPED"
        state = controller.refresh("dct_seg")
        assert state.model.training.status == STOPPED
        assert state.model.training.error == "stopped by a user"
        assert state.model.training.total_epochs == 1000
        assert panel_texts(state)["training"].startswith("stopped by a user at epoch ")
        assert state.model.served_model is not None
        assert (state.model.served_model.mtime_ns, _sha256(served_file)) == published
        with pytest.raises(CoTrainError, match="No training is running"):
            controller.stop_training()

        # Unknown models: named, with what the server has.
        with pytest.raises(UnknownModelError, match="'nope'.*dct_seg"):
            controller.refresh("nope")
        with pytest.raises(UnknownModelError, match="dct_seg"):
            controller.start_training("nope")
        with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
            controller.client.set_auto_train("nope", True)
        controller.set_auto_train("dct_seg", False)

    # Server down: a clear message naming the address.
    with pytest.raises(ServerUnreachableError, match="cannot reach the MONAI Label server at"):
        controller.refresh()

    # After a restart the switch is still off, and the same model is served.
    with MonaiLabelServer(app_dir, studies.folder, FAST_CONF, log, NO_SCORING_ENV) as server:
        controller = CoTrainController.connect(server.url)
        state = controller.refresh()
        assert state.model.auto_train is False and state.model.auto_train_source == "runtime"
        assert state.model.served_model is not None
        assert state.model.served_model.mtime_ns == published[0]
        message = controller.submit_label("case_003", str(truth / "case_003.nii.gz"))
        assert message.endswith("retrain on submit is off: no training started")


def _auth_probe(self: Any) -> dict[str, Any]:
    """Readiness probe for a server with authentication on (``/info`` then needs a token)."""
    with urllib.request.urlopen(f"{self._server_url}/auth/", timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.server
def _signed_token(private_key: Any, roles: list[str]) -> str:
    """An access token as Keycloak issues it (RS256, roles under ``realm_access``)."""
    import jwt

    claims = {
        "preferred_username": "radiologist",
        "realm_access": {"roles": roles},
        "exp": int(time.time()) + 600,
    }
    return jwt.encode(claims, private_key, algorithm="RS256")


def test_panel_with_authentication_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub_server: ThreadingHTTPServer
) -> None:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from monailabel.client import MONAILabelClient

    # The realm (an OpenID Connect server such as Keycloak) publishes the key tokens are
    # signed with; a stand-in serves it.
    realm_key, other_key = (rsa.generate_private_key(65537, 2048) for _ in range(2))
    public_der = realm_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stub_server.routes[("GET", "/realms/test")] = (  # type: ignore[attr-defined]
        200,
        {"public_key": base64.b64encode(public_der).decode()},
    )
    realm = f"http://127.0.0.1:{stub_server.server_address[1]}/realms/test"

    monkeypatch.setattr(MONAILabelClient, "info", _auth_probe)
    studies = write_demo_studies(tmp_path / "studies", num_images=2, num_labeled=0)
    app_dir = copy_app(tmp_path / "app")
    env = {
        **NO_SCORING_ENV,
        "MONAI_LABEL_AUTH_ENABLE": "true",
        "MONAI_LABEL_AUTH_REALM_URI": realm,
    }
    conf = {"models": "dct_seg", "labels": '{"organ":1}'}
    with MonaiLabelServer(app_dir, studies.folder, conf, tmp_path / "server.log", env) as server:
        controller = CoTrainController.connect(server.url)
        assert controller.client.auth_enabled()
        for action in (
            controller.refresh,
            controller.client.cotrain_state,
            lambda: controller.set_auto_train("dct_seg", False),
        ):
            with pytest.raises(AuthenticationError, match="requires a login") as error:
                action()
            assert error.value.status == 401 and "no token was given" in str(error.value)

        # A token signed by the realm works (MONAI Label 0.8.5 alone refuses it under PyJWT 2).
        admin = CoTrainController.connect(
            server.url, token=_signed_token(realm_key, ["monailabel-admin", "monailabel-user"])
        )
        assert admin.refresh("dct_seg").model.auto_train is True
        assert admin.set_auto_train("dct_seg", False).model.auto_train is False
        # A user without the admin role may look but not switch; a forged token is refused.
        user = CoTrainController.connect(
            server.url, token=_signed_token(realm_key, ["monailabel-user"])
        )
        assert user.refresh("dct_seg").model.auto_train is False
        with pytest.raises(CoTrainError, match="monailabel-admin"):
            user.set_auto_train("dct_seg", True)
        forged = CoTrainController.connect(
            server.url, token=_signed_token(other_key, ["monailabel-admin"])
        )
        with pytest.raises(AuthenticationError):
            forged.refresh()


# ---------------------------------------------------------------------------- no real server


class _StubHandler(BaseHTTPRequestHandler):
    """Answers from ``server.routes[(method, path)] = (status, body)``; records each request."""

    def _answer(self) -> None:
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append((self.command, path, self.headers.get("Authorization")))  # type: ignore[attr-defined]
        status, body = self.server.routes.get(  # type: ignore[attr-defined]
            (self.command, path), (404, {"detail": "Not Found"})
        )
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stub_server() -> Iterator[ThreadingHTTPServer]:
    """A stand-in for a stock MONAI Label server (no ``/cotrain``) with authentication on."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.seen = []  # type: ignore[attr-defined]
    server.routes = {  # type: ignore[attr-defined]
        ("GET", "/info/"): (
            200,
            {
                "models": {"deepedit": {"labels": {"spleen": 1}}},
                "trainers": {"deepedit": {}},
                "train_stats": {"deepedit": {}},
                "datastore": {"total": 4, "completed": 1},
            },
        ),
        ("GET", "/datastore/label"): (200, b"NIFTI"),
        ("DELETE", "/train/"): (200, None),
        ("POST", "/train/deepedit"): (
            403,
            {"detail": 'Role "monailabel-admin" is required to perform this action'},
        ),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_token_sent_and_stock_server_handled(
    stub_server: ThreadingHTTPServer, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{stub_server.server_address[1]}"
    controller = CoTrainController.connect(url, token="abc")

    # A stock MONAI Label app: state from /info, a notice instead of the /cotrain parts.
    state = controller.refresh()
    assert state.model.name == "deepedit" and state.model.training.status == NOT_STARTED
    assert not state.control_available and state.model.auto_train is None
    assert state.notice and "has no /cotrain endpoints" in state.notice
    assert panel_texts(state)["auto_train"] == "unknown (the server has no /cotrain endpoints)"
    with pytest.raises(EndpointMissingError, match="not running the co-training app"):
        controller.set_auto_train("deepedit", False)
    with pytest.raises(AuthenticationError, match='Role "monailabel-admin" is required') as error:
        controller.start_training("deepedit")
    assert error.value.status == 403
    with pytest.raises(CoTrainError, match="No training is running"):
        controller.stop_training()
    controller.client.download_label("case_1", "uncertainty", str(tmp_path / "map.nii.gz"))
    assert (tmp_path / "map.nii.gz").read_bytes() == b"NIFTI"

    # Every request carried the token.
    seen = stub_server.seen  # type: ignore[attr-defined]
    assert {path for _, path, _ in seen} >= {"/info/", "/cotrain/state", "/train/"}
    assert {auth for _, _, auth in seen} == {"Bearer abc"}
    # The status is the server's: the panel does not read MONAI Label's train task.
    assert ("GET", "/train/") not in {(method, path) for method, path, _ in seen}

    # MONAI Label's token answer is accepted as is.
    seen.clear()
    token = {"access_token": "xyz", "token_type": "bearer"}
    CoTrainController.connect(url, token=token).refresh()
    assert {auth for _, _, auth in seen} == {"bearer xyz"}


def test_server_address_errors() -> None:
    with pytest.raises(CoTrainError, match="No server address"):
        CoTrainController.connect("  ")
    with pytest.raises(CoTrainError, match="must start with http"):
        CoTrainController.connect("ftp://host")
    # A port nothing listens on (bound, never listening).
    with pytest.raises(ServerUnreachableError, match="Is it running"):
        CoTrainController.connect("127.0.0.1:9").refresh()


@pytest.mark.parametrize(
    ("stats_status", "task_status", "running", "pending", "expected"),
    [
        (None, None, False, False, NOT_STARTED),
        ("DONE", "SUBMITTED", False, True, QUEUED),
        ("DONE", "RUNNING", True, False, STARTING),  # old stats until the run rewrites them
        ("DONE", None, True, False, STARTING),  # the scheduler's flag alone
        ("RUNNING", "RUNNING", True, False, RUNNING),
        ("FAILED", "STOPPED", False, False, STOPPED),  # a stopped run reads "killed"
        (None, "STOPPED", False, False, STOPPED),
        ("DONE", "DONE", False, False, DONE),
        (None, "DONE", False, False, DONE),
        ("FAILED", "ERROR", False, False, FAILED),
        ("FAILED", None, False, False, FAILED),  # e.g. after a restart: no task
        ("DONE", "ERROR", False, False, DONE),  # the stats win once the run wrote them
    ],
)
def test_server_training_status(
    stats_status: str | None,
    task_status: str | None,
    running: bool,
    pending: bool,
    expected: str,
) -> None:
    """The server's status rules (``lib/control.py``), in the statuses the panel shows."""
    stats = {"status": stats_status} if stats_status else None
    task = {"status": task_status, "request": {"model": "m"}} if task_status else None
    status, error = control.training_status(stats, task, running, pending)
    assert status == expected
    assert error == ("stopped by a user" if expected == STOPPED else None)


def test_server_training_errors() -> None:
    """Why a run failed: the stats' reason, else the task's last output line."""
    task = {"status": "ERROR", "details": deque(["epoch 1", "RuntimeError: out of memory", ""])}
    assert control.training_status(None, task) == (FAILED, "RuntimeError: out of memory")
    assert control.training_status({}, {**task, "details": ["boom"]}) == (FAILED, "boom")
    stats = {"status": "FAILED", "error": "loss is NaN at epoch 3"}
    assert control.training_status(stats, task) == (FAILED, "loss is NaN at epoch 3")
    assert control.training_status(stats, None) == (FAILED, "loss is NaN at epoch 3")
    assert control.training_status({"status": "FAILED"}, None) == (FAILED, None)
    # A new run going on or waiting: the previous run's error is not this run's.
    assert control.training_status(stats, {"status": "RUNNING"}) == (STARTING, None)
    assert control.training_status(stats, None, pending=True) == (QUEUED, None)


def test_server_training_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """``/cotrain/state``'s ``training``: the model's own latest task, its stats, the flags."""

    class Trainer:
        def stats(self) -> dict[str, Any]:
            return {"status": "DONE", "epoch": 2}

    class Scheduler:
        def status(self, model: str) -> tuple[bool, bool]:
            return False, model == "other"

    class App:
        _trainers = {"m": Trainer()}
        scheduler = Scheduler()

    tasks = [
        {"status": "DONE", "request": {"model": "m"}},
        {"status": "STOPPED", "request": {"model": "m"}},
        {"status": "ERROR", "request": {"model": "other"}, "details": ["bad label"]},
        {"status": "SUBMITTED", "request": {"model": "other"}},
    ]
    assert control.latest_train_task("m", tasks) is tasks[1]
    assert control.latest_train_task("other", tasks) is tasks[3]
    assert control.latest_train_task("none", tasks) is None
    monkeypatch.setattr(control, "monailabel_train_tasks", lambda: tasks)
    assert control.model_training(App(), "m") == {
        "running": False,
        "pending": False,
        "status": DONE,  # stopped after the stats said DONE: the served run stands
        "error": None,
        "task_status": "STOPPED",
    }
    other = control.model_training(App(), "other")
    assert (other["status"], other["pending"], other["task_status"]) == (QUEUED, True, "SUBMITTED")
    monkeypatch.setattr(control, "monailabel_train_tasks", list)
    assert control.model_training(App(), "nope")["status"] == NOT_STARTED
    # The panel's statuses are the server's.
    shown = (NOT_STARTED, QUEUED, STARTING, RUNNING, DONE, FAILED, STOPPED)
    server = tuple(
        getattr(control, name)
        for name in ("NOT_STARTED", "QUEUED", "STARTING", "RUNNING", "DONE", "FAILED", "STOPPED")
    )
    assert server == shown


@pytest.mark.parametrize(
    ("stats", "server", "expected", "error"),
    [
        # The server's status and error, as they are (not re-derived from the stats).
        ({"status": "DONE"}, {"status": STARTING, "error": None}, STARTING, None),
        (
            {"status": "FAILED", "error": "x"},
            {"status": STOPPED, "error": "stopped"},
            STOPPED,
            "stopped",
        ),
        ({"status": "RUNNING"}, {"status": FAILED, "error": "boom"}, FAILED, "boom"),
        ({}, {"status": QUEUED}, QUEUED, None),
        # No /cotrain (a stock MONAI Label app): the stats' own status only.
        (None, None, NOT_STARTED, None),
        ({}, None, NOT_STARTED, None),
        ({"status": "RUNNING"}, None, RUNNING, None),
        ({"status": "DONE"}, None, DONE, None),
        ({"status": "FAILED", "error": "loss is NaN"}, None, FAILED, "loss is NaN"),
        ({"status": "SOMETHING"}, None, NOT_STARTED, None),
        # An older co-training app (flags but no status): the stats' own status too.
        ({"status": "DONE"}, {"running": True, "pending": False}, DONE, None),
    ],
)
def test_panel_shows_the_server_status(
    stats: dict[str, Any] | None, server: dict[str, Any] | None, expected: str, error: str | None
) -> None:
    training = parse_training(stats, server)
    assert (training.status, training.error) == (expected, error)


def test_choose_image_id() -> None:
    assert choose_image_id(" case_9 ", "case_1", "case_2.nii.gz") == "case_9"
    assert choose_image_id("", "case_1", "case_2.nii.gz") == "case_1"
    assert choose_image_id(None, None, "case_2.nii.gz") == "case_2"
    assert choose_image_id(None, None, None) is None


# ---------------------------------------------------------------------------- Slicer-free


def test_logic_imports_only_the_standard_library() -> None:
    """Slicer's Python has no monailabel (nor numpy-based helpers of this repo): import the
    logic with slicer, qt, vtk, ctk, monailabel and the repo's dependencies blocked."""
    code = f"""
import importlib.abc, json, sys
BLOCKED = {{"slicer", "qt", "vtk", "ctk", "monailabel", "cotrain", "numpy", "torch",
           "requests", "nibabel", "fastapi"}}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
before = set(sys.modules)
sys.path.insert(0, {str(PLUGIN_DIR)!r})
import CoTrainLib, CoTrainLib.client, CoTrainLib.controller, CoTrainLib.state
new = {{name.split(".")[0] for name in set(sys.modules) - before}}
print(json.dumps(sorted(n for n in new if n not in sys.stdlib_module_names)))
"""
    result = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["CoTrainLib"]


def test_slicer_module_compiles_for_slicer_python(tmp_path: Path) -> None:
    """``CoTrain.py`` cannot run without Slicer: compile it, parse every plugin file as Python
    3.9 (Slicer 5.0 to 5.6), and check the CMake lists name existing files."""
    import py_compile

    sources = sorted(PLUGIN_DIR.rglob("*.py"))
    assert PLUGIN_DIR / "CoTrain.py" in sources
    for source in sources:
        py_compile.compile(str(source), cfile=str(tmp_path / "out.pyc"), doraise=True)
        ast.parse(source.read_text(), filename=str(source), feature_version=(3, 9))
    tree = ast.parse((PLUGIN_DIR / "CoTrain.py").read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"CoTrain", "CoTrainWidget", "CoTrainLogic", "CoTrainTest"} <= classes
    cmake = (PLUGIN_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "CoTrain")
    listed = re.findall(r"^\s+(\S+\.(?:py|png))\s*$", cmake, flags=re.MULTILINE)
    assert len(listed) == 6
    for name in listed:
        assert (PLUGIN_DIR / name).is_file(), name
    assert "add_subdirectory(CoTrain)" in (PLUGIN_DIR.parent / "CMakeLists.txt").read_text()
