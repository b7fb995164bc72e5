"""Model files that are damaged are never used: digests, publishing with the previous model
kept, fallback on load, no NaN weights published, and clear errors for images that cannot be
segmented."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cotrain.checkpoint import (
    MODEL_FILE,
    MODEL_FORMAT,
    CorruptModelError,
    load_file,
    load_model_with_fallback,
    previous_model_path,
    publish_model,
    save_atomically,
)
from cotrain.engine import TrainCallback, Trainer, TrainState
from cotrain.inference import EnsemblePredictor
from cotrain.input_checks import InvalidImageError
from cotrain.networks import Ensemble
from tests.conftest import TINY_NETWORK, tiny_config


def _flip_byte_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _model(path: Path, value: float) -> Path:
    return save_atomically({"weights": torch.full((2000,), value), "note": "m"}, path)


def test_a_bit_flip_that_torch_would_load_is_detected(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.pt", 1.0)
    assert load_file(path)["weights"][0] == 1.0
    _flip_byte_in_the_middle(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(CorruptModelError, match="does not match its SHA-256 digest"):
        load_file(path)


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.pt", 1.0)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CorruptModelError, match="not a readable cotrain model file"):
        load_file(path)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CorruptModelError, match="not a cotrain model file"):
        load_file(tmp_path / "foreign.pt")


def test_files_of_format_version_1_without_digest_still_load(tmp_path: Path) -> None:
    old = {"format": {**MODEL_FORMAT, "version": 1}, "weights": torch.ones(3)}
    torch.save(old, tmp_path / "v1.pt")
    assert load_file(tmp_path / "v1.pt")["weights"].sum() == 3


def test_publish_keeps_the_previous_model_and_loading_falls_back_to_it(tmp_path: Path) -> None:
    served = tmp_path / "model" / "dct_seg.pt"
    publish_model(_model(tmp_path / "a.pt", 1.0), served)
    assert not previous_model_path(served).exists()
    publish_model(_model(tmp_path / "b.pt", 2.0), served)
    assert previous_model_path(served) == tmp_path / "model" / "dct_seg.prev.pt"
    assert load_file(served)["weights"][0] == 2.0
    assert load_file(previous_model_path(served))["weights"][0] == 1.0
    assert not (tmp_path / "b.pt").exists()  # moved, not copied

    # A damaged source is never published; the served model stays.
    damaged = _model(tmp_path / "c.pt", 3.0)
    _flip_byte_in_the_middle(damaged)
    with pytest.raises(CorruptModelError):
        publish_model(damaged, served)
    assert load_file(served)["weights"][0] == 2.0

    # The served file damaged: the previous model is loaded, and the caller is told which.
    _flip_byte_in_the_middle(served)
    payload, source = load_model_with_fallback(served)
    assert source == previous_model_path(served) and payload["weights"][0] == 1.0

    # Publishing over a damaged served model does not replace the good previous one with it.
    publish_model(_model(tmp_path / "d.pt", 4.0), served)
    assert load_file(previous_model_path(served))["weights"][0] == 1.0

    # Nothing usable: one error naming both problems.
    _flip_byte_in_the_middle(served)
    _flip_byte_in_the_middle(previous_model_path(served))
    with pytest.raises(CorruptModelError, match=r"no usable model: .*previous model: .*digest"):
        load_model_with_fallback(served)


def test_no_model_means_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model_with_fallback(tmp_path / "missing.pt")


class PoisonAfterLastEpoch(TrainCallback):
    """Sets every weight to NaN once the last epoch ended (after its loss was computed)."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def on_epoch_end(self, state: TrainState) -> None:
        assert self.trainer is not None
        with torch.no_grad():
            for p in self.trainer.ensemble.parameters():
                p.fill_(float("nan"))


def test_nan_weights_are_never_published(synthetic_cases, tmp_path: Path) -> None:
    poison = PoisonAfterLastEpoch()
    trainer = Trainer(
        tiny_config(epochs=1, iterations_per_epoch=1),
        synthetic_cases[:2],
        [],
        tmp_path,
        callbacks=[poison],
    )
    poison.trainer = trainer
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        trainer.fit()
    assert not (tmp_path / MODEL_FILE).exists()


def test_warm_start_uses_the_previous_model_or_none_when_damaged(
    synthetic_cases, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cotrain")
    config = tiny_config(epochs=1, iterations_per_epoch=1, roi_size=(16, 16, 16))
    served = tmp_path / "served.pt"
    Trainer(config, synthetic_cases[:2], [], tmp_path / "a").fit()
    publish_model(tmp_path / "a" / MODEL_FILE, served)
    Trainer(config, synthetic_cases[:2], [], tmp_path / "b").fit()
    publish_model(tmp_path / "b" / MODEL_FILE, served)
    _flip_byte_in_the_middle(served)
    # The damaged served model falls back to the previous one; training goes on.
    Trainer(config, synthetic_cases[:2], [], tmp_path / "c", init_model=served).fit()
    assert (tmp_path / "c" / MODEL_FILE).exists()
    assert f"warm start from {previous_model_path(served)}" in caplog.text
    # Both damaged: a warning, and training from scratch.
    _flip_byte_in_the_middle(previous_model_path(served))
    Trainer(config, synthetic_cases[:2], [], tmp_path / "d", init_model=served).fit()
    assert (tmp_path / "d" / MODEL_FILE).exists()
    assert "not warm-starting: no usable model" in caplog.text


@pytest.fixture(scope="module")
def predictor() -> EnsemblePredictor:
    config = tiny_config(roi_size=(16, 16, 16))
    ensemble = Ensemble(2, 3, 1, config.num_classes, network=TINY_NETWORK)
    return EnsemblePredictor(ensemble, config, device="cpu")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("corrupt", "not a readable NIfTI file"),
        ("truncated", "cannot be read"),
        ("flat", "is 2D"),
        ("empty", r"empty \(0 bytes\)"),
        ("nan", "NaN or infinite voxels"),
    ],
)
def test_predicting_a_bad_image_names_the_problem(
    predictor: EnsemblePredictor, tmp_path: Path, kind: str, message: str
) -> None:
    path = tmp_path / f"{kind}.nii.gz"
    volume = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(1).bytes(4000))
    elif kind == "truncated":
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
        path.write_bytes(path.read_bytes()[:-2000])
    elif kind == "flat":
        nib.save(nib.Nifti1Image(volume[0], np.eye(4)), path)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        volume[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    with pytest.raises(InvalidImageError, match=message):
        predictor.predict_file(path)
