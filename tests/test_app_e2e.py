"""End to end: a real MONAI Label server running the co-training app, driven by its client.

Covers: ``/info``; the clear error of infer before any training; training started by label
submits alone (with ``min_labels`` and coalescing); train stats; the label returned in the
image's own grid with a Dice well above chance; a newly published model served without a
restart; the uncertainty map; disagreement scores and the ``disagreement`` strategy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from cotrain.studies import write_demo_studies
from tests.app_helpers import (
    FAST_SERVER_CONF,
    MonaiLabelServer,
    copy_app,
    dice,
    wait_for,
    wait_for_training,
)

pytestmark = pytest.mark.server

TRAIN_TIMEOUT_S = 420.0


def _wait_training(client: MONAILabelClient, server: MonaiLabelServer) -> dict[str, Any]:
    task = wait_for_training(client, server, TRAIN_TIMEOUT_S)
    assert task["status"] == "DONE", f"training ended {task['status']}: {task.get('details')}"
    return task


def _scores(
    client: MONAILabelClient, images: list[str], model: int, field: str = "score"
) -> dict[str, float] | None:
    """Scores of ``images`` from the datastore (``field``: the disagreement, or ``dice_error``),
    once all were computed with the model whose file modification time is ``model`` (ns)."""
    objects = client.datastore().get("objects", {})
    scores = {}
    for image in images:
        entry = objects.get(image, {}).get("image", {}).get("info", {}).get("disagreement_dct_seg")
        if not entry or entry.get("model_ts") != model:
            return None
        scores[image] = float(entry[field])
    return scores


def test_app_end_to_end(tmp_path: Path) -> None:
    truth_dir = tmp_path / "truth"
    studies = write_demo_studies(
        tmp_path / "studies",
        num_images=8,
        num_labeled=1,
        shape=(32, 32, 32),
        seed=0,
        spacing=(1.0, 1.0, 1.5),
        truth_dir=truth_dir,
    )
    app_dir = copy_app(tmp_path / "app")
    conf = {"models": "dct_seg", **FAST_SERVER_CONF}
    with MonaiLabelServer(app_dir, studies.folder, conf, tmp_path / "server.log") as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / "client"))
        (tmp_path / "client").mkdir()

        # /info: the model with its labels, the trainer, the strategy and the scoring method.
        info = client.info()
        assert info["models"]["dct_seg"]["labels"] == {"organ": 1}
        assert info["models"]["dct_seg"]["type"] == "segmentation"
        assert "dct_seg" in info["trainers"]
        assert "disagreement" in info["strategies"] and "expected_error" in info["strategies"]
        assert "disagreement_dct_seg" in info["scoring"]
        assert info["labels"] == ["organ"]

        # No training task exists yet, and infer says clearly that there is no model.
        assert not client.train_status(check_if_running=True)
        with pytest.raises(MONAILabelClientException) as error:
            client.infer("dct_seg", "case_006", {})
        assert "503" in error.value.msg and "not trained yet" in error.value.msg

        # Submits below min_labels do not train; reaching it does, without any train call.
        response = client.save_label("case_001", str(truth_dir / "case_001.nii.gz"))
        assert response["train"] == {"dct_seg": "waiting for labels (2/3)"}
        assert not client.train_status(check_if_running=True)
        response = client.save_label("case_002", str(truth_dir / "case_002.nii.gz"))
        assert response["train"] == {"dct_seg": "started"}, response
        # Two more submits while it trains: one follow-up run at most covers both.
        outcomes = [
            client.save_label(name, str(truth_dir / f"{name}.nii.gz"))["train"]["dct_seg"]
            for name in ("case_003", "case_004")
        ]
        assert outcomes[0] in ("queued", "coalesced"), outcomes
        assert outcomes[1] == "coalesced" or outcomes[0] == "coalesced", outcomes

        task = _wait_training(client, server)
        assert task["request"]["model"] == "dct_seg"
        stats = client.info()["train_stats"]["dct_seg"]
        assert stats["status"] == "DONE"
        assert stats["epoch"] == stats["total_epochs"] == 3
        assert "total_time" in stats and stats["progress"] == 1.0
        assert stats["labeled"] + stats["validation"] == 5, "the last run missed a submitted label"
        assert stats["unlabeled"] == 3
        assert len(stats["member_dice"]) == 2
        assert stats["disagreement"] is not None
        assert 0.0 < stats["best_metric"] <= 1.0
        assert {"supervised", "total"} <= set(stats["losses"])

        # Infer: a label on the image's own grid, clearly better than chance.
        unlabeled = ["case_005", "case_006", "case_007"]
        label_file, params = client.infer("dct_seg", "case_006", {"uncertainty": True})
        image = nib.load(studies.folder / "case_006.nii.gz")
        label = nib.load(label_file)
        assert label.shape == image.shape
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
        truth = np.asarray(nib.load(truth_dir / "case_006.nii.gz").dataobj)
        score = dice(np.asarray(label.dataobj), truth)
        assert score > 0.6, f"Dice {score:.3f} against ground truth"
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
        assert params["label_names"] == {"organ": 1}
        first_model = params["model"]

        # The uncertainty map went into the datastore under its own tag.
        assert params["uncertainty"]["tag"] == "uncertainty"
        uncertainty = nib.load(client.download_label("case_006", "uncertainty"))
        assert uncertainty.shape == image.shape
        assert float(np.asarray(uncertainty.dataobj).min()) >= -1e-6  # JS divergence

        # Every unlabeled image gets a disagreement score from the new model after training.
        scores = wait_for(
            lambda: _scores(client, unlabeled, first_model["mtime_ns"]), 240, "scores", 3
        )
        most_uncertain = max(unlabeled, key=lambda i: scores[i])
        scoring = client.info()["models"]["dct_seg"]["scoring"]
        assert scoring["scored_with_current_model"] == scoring["unlabeled"] == 3, scoring
        assert scoring["never_scored"] == 0 and scoring["budget_minutes"] > 0

        # expected_error ranks by the Dice error the vote expects, from the same scoring run.
        errors = _scores(client, unlabeled, first_model["mtime_ns"], "dice_error")
        assert errors is not None
        # Each annotator's client sends its own id (the client overwrites one in the params).
        annotator_a = MONAILabelClient(server.url, client_id="annotator-a")
        annotator_b = MONAILabelClient(server.url, client_id="annotator-b")
        sample = annotator_a.next_sample("expected_error", {})
        assert sample["id"] == max(unlabeled, key=lambda i: errors[i]), (sample, errors)

        # next_sample: the most uncertain unlabeled image, even if this annotator was just
        # given another strategy's pick; not the same one for another annotator.
        sample = annotator_a.next_sample("disagreement", {})
        assert sample["id"] == most_uncertain, (sample, scores)
        other = annotator_b.next_sample("disagreement", {})
        assert other["id"] in unlabeled and other["id"] != sample["id"]

        # One more submit retrains (warm start); infer serves the new model without a restart.
        response = client.save_label("case_005", str(truth_dir / "case_005.nii.gz"))
        assert response["train"]["dct_seg"] in ("started", "queued"), response
        _wait_training(client, server)
        stats = client.info()["train_stats"]["dct_seg"]
        assert stats["warm_start"] is True
        assert stats["labeled"] + stats["validation"] == 6
        _, params = client.infer("dct_seg", "case_007", {})
        assert params["model"]["mtime_ns"] > first_model["mtime_ns"], "new model not served"

        # The multi-GPU path (one process per GPU, gradients averaged) through the server's
        # train API, as 2 gloo processes on this CPU: rank 0 reports and publishes.
        client.train_start("dct_seg", {"processes": 2, "device": "cpu", "max_epochs": 1})
        _wait_training(client, server)
        stats = client.info()["train_stats"]["dct_seg"]
        assert stats["processes"] == 2 and stats["epoch"] == stats["total_epochs"] == 1
        second_model = params["model"]
        _, params = client.infer("dct_seg", "case_007", {})
        assert params["model"]["mtime_ns"] > second_model["mtime_ns"], "2-process model not served"


def test_app_serves_all_models(tmp_path: Path) -> None:
    studies = write_demo_studies(
        tmp_path / "studies", num_images=3, num_labeled=1, shape=(16, 16, 16)
    )
    app_dir = copy_app(tmp_path / "app")
    conf = {
        "models": "all",
        "labels": json.dumps({"anterior": 1, "posterior": 2}),
        "duo_segnet.auto_train": "false",
    }
    with MonaiLabelServer(app_dir, studies.folder, conf, tmp_path / "server.log") as server:
        client = MONAILabelClient(server.url)
        info = client.info()
        assert set(info["models"]) == {"dct_seg", "duo_segnet"}
        for model in ("dct_seg", "duo_segnet"):
            assert info["models"][model]["labels"] == {"anterior": 1, "posterior": 2}
            assert model in info["trainers"]
            assert f"disagreement_{model}" in info["scoring"]
            with pytest.raises(MONAILabelClientException) as error:
                client.infer(model, "case_000", {})
            assert "not trained yet" in error.value.msg
        assert info["labels"] == ["anterior", "posterior"]
        assert server.process is not None and server.process.poll() is None
