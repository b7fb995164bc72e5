"""Training in several local processes (cotrain.launch): the app's multi-GPU path, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cotrain.inference import EnsemblePredictor
from cotrain.launch import gpu_ids, process_count, train_in_processes
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the CPU choices; a GPU machine picks CUDA"
)


def test_process_count_on_a_machine_without_gpus() -> None:
    assert process_count("cpu") == (1, [])
    assert process_count("cpu", processes=2) == (2, [])
    assert gpu_ids("all") == []
    with pytest.raises(ValueError, match="only 0 GPU"):
        process_count("cuda", processes=2)
    with pytest.raises(ValueError, match="no CUDA device"):
        gpu_ids("0,1")
    with pytest.raises(ValueError, match="expected 'all' or indices"):
        gpu_ids("first")
    with pytest.raises(ValueError, match="processes must be >= 0"):
        process_count("cpu", processes=-1)


def test_two_processes_train_identical_members_and_publish_once(
    synthetic_cases: list[dict[str, str]], tmp_path: Path
) -> None:
    config = tiny_config(method="dct_seg", epochs=1, iterations_per_epoch=2, num_workers=0)
    output = tmp_path / "run"
    state = train_in_processes(
        2,
        {
            "config": config,
            "labeled": synthetic_cases[:3],
            "unlabeled": [{"image": c["image"]} for c in synthetic_cases[3:-1]],
            "output_dir": output,
            # Rank 0 alone validates: nothing in validation may wait for the other process.
            "validation": synthetic_cases[-1:],
        },
        device_type="cpu",
    )
    # The engine raised inside the workers if the two processes' members had drifted apart.
    assert state.epoch == 1 and state.iteration == 2
    assert 0.0 <= state.metrics["vote_dice"] <= 1.0 and len(state.metrics["member_dice"]) == 2
    assert {"supervised", "agreement", "diversity"} <= set(state.losses)
    predictor = EnsemblePredictor.load(output / "model.pt", device="cpu")
    assert len(predictor.ensemble.members) == 2


def test_a_failing_process_fails_the_run_without_publishing(
    synthetic_cases: list[dict[str, str]], tmp_path: Path
) -> None:
    missing = {"image": str(tmp_path / "gone.nii.gz"), "label": str(tmp_path / "gone_l.nii.gz")}
    output = tmp_path / "run"
    with pytest.raises(mp.ProcessRaisedException, match="gone"):
        train_in_processes(
            2,
            {
                "config": tiny_config(epochs=1, iterations_per_epoch=1, num_workers=0),
                "labeled": [missing],
                "unlabeled": [],
                "output_dir": output,
            },
            device_type="cpu",
        )
    assert not (output / "model.pt").exists()
