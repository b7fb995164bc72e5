"""The app's datastore and infer task in-process: processes that write the studies folder at
the same time never drop each other's labels, an unreadable datastore JSON does not stop the
server nor lose labels, and a model that cannot be verified is never served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import HTTPException

from cotrain.checkpoint import previous_model_path, publish_model, save_atomically
from cotrain.networks import Ensemble
from cotrain.studies import write_demo_studies
from tests.app_helpers import use_app_lib
from tests.conftest import TINY_NETWORK, tiny_config

use_app_lib()

from lib.datastore import CheckedLocalDatastore  # noqa: E402
from lib.infers import EnsembleInfer  # noqa: E402

LABELS = {"organ": 1}


def _datastore(folder: Path) -> CheckedLocalDatastore:
    return CheckedLocalDatastore(str(folder), labels=LABELS, auto_reload=False)


def test_two_writers_never_drop_each_others_labels(tmp_path: Path) -> None:
    truth = tmp_path / "truth"
    studies = write_demo_studies(
        tmp_path / "studies", num_images=4, num_labeled=1, shape=(8, 8, 8), truth_dir=truth
    )
    server = _datastore(studies.folder)  # e.g. the server process
    scoring = _datastore(studies.folder)  # e.g. a scoring subprocess, loaded before the save
    server.save_label("case_001", str(truth / "case_001.nii.gz"), "final", {"user": "rad-a"})
    # The second writer has not seen the label; its update must not drop it.
    scoring.update_image_info("case_002", {"disagreement_dct_seg": {"score": 0.5}})
    stored = json.loads((studies.folder / "datastore_v2.json").read_text())["objects"]
    assert stored["case_001"]["labels"]["final"]["info"]["user"] == "rad-a"
    assert stored["case_002"]["image"]["info"]["disagreement_dct_seg"] == {"score": 0.5}
    server.refresh()
    assert server.get_image_info("case_002")["disagreement_dct_seg"] == {"score": 0.5}
    assert sorted(server.get_labeled_images()) == ["case_000", "case_001"]


def test_an_unreadable_datastore_json_is_set_aside_and_labels_kept(tmp_path: Path) -> None:
    studies = write_demo_studies(tmp_path / "studies", num_images=3, num_labeled=2, shape=(8, 8, 8))
    _datastore(studies.folder)
    config = studies.folder / "datastore_v2.json"
    config.write_text(config.read_text()[:40])  # e.g. a crash in the middle of a write
    datastore = _datastore(studies.folder)
    assert sorted(datastore.get_labeled_images()) == ["case_000", "case_001"]
    assert json.loads(config.read_text())["objects"]  # rebuilt
    assert len(list(studies.folder.glob("datastore_v2.json.unreadable-*"))) == 1


def _save_model(path: Path) -> Path:
    """An (untrained) ensemble in the served-model format."""
    config = tiny_config(roi_size=(16, 16, 16))
    ensemble = Ensemble(2, 3, 1, config.num_classes, network=TINY_NETWORK)
    payload = {
        "config": config.to_dict(),
        "ensemble": {"spec": ensemble.spec, "state_dict": ensemble.state_dict()},
    }
    return save_atomically(payload, path)


def _damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_model_that_does_not_verify_is_never_served(tmp_path: Path) -> None:
    studies = write_demo_studies(
        tmp_path / "studies", num_images=1, num_labeled=0, shape=(12, 12, 12)
    )
    image = str(studies.folder / "case_000.nii.gz")
    served = tmp_path / "model" / "dct_seg.pt"
    publish_model(_save_model(tmp_path / "a.pt"), served)
    publish_model(_save_model(tmp_path / "b.pt"), served)

    # The served file damaged before the server starts: the previous model answers.
    _damage(served)
    infer = EnsembleInfer(str(served), LABELS)
    _, params = infer({"image": image})
    assert params["model"]["file"] == "dct_seg.prev.pt"

    # Damaged after loading: the loaded model keeps answering.
    publish_model(_save_model(tmp_path / "c.pt"), served)
    _, params = infer({"image": image})
    assert params["model"]["file"] == "dct_seg.pt"
    _damage(served)
    _damage(previous_model_path(served))
    _, params = infer({"image": image})
    assert params["model"]["file"] == "dct_seg.pt"

    # Nothing usable and nothing loaded (a restart): 503 saying so.
    with pytest.raises(HTTPException) as error:
        EnsembleInfer(str(served), LABELS)({"image": image})
    assert error.value.status_code == 503
    assert "cannot be served" in error.value.detail and "Retrain" in error.value.detail
