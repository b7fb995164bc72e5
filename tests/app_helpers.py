"""Helpers for the MONAI Label app tests: importing the app's ``lib``, running a real server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cotrain.launch import free_port

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "cotrain"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

T = TypeVar("T")

#: ``--conf`` of a server whose trainings take seconds on a CPU: 16^3 patches, a 2-level UNet
#: without residual units, 2 members, 1 epoch of 2 iterations, no validation.
TINY_SERVER_CONF = {
    "models": "dct_seg",
    "labels": '{"organ":1}',
    "members": "2",
    "roi_size": "[16,16,16]",
    "epochs": "1",
    "iterations_per_epoch": "2",
    "batch_size": "1",
    "unlabeled_batch_size": "1",
    "network": '{"channels":[4,8],"strides":[2],"num_res_units":0}',
    "num_workers": "0",
    # The reliability tests start on 2 labels and start their first trainings themselves; a
    # third label (min_labels) makes submits train.
    "min_labels": "3",
    "val_split": "0",
    # The co-training terms from the first step (as on a GPU server), not the CPU default's
    # supervised warm-up, which would cover every iteration of these runs.
    "supervised_warmup_iterations": "0",
}
#: ``--conf`` of a server that trains in about a minute on 2 CPU cores (32^3 images): 24^3
#: patches, a 3-level UNet, 2 members, 3 epochs x 8 iterations; training starts at 3 labels.
FAST_SERVER_CONF = {
    "labels": json.dumps({"organ": 1}),
    "members": "2",
    "roi_size": "[24, 24, 24]",
    "intensity": "zscore",
    "epochs": "3",
    "iterations_per_epoch": "8",
    "batch_size": "2",
    "unlabeled_batch_size": "2",
    "network": json.dumps({"channels": [8, 16, 32], "strides": [2, 2]}),
    "learning_rate": "0.003",
    "num_workers": "0",
    "min_labels": "3",
    "val_min_labels": "3",
    "val_split": "0.3",
    "supervised_warmup_iterations": "0",  # as TINY_SERVER_CONF
}

#: Server environment without the scoring run MONAI Label starts at start-up and after every
#: training (tests that do not need scores save its CPU time).
NO_SCORING_ENV = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}


def use_app_lib() -> None:
    """Make the app's ``lib`` package importable (MONAI Label puts the app folder on the path)."""
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))


def copy_app(dest: Path) -> Path:
    """Copy the app's code to ``dest`` so a test server writes its models and logs there."""
    shutil.copytree(
        APP_DIR, dest, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__")
    )
    return dest


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of the foreground (any non-zero value) of two label arrays."""
    p, t = prediction > 0, truth > 0
    total = p.sum() + t.sum()
    return float(2.0 * np.logical_and(p, t).sum() / total) if total else 1.0


def wait_for(
    probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 1.0
) -> T:
    """Call ``probe`` until it returns something other than ``None`` or ``False``.

    Raises:
        TimeoutError: Naming ``what`` when ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> content), to compare before and after."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (to show that a file did not change)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_finished(client: Any) -> dict[str, Any] | None:
    """The latest train task once nothing is running or queued, else ``None``.

    Args:
        client: A ``monailabel.client.MONAILabelClient``.
    """
    if client.train_status(check_if_running=True):
        return None
    task = client.train_status()
    return task if task.get("status") not in ("SUBMITTED", "RUNNING") else None


def wait_for_training(client: Any, server: MonaiLabelServer, timeout_s: float) -> dict[str, Any]:
    """Wait until no training runs or waits; return the latest train task (any status).

    Raises:
        AssertionError: With the server's log tail, on time-out.
    """
    try:
        return wait_for(lambda: train_finished(client), timeout_s, "training to finish", 1)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{server.log_tail()}") from None


class MonaiLabelServer:
    """A real ``monailabel start_server`` subprocess on 127.0.0.1 with a free port.

    The server runs in its own process group, so stopping it also ends the train and scoring
    subprocesses it started.

    Args:
        app_dir: The app folder.
        studies: The studies folder.
        conf: ``--conf`` key/values.
        log_path: File receiving the server's output.
        env: Extra environment variables.
    """

    def __init__(
        self,
        app_dir: Path,
        studies: Path,
        conf: Mapping[str, str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.app_dir = app_dir
        self.studies = studies
        self.conf = dict(conf)
        self.log_path = log_path
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180.0) -> MonaiLabelServer:
        """Start the server and wait until ``/info`` answers."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"the server on {self.url} is already running")
        cmd = [
            sys.executable,
            "-m",
            "monailabel.main",
            "start_server",
            "--app",
            str(self.app_dir),
            "--studies",
            str(self.studies),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        for key, value in self.conf.items():
            cmd += ["--conf", key, value]
        env = {**os.environ, **self.env}
        env["MONAI_LABEL_TRACKING_ENABLED"] = "false"
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as README's command starts it
        # The cotrain package from this checkout, also when it is not installed.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.log_path.parent,
                start_new_session=True,
            )
        from monailabel.client import MONAILabelClient

        client = MONAILabelClient(self.url)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                client.info()
            except Exception:
                return False
            return True

        try:
            wait_for(ready, timeout_s, "the MONAI Label server to answer /info")
        except TimeoutError as e:
            self.stop()
            raise TimeoutError(f"{e}\n{self.log_tail()}") from None
        return self

    def log_tail(self, lines: int = 80) -> str:
        """The last lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server and every process it started."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=20)
        # Train/scoring subprocesses share the group; make sure none outlives the server.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def __enter__(self) -> MonaiLabelServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
