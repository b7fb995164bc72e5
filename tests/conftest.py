"""Shared fixtures: small synthetic volumes in MSD layout and tiny configurations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cotrain.config import TrainConfig
from cotrain.data import list_msd_cases
from cotrain.synthetic import write_synthetic_msd

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_NETWORK = {"channels": [8, 16, 32], "strides": [2, 2]}


@pytest.fixture(scope="session")
def synthetic_msd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic 32^3 cases (binary) in MSD layout."""
    root = tmp_path_factory.mktemp("synthetic_msd")
    write_synthetic_msd(root, 12, shape=(32, 32, 32))
    return root


@pytest.fixture(scope="session")
def synthetic_cases(synthetic_msd: Path) -> list[dict[str, str]]:
    return list_msd_cases(synthetic_msd)


def tiny_config(**overrides) -> TrainConfig:
    """A configuration that trains in seconds on 32^3 CPU volumes."""
    settings = {
        "method": "supervised",
        "members": 2,
        "labels": {"organ": 1},
        "roi_size": (32, 32, 32),
        "network": TINY_NETWORK,
        "epochs": 2,
        "iterations_per_epoch": 4,
        "learning_rate": 3e-3,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(autouse=True)
def _fast_torch() -> None:
    torch.set_num_threads(2)
