"""A real server under load: 20 label submits within 10 s while a training runs are all stored,
never more than one training runs and one waits, and the final model is trained on all of
them; 8 inference requests at once all get their own image's correct label, with the server's
memory bounded."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from monailabel.client import MONAILabelClient

from cotrain.studies import write_demo_studies
from cotrain.synthetic import make_synthetic_case
from tests.app_helpers import (
    NO_SCORING_ENV,
    TINY_SERVER_CONF,
    MonaiLabelServer,
    copy_app,
    wait_for,
    wait_for_training,
)

pytestmark = pytest.mark.server

SHAPE = (16, 16, 16)
SUBMITS = 20
TIMEOUT_S = 300.0
#: Unlabeled images of other shapes, so that a label returned for the wrong request shows.
ODD_SHAPES = {
    "odd_a": (20, 16, 12),
    "odd_b": (12, 20, 16),
    "odd_c": (16, 12, 20),
    "odd_d": (18, 14, 16),
}
#: How much the server's resident memory may grow while it answers 8 requests at once.
MEMORY_BOUND_MB = 300


def _train_tasks(server: MonaiLabelServer) -> list[dict[str, Any]]:
    response = requests.get(f"{server.url}/train/", params={"all": "true"}, timeout=30)
    return response.json() if response.status_code == 200 else []


def _infer(url: str, image: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The label of ``image`` and its affine, from a client of its own."""
    label_file, _ = MONAILabelClient(url, tmpdir=str(folder)).infer("dct_seg", image, {})
    label = nib.load(label_file)
    return np.asarray(label.dataobj), label.affine


def test_label_bursts_and_concurrent_inference(tmp_path: Path) -> None:
    truth = tmp_path / "truth"
    num_images = 2 + SUBMITS + 4
    studies = write_demo_studies(
        tmp_path / "studies", num_images=num_images, num_labeled=2, shape=SHAPE, truth_dir=truth
    )
    for i, (name, shape) in enumerate(ODD_SHAPES.items()):
        image, _ = make_synthetic_case(shape, seed=100 + i)
        nib.save(
            nib.Nifti1Image(image, np.diag([1.0, 1.2, 1.5, 1.0])), studies.folder / f"{name}.nii.gz"
        )
    submitted = studies.unlabeled[:SUBMITS]
    unlabeled = studies.unlabeled[SUBMITS:] + list(ODD_SHAPES)
    app_dir = copy_app(tmp_path / "app")
    conf = {**TINY_SERVER_CONF, "test_fault_injection": "true"}
    with MonaiLabelServer(
        app_dir, studies.folder, conf, tmp_path / "server.log", env=NO_SCORING_ENV
    ) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path))

        # A training runs (it has read the datastore once it reports an epoch; the test hook
        # makes it last at least 6 s whatever the CPU) ...
        client.train_start("dct_seg", {"max_epochs": 12, "test_fault": "slow"})
        wait_for(
            lambda: client.info()["train_stats"]["dct_seg"].get("epoch", 0) >= 1,
            TIMEOUT_S,
            "the first run to train",
            0.2,
        )
        # ... while 20 labels are submitted.
        outcomes, most_running, most_waiting = [], 0, 0
        start = time.monotonic()
        for image in submitted:
            response = client.save_label(image, str(truth / f"{image}.nii.gz"))
            outcomes.append(response["train"]["dct_seg"])
            statuses = [t["status"] for t in _train_tasks(server)]
            most_running = max(most_running, statuses.count("RUNNING"))
            most_waiting = max(most_waiting, statuses.count("SUBMITTED"))
        burst_s = time.monotonic() - start
        assert burst_s < 10.0, f"20 submits took {burst_s:.1f}s"
        assert most_running <= 1 and most_waiting <= 1, (most_running, most_waiting)
        assert outcomes[0] == "queued", outcomes  # the first run was still training
        assert set(outcomes) <= {"queued", "coalesced"} and outcomes.count("queued") <= 2, outcomes

        # Every label is stored, files and JSON; the last run trained on all of them.
        assert wait_for_training(client, server, TIMEOUT_S)["status"] == "DONE"
        objects = json.loads((studies.folder / "datastore_v2.json").read_text())["objects"]
        for image in submitted:
            assert (studies.folder / "labels" / "final" / f"{image}.nii.gz").is_file()
            assert "final" in objects[image]["labels"], image
        stats = client.info()["train_stats"]["dct_seg"]
        assert stats["status"] == "DONE" and stats["labeled"] + stats["validation"] == 2 + SUBMITS
        assert len(_train_tasks(server)) <= 1 + outcomes.count("queued")

        # 8 inference requests at once: each gets the label of its own image (the same as
        # when asked alone), on that image's grid; memory stays bounded.
        folder = tmp_path / "infer"
        folder.mkdir()
        alone = {}
        for image in unlabeled:
            (folder / image).mkdir()
            alone[image] = _infer(server.url, image, folder / image)
        process = psutil.Process(server.process.pid)
        baseline = process.memory_info().rss
        peak = [baseline]
        done = threading.Event()

        def sample_memory() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample_memory)
        sampler.start()
        try:
            with ThreadPoolExecutor(max_workers=len(unlabeled)) as pool:
                results = dict(
                    zip(
                        unlabeled,
                        pool.map(lambda i: _infer(server.url, i, folder / i), unlabeled),
                        strict=True,
                    )
                )
        finally:
            done.set()
            sampler.join()
        for image, (label, affine) in results.items():
            reference = nib.load(studies.folder / f"{image}.nii.gz")
            assert label.shape == reference.shape, image
            np.testing.assert_allclose(affine, reference.affine, atol=1e-4)
            np.testing.assert_array_equal(label, alone[image][0])
        growth_mb = (peak[0] - baseline) / 2**20
        assert growth_mb < MEMORY_BOUND_MB, f"server memory grew by {growth_mb:.0f} MB"
        assert client.info()["models"]["dct_seg"]  # still answering
