"""Restarts of a real server: stopped during training, it comes back serving the last good model
and says the interrupted run failed; a half-written served model is never loaded, the previous
one is served instead, and the next training publishes a good model again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from cotrain.checkpoint import previous_model_path, publish_model
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


def _infer(client: MONAILabelClient, image: str = "case_004") -> tuple[np.ndarray, dict[str, Any]]:
    """The label of ``image`` and the served model's params."""
    label_file, params = client.infer("dct_seg", image, {})
    label = np.asarray(nib.load(label_file).dataobj)
    os.unlink(label_file)
    return label, params["model"]


def test_restarts_serve_the_last_good_model(tmp_path: Path) -> None:
    truth = tmp_path / "truth"
    studies = write_demo_studies(
        tmp_path / "studies", num_images=5, num_labeled=2, shape=SHAPE, truth_dir=truth
    )
    app_dir = copy_app(tmp_path / "app")
    served = app_dir / "model" / "dct_seg.pt"

    def server(name: str) -> MonaiLabelServer:
        return MonaiLabelServer(
            app_dir, studies.folder, TINY_SERVER_CONF, tmp_path / f"{name}.log", env=NO_SCORING_ENV
        )

    # A good model, then a long run stopped with the server while it trains.
    with server("first") as first:
        client = MONAILabelClient(first.url, tmpdir=str(tmp_path))
        client.train_start("dct_seg", {})
        assert wait_for_training(client, first, TIMEOUT_S)["status"] == "DONE"
        good_label, good_model = _infer(client)
        good_digest = file_sha256(served)
        client.train_start("dct_seg", {"max_epochs": 10000})
        wait_for(
            lambda: client.info()["train_stats"]["dct_seg"].get("epoch", 0) >= 2,
            TIMEOUT_S,
            "the long run to train",
            0.5,
        )
    assert file_sha256(served) == good_digest

    # Restarted: the same model answers; the interrupted run is reported as failed.
    with server("second") as second:
        client = MONAILabelClient(second.url, tmpdir=str(tmp_path))
        label, model = _infer(client)
        assert model == good_model and model["file"] == "dct_seg.pt"
        np.testing.assert_array_equal(label, good_label)
        stats = client.info()["train_stats"]["dct_seg"]
        assert stats["status"] == "FAILED", stats
        assert "server stopped during training" in stats["error"]

    # A half-written served model (the previous one kept by publishing) is never loaded.
    copy = shutil.copy2(served, tmp_path / "republished.pt")
    publish_model(copy, served)
    assert file_sha256(previous_model_path(served)) == good_digest
    served.write_bytes(served.read_bytes()[: served.stat().st_size // 2])
    with server("third") as third:
        client = MONAILabelClient(third.url, tmpdir=str(tmp_path))
        label, model = _infer(client)
        assert model["file"] == "dct_seg.prev.pt", model
        np.testing.assert_array_equal(label, good_label)
        assert "loading the previous model" in third.log_path.read_text(errors="replace")

        # The next submit trains (warm start from the previous model) and publishes again.
        response = client.save_label("case_002", str(truth / "case_002.nii.gz"))
        assert response["train"] == {"dct_seg": "started"}, response
        assert wait_for_training(client, third, TIMEOUT_S)["status"] == "DONE"
        _, model = _infer(client)
        assert model["file"] == "dct_seg.pt" and model["mtime_ns"] > good_model["mtime_ns"]
        assert (
            file_sha256(previous_model_path(served)) == good_digest
        )  # not replaced by the damaged one
