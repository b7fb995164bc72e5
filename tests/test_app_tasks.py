"""The app's train, infer and scoring tasks in-process, on a real MONAI Label local datastore:
publishing, warm start, hot reload of a new model, a failed run leaving the served model
alone, and disagreement scores."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.exception import MONAILabelException

from cotrain.config import TrainConfig
from cotrain.files import write_json_atomically
from cotrain.studies import import_msd_studies, write_demo_studies
from tests.app_helpers import SHARED_DATA, use_app_lib

use_app_lib()

from lib.infers import EnsembleInfer  # noqa: E402
from lib.scoring import EnsembleDisagreement, last_run, scoring_status  # noqa: E402
from lib.trainers import CoTrainTask  # noqa: E402
from lib.trainers.stats import process_start_time  # noqa: E402

HIPPOCAMPUS = SHARED_DATA / "hippocampus"
TINY = {
    "method": "dct_seg",
    "members": 2,
    "labels": {"organ": 1},
    "roi_size": (16, 16, 16),
    "network": {"channels": [8, 16, 32], "strides": [2, 2]},
    "epochs": 1,
    "iterations_per_epoch": 3,
    "batch_size": 1,
    "unlabeled_batch_size": 1,
    "num_workers": 0,
}


@dataclass
class Served:
    """A trained model served from ``model_dir``, with its datastore."""

    studies: Path
    datastore: LocalDatastore
    model_dir: Path
    task: CoTrainTask
    infer: EnsembleInfer

    @property
    def model_path(self) -> Path:
        return self.model_dir / "dct_seg.pt"


def _make_task(model_dir: Path) -> CoTrainTask:
    return CoTrainTask(
        name="dct_seg",
        model_path=str(model_dir / "dct_seg.pt"),
        work_dir=str(model_dir / "dct_seg"),
        train_config=TrainConfig.from_dict(TINY),
        val_split=0.34,
        val_min_labels=3,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp("app_tasks")
    write_demo_studies(root / "studies", num_images=5, num_labeled=3, shape=(20, 20, 20))
    datastore = LocalDatastore(str(root / "studies"), auto_reload=False)
    model_dir = root / "model"
    task = _make_task(model_dir)
    infer = EnsembleInfer(str(model_dir / "dct_seg.pt"), {"organ": 1})
    return Served(root / "studies", datastore, model_dir, task, infer)


def test_infer_before_training_is_a_clear_error(served: Served) -> None:
    assert served.infer.is_valid()
    assert served.infer.get_path() is None
    with pytest.raises(HTTPException) as error:
        served.infer({"image": str(served.studies / "case_004.nii.gz")})
    assert error.value.status_code == 503
    assert "not trained yet" in error.value.detail


def test_infer_during_the_first_training_says_when_it_should_end(tmp_path: Path) -> None:
    """A radiologist who presses auto-segment while the first training runs learns how far
    it is and when to retry; once that process is gone, the answer is the usual one."""
    write_demo_studies(tmp_path / "studies", num_images=1, num_labeled=0, shape=(16, 16, 16))
    image = {"image": str(tmp_path / "studies" / "case_000.nii.gz")}
    stats_path = tmp_path / "train_stats.json"
    infer = EnsembleInfer(str(tmp_path / "dct_seg.pt"), {"organ": 1}, stats_path=str(stats_path))
    end = 1_800_000_000  # 2027-01-15 08:00:00 UTC
    running = {
        "status": "RUNNING",
        "pid": os.getpid(),
        "pid_started": process_start_time(),
        "epoch": 3,
        "total_epochs": 10,
        "progress": 0.35,
        "expected_end_ts": end,
    }
    write_json_atomically(running, stats_path)
    with pytest.raises(HTTPException) as error:
        infer(image)
    assert error.value.status_code == 503
    assert "first training is running (epoch 3/10, 35% done" in error.value.detail
    assert "expected to end at 08:00:00 UTC" in error.value.detail
    # The training process is gone (killed): no promise of an end.
    write_json_atomically({**running, "pid_started": 1.0}, stats_path)
    with pytest.raises(HTTPException) as error:
        infer(image)
    assert "no ensemble has been published" in error.value.detail


def test_train_publishes_and_infer_picks_up_new_models(served: Served) -> None:
    stats = served.task({}, served.datastore)
    assert stats["status"] == "DONE"
    assert stats["labeled"] == 2 and stats["validation"] == 1 and stats["unlabeled"] == 2
    assert stats["warm_start"] is False
    assert served.model_path.is_file()
    assert served.task.stats() == stats
    runs = list((served.model_dir / "dct_seg" / "runs").iterdir())
    assert len(runs) == 1 and not (runs[0] / "model.pt").exists()  # moved, not copied

    image_path = served.studies / "case_004.nii.gz"
    label_file, params = served.infer({"image": str(image_path)})
    image, label = nib.load(image_path), nib.load(label_file)
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine)
    assert params["label_names"] == {"organ": 1}
    assert "uncertainty" not in params
    first = params["model"]["mtime_ns"]
    Path(label_file).unlink()

    stats = served.task({"max_epochs": 2}, served.datastore)
    assert stats["warm_start"] is True and stats["total_epochs"] == 2 and stats["epoch"] == 2
    label_file, params = served.infer({"image": str(image_path), "uncertainty": "true"})
    assert params["model"]["mtime_ns"] > first
    uncertainty = nib.load(params["uncertainty"]["file"])
    assert uncertainty.shape == image.shape
    assert params["uncertainty"]["max"] >= params["uncertainty"]["mean"] >= 0.0
    for file in (label_file, params["uncertainty"]["file"]):
        Path(file).unlink()
    assert len(list((served.model_dir / "dct_seg" / "runs").iterdir())) == 2


def test_failed_run_leaves_the_served_model(served: Served, tmp_path: Path) -> None:
    if not served.model_path.exists():
        served.task({}, served.datastore)
    studies = shutil.copytree(served.studies, tmp_path / "studies")
    # Unreadable labels are skipped; with none left to train on, the run fails.
    for label in (studies / "labels" / "final").glob("*.nii.gz"):
        label.write_bytes(b"not a NIfTI file")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy2(served.model_path, model_dir / "dct_seg.pt")
    before = (model_dir / "dct_seg.pt").read_bytes()
    task = _make_task(model_dir)

    with pytest.raises(MONAILabelException, match="no usable final labels"):
        task({}, LocalDatastore(str(studies), auto_reload=False))
    assert (model_dir / "dct_seg.pt").read_bytes() == before
    stats = task.stats()
    assert stats["status"] == "FAILED" and "no usable final labels" in stats["error"]
    assert "not a readable NIfTI file" in stats["skipped"]["case_001.nii.gz"]
    assert "total_time" in stats


def test_train_without_labels_fails_clearly(tmp_path: Path) -> None:
    write_demo_studies(tmp_path / "studies", num_images=2, num_labeled=0, shape=(8, 8, 8))
    task = _make_task(tmp_path / "model")
    with pytest.raises(MONAILabelException, match="no final labels"):
        task({}, LocalDatastore(str(tmp_path / "studies"), auto_reload=False))
    assert not (tmp_path / "model" / "dct_seg.pt").exists()


def test_scoring_stores_disagreement_once_per_model(served: Served) -> None:
    if not served.model_path.exists():
        served.task({}, served.datastore)
    scoring = EnsembleDisagreement("dct_seg", str(served.model_path))
    done = {"scored": 2, "skipped": 0, "invalid": 0, "deferred": 0}
    assert scoring({}, served.datastore) == done
    for image in ("case_003", "case_004"):
        entry = served.datastore.get_image_info(image)["disagreement_dct_seg"]
        assert entry["score"] >= 0.0 and 0.0 <= entry["dice_error"] <= 1.0
        assert entry["model_ts"] == served.model_path.stat().st_mtime_ns
    assert "disagreement_dct_seg" not in served.datastore.get_image_info("case_000")
    assert scoring({}, served.datastore) == {"scored": 0, "skipped": 2, "invalid": 0, "deferred": 0}


def test_scoring_within_budget_scores_new_studies_first_then_oldest(
    served: Served, tmp_path: Path
) -> None:
    """A budget too small for more than one study: each run scores one, never-scored studies
    first (the newest study first, else id order), then, after a new model, the oldest score
    first; ``scoring_status`` (``/info``) counts them."""
    if not served.model_path.exists():
        served.task({}, served.datastore)
    write_demo_studies(tmp_path / "studies", num_images=4, num_labeled=1, shape=(20, 20, 20))
    datastore = LocalDatastore(str(tmp_path / "studies"), auto_reload=False)
    model = tmp_path / "dct_seg.pt"
    shutil.copy(served.model_path, model)
    record = tmp_path / "scoring.json"
    scoring = EnsembleDisagreement("dct_seg", str(model), 1e-9, record_path=str(record))
    key = "disagreement_dct_seg"
    assert scoring_status(datastore, key, str(model)) == {
        "unlabeled": 3,
        "scored_with_current_model": 0,
        "scored_with_older_model": 0,
        "never_scored": 3,
    }

    order = []
    for _ in range(3):
        before = {i: datastore.get_image_info(i).get(key) for i in datastore.get_unlabeled_images()}
        assert scoring({}, datastore)["scored"] == 1
        order += [i for i, e in before.items() if datastore.get_image_info(i).get(key) != e]
    assert order == ["case_001", "case_002", "case_003"]
    assert scoring({}, datastore) == {"scored": 0, "skipped": 3, "invalid": 0, "deferred": 0}

    # A study that arrives while others still wait for their first score is scored first.
    for image in ("case_002", "case_003"):
        datastore.update_image_info(image, {"disagreement_dct_seg": None})
    datastore.update_image_info("case_003", {"ts": datastore.get_image_info("case_002")["ts"] + 5})
    assert scoring({}, datastore)["scored"] == 1
    assert isinstance(datastore.get_image_info("case_003")[key], dict)
    assert datastore.get_image_info("case_002")[key] is None
    assert scoring({}, datastore)["scored"] == 1

    # A new model: every score is stale; the oldest is redone first.
    for image, ts in (("case_001", 300), ("case_002", 100), ("case_003", 200)):
        entry = dict(datastore.get_image_info(image)[key], ts=ts)
        datastore.update_image_info(image, {key: entry})
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    status = scoring_status(datastore, key, str(model))
    assert status["scored_with_older_model"] == 3 and status["scored_with_current_model"] == 0
    assert scoring({}, datastore) == {"scored": 1, "skipped": 0, "invalid": 0, "deferred": 2}
    current = model.stat().st_mtime_ns
    recorded = last_run(str(record))
    assert recorded["model_ts"] == current and recorded["deferred"] == 2
    assert recorded["seconds"] >= 0
    assert datastore.get_image_info("case_002")[key]["model_ts"] == current
    assert datastore.get_image_info("case_003")[key]["model_ts"] != current
    # A request's budget overrides the configured one (0: no bound).
    assert scoring({"budget_minutes": 0}, datastore)["scored"] == 2
    assert scoring_status(datastore, key, str(model))["scored_with_current_model"] == 3


def test_scoring_without_model(tmp_path: Path) -> None:
    write_demo_studies(tmp_path / "studies", num_images=2, num_labeled=1, shape=(8, 8, 8))
    scoring = EnsembleDisagreement("dct_seg", str(tmp_path / "missing.pt"))
    result = scoring({}, LocalDatastore(str(tmp_path / "studies"), auto_reload=False))
    assert result["scored"] == 0 and "no model" in result["reason"]


@pytest.mark.slow
@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"hippocampus data not found at {HIPPOCAMPUS}")
def test_hippocampus_studies_train_and_infer(tmp_path: Path) -> None:
    """Real MR data with two labels: imported studies train and infer on each image's grid."""
    studies = import_msd_studies(HIPPOCAMPUS, tmp_path / "studies", num_labeled=3)
    datastore = LocalDatastore(str(studies.folder), auto_reload=False)
    config = {**TINY, "labels": {"anterior": 1, "posterior": 2}, "roi_size": (32, 32, 32)}
    task = CoTrainTask(
        "dct_seg",
        str(tmp_path / "model" / "dct_seg.pt"),
        str(tmp_path / "model" / "dct_seg"),
        TrainConfig.from_dict(config),
    )
    stats = task({}, datastore)
    assert stats["status"] == "DONE" and stats["labeled"] == 3 and stats["unlabeled"] == 197

    infer = EnsembleInfer(str(tmp_path / "model" / "dct_seg.pt"), config["labels"])
    image_path = datastore.get_image_uri(studies.unlabeled[0])
    label_file, params = infer({"image": image_path})
    image, label = nib.load(image_path), nib.load(label_file)
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
    assert params["label_names"] == {"anterior": 1, "posterior": 2}
