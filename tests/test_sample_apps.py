"""Sample apps start like ``apps/cotrain`` and serve their own adapted model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from cotrain.inference import EnsemblePredictor
from cotrain.studies import write_demo_studies
from tests.app_helpers import (
    APP_DIR,
    NO_SCORING_ENV,
    REPO_ROOT,
    MonaiLabelServer,
    dice,
    wait_for_training,
)

pytestmark = pytest.mark.server

SAMPLE_APP = REPO_ROOT / "sample-apps" / "ct_segresnet"


def _as_hounsfield_units(image_path: Path) -> None:
    """Rescale a synthetic image to CT numbers: background -150 HU, organ up to about +150."""
    image = nib.load(image_path)
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    voxels = (voxels - voxels.min()) / (voxels.max() - voxels.min()) * 300.0 - 150.0
    nib.save(nib.Nifti1Image(voxels.astype(np.int16), image.affine), image_path)


def test_ct_segresnet_sample_app_trains_and_serves_its_model(tmp_path: Path) -> None:
    truth_dir = tmp_path / "truth"
    studies = write_demo_studies(
        tmp_path / "studies", num_images=5, num_labeled=3, shape=(32, 32, 32), truth_dir=truth_dir
    )
    for image_path in studies.folder.glob("*.nii.gz"):
        _as_hounsfield_units(image_path)
    app_dir = shutil.copytree(
        SAMPLE_APP, tmp_path / "app", ignore=shutil.ignore_patterns("model", "logs", "__pycache__")
    )
    # The sample's own labels, network, CT window and spacing; only its size is made tiny.
    conf = {
        "roi_size": "[16,16,16]",
        "network": json.dumps(
            {
                "architecture": "segresnet",
                "init_filters": 8,
                "blocks_down": [1, 1],
                "blocks_up": [1],
            }
        ).replace(" ", ""),
        "epochs": "4",
        "iterations_per_epoch": "10",
        "learning_rate": "0.003",
        "num_workers": "0",
        "val_split": "0",
    }
    env = {**NO_SCORING_ENV, "COTRAIN_APP_DIR": str(APP_DIR)}
    with MonaiLabelServer(app_dir, studies.folder, conf, tmp_path / "server.log", env) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path / "client"))
        (tmp_path / "client").mkdir()
        info = client.info()
        assert list(info["models"]) == ["spleen_ct"]
        assert info["models"]["spleen_ct"]["labels"] == {"spleen": 1}
        assert "SegResNet" in info["models"]["spleen_ct"]["description"]

        # Three final labels and no model yet: the server starts the first training itself.
        assert client.train_status()["status"] in ("SUBMITTED", "RUNNING", "DONE")
        task = wait_for_training(client, server, 420.0)
        assert task["status"] == "DONE", task.get("details")

        model = EnsemblePredictor.load(app_dir / "model" / "spleen_ct.pt", device="cpu")
        assert model.config.network["architecture"] == "segresnet"
        assert model.config.intensity == "ct:-160,240"
        assert model.config.target_spacing == (1.5, 1.5, 2.0)

        label_file, _ = client.infer("spleen_ct", "case_004", {})
        image = nib.load(studies.folder / "case_004.nii.gz")
        label = nib.load(label_file)
        assert label.shape == image.shape
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
        truth = np.asarray(nib.load(truth_dir / "case_004.nii.gz").dataobj)
        score = dice(np.asarray(label.dataobj), truth)
        assert score > 0.5, f"Dice {score:.3f} against ground truth"
