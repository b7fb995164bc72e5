"""A real server whose trainings go wrong: bad images in the studies folder are skipped with a
reason (and refused by infer with one); a run that raises, one whose loss turns NaN and one
killed with SIGKILL each end FAILED with the reason in the train status and the log, while the
served model stays the same and keeps answering; the next label submit trains again."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from cotrain.studies import write_demo_studies
from tests.app_helpers import (
    NO_SCORING_ENV,
    TINY_SERVER_CONF,
    MonaiLabelServer,
    copy_app,
    file_sha256,
    wait_for,
    wait_for_training,
)

pytestmark = pytest.mark.server

SHAPE = (16, 16, 16)
TIMEOUT_S = 300.0
#: Bad images in the studies folder and a phrase of the reason each is skipped / refused for.
BAD_IMAGES = {
    "corrupt": "not a readable NIfTI file",
    "flat": "is 2D",
    "empty": "empty (0 bytes)",
}


def _add_bad_images(folder: Path) -> None:
    (folder / "corrupt.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    nib.save(nib.Nifti1Image(np.ones(SHAPE[:2], np.float32), np.eye(4)), folder / "flat.nii.gz")
    (folder / "empty.nii.gz").write_bytes(b"")


def _stats(client: MONAILabelClient) -> dict[str, Any]:
    return client.info()["train_stats"]["dct_seg"]


def _served(client: MONAILabelClient, image: str = "case_004") -> dict[str, Any]:
    """Infer ``image``; the label must be on its grid. Returns the served model's params."""
    label_file, params = client.infer("dct_seg", image, {})
    assert nib.load(label_file).shape == SHAPE
    os.unlink(label_file)
    return params["model"]


def _failed_run(
    client: MONAILabelClient, server: MonaiLabelServer, reason: str, logged: str
) -> dict[str, Any]:
    """Wait for the run to end; it must have failed (train task ``ERROR``), with ``reason`` in
    the train stats and ``logged`` in the server log. Returns the stats."""
    task = wait_for_training(client, server, TIMEOUT_S)
    assert task["status"] == "ERROR", task
    stats = _stats(client)
    assert stats["status"] == "FAILED" and reason in stats["error"], stats
    assert "total_time" in stats  # clients treat the run as ended
    assert logged in server.log_path.read_text(errors="replace")
    return stats


def test_training_failures_keep_the_served_model(tmp_path: Path) -> None:
    truth = tmp_path / "truth"
    studies = write_demo_studies(
        tmp_path / "studies", num_images=5, num_labeled=2, shape=SHAPE, truth_dir=truth
    )
    _add_bad_images(studies.folder)
    conf = {**TINY_SERVER_CONF, "test_fault_injection": "true"}
    app_dir = copy_app(tmp_path / "app")
    served_file = app_dir / "model" / "dct_seg.pt"
    with MonaiLabelServer(
        app_dir, studies.folder, conf, tmp_path / "server.log", env=NO_SCORING_ENV
    ) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path))

        # A run with bad images in the folder: they are skipped, each with its reason.
        client.train_start("dct_seg", {})
        task = wait_for_training(client, server, TIMEOUT_S)
        assert task["status"] == "DONE", task
        stats = _stats(client)
        assert stats["status"] == "DONE" and stats["labeled"] == 2 and stats["unlabeled"] == 3
        log = server.log_path.read_text(errors="replace")
        for name, reason in BAD_IMAGES.items():
            assert reason in stats["skipped"][f"{name}.nii.gz"], stats["skipped"]
            assert f"skipping {name}.nii.gz: " in log
        good_model = _served(client)
        digest = file_sha256(served_file)

        # Infer on a bad image: 422 naming the problem.
        for name, reason in BAD_IMAGES.items():
            with pytest.raises(MONAILabelClientException) as error:
                client.infer("dct_seg", name, {})
            assert "Status: 422" in error.value.msg and reason in error.value.msg, error.value.msg

        # An exception inside the run; then a NaN loss.
        for fault, reason in (
            ("exception", "InjectedFault: test hook: injected failure"),
            ("nan_loss", "FloatingPointError: loss is not finite"),
        ):
            client.train_start("dct_seg", {"test_fault": fault})
            _failed_run(client, server, reason, logged=reason)
            # MONAI Label's train status keeps the run's last output lines: the reason is there.
            assert any(reason in line for line in client.train_status()["details"])
            assert file_sha256(served_file) == digest
            assert _served(client) == good_model

        # The training process killed with SIGKILL while it trains.
        client.train_start("dct_seg", {"max_epochs": 10000})
        running = wait_for(
            lambda: (s := _stats(client)).get("status") == "RUNNING"
            and s.get("epoch", 0) >= 1
            and s,
            TIMEOUT_S,
            "the long run to complete an epoch",
            0.5,
        )
        os.kill(running["pid"], signal.SIGKILL)
        stats = _failed_run(
            client, server, "ended without reporting a result", logged="Return code: -9"
        )
        assert "killed" in stats["error"]
        assert file_sha256(served_file) == digest
        assert _served(client) == good_model

        # The next submit trains again, and its model is served.
        response = client.save_label("case_002", str(truth / "case_002.nii.gz"))
        assert response["train"] == {"dct_seg": "started"}, response
        task = wait_for_training(client, server, TIMEOUT_S)
        assert task["status"] == "DONE", task
        stats = _stats(client)
        assert stats["status"] == "DONE" and stats["labeled"] == 3 and stats["warm_start"]
        assert _served(client)["mtime_ns"] > good_model["mtime_ns"]
