"""Bad settings are refused with a message that names them."""

from __future__ import annotations

import pytest

from cotrain.checkpoint import load_file, save_atomically
from cotrain.config import TrainConfig, parse_intensity


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "dct"}, "unknown method 'dct'"),
        ({"method": "dct_seg", "members": 1}, "needs members >= 2"),
        ({"roi_size": (32, 32, 32, 32)}, "roi_size must have 2 or 3 values"),
        ({"labels": {"a": 1, "b": 3}}, "without gaps"),
        ({"intensity": "ct:100,-100"}, "LOW must be below HIGH"),
        ({"intensity": "minmax"}, "intensity must be"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"target_spacing": (1.0, 1.0)}, "target_spacing"),
        ({"method": "supervised", "perturb_unlabeled": True}, "not to 'supervised'"),
        ({"unlabeled_cutout": 0.5}, "unlabeled_cutout needs perturb_unlabeled"),
        ({"perturb_unlabeled": True, "unlabeled_cutout": 1.0}, "unlabeled_cutout must be in"),
        ({"augmentation": "heavy"}, "augmentation must be one of flip, strong"),
        ({"optimizer": "adam"}, "optimizer must be one of adamw, sgd"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ],
)
def test_invalid_settings_are_named(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_round_trip_and_unknown_keys() -> None:
    config = TrainConfig(
        method="duo_segnet", roi_size=(64, 64, 32), target_spacing=(1, 1, 2), labels={"liver": 1}
    )
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="learningrate"):
        TrainConfig.from_dict({**config.to_dict(), "learningrate": 1})


def test_intensity_parsing() -> None:
    assert parse_intensity("zscore") == ("zscore", None)
    assert parse_intensity("ct:-1000,1000") == ("ct", (-1000.0, 1000.0))


def test_foreign_or_truncated_model_files_are_refused(tmp_path) -> None:
    path = save_atomically({"config": {}, "ensemble": {}}, tmp_path / "model.pt")
    assert load_file(path)["config"] == {}
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable cotrain model file"):
        load_file(truncated)
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "missing.pt")
    assert not list(tmp_path.glob(".*.tmp"))


def test_former_setting_names_still_load() -> None:
    """Model files written before ``views`` was renamed ``members`` keep loading."""
    old = TrainConfig(members=3).to_dict()
    old["views"] = old.pop("members")
    assert TrainConfig.from_dict(old).members == 3
