"""Auto-segment returns what a full inversion would, while inverting only what it returns."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cotrain.config import TrainConfig
from cotrain.inference import EnsemblePredictor, soft_vote
from cotrain.networks import Ensemble
from tests.conftest import TINY_NETWORK


def _ct_like(path: Path) -> Path:
    """A small anisotropic CT-like volume (0.8 x 0.8 x 2.5 mm) with a bright box."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 200, (64, 60, 20)).astype(np.int16)
    volume[20:40, 25:45, 5:15] += 600
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def _predictor(labels: dict[str, int], identical_members: bool = False) -> EnsemblePredictor:
    config = TrainConfig(
        method="supervised",
        labels=labels,
        roi_size=(32, 32, 16),
        target_spacing=(1.5, 1.5, 2.0),
        intensity="ct:-1000,1000",
        network=TINY_NETWORK,
    )
    ensemble = Ensemble(2, 3, 1, config.num_classes, seed=1, network=config.network)
    with torch.no_grad():
        for parameter in ensemble.parameters():
            parameter.mul_(3)  # sharper outputs than a fresh network's, so labels are not ties
        if identical_members:
            ensemble.members[1].load_state_dict(ensemble.members[0].state_dict())
    return EnsemblePredictor(ensemble, config, device="cpu")


@pytest.mark.parametrize("labels", [{"organ": 1}, {"liver": 1, "tumour": 2}])
def test_labels_equal_the_argmax_of_every_inverted_probability(labels, tmp_path: Path) -> None:
    """Resampled back from 1.5 x 1.5 x 2 mm, the served and members' labels are those of the
    old full inversion (all class probabilities of the vote and of every member)."""
    image_path = _ct_like(tmp_path / "ct.nii.gz")
    predictor = _predictor(labels)
    prediction = predictor.predict_file(image_path, members=True, uncertainty=True)

    image = predictor.load_image(image_path)
    logits = predictor.member_logits(image)
    every_class = torch.cat([soft_vote(logits)[0], torch.softmax(logits[:, 0], 1).flatten(0, 1)])
    restored = predictor._to_image_grid(every_class, image)
    num_classes = len(labels) + 1
    label = restored[:num_classes].argmax(0).numpy()
    member_labels = restored[num_classes:].reshape(2, num_classes, *label.shape).argmax(1).numpy()

    assert prediction.label.shape == (64, 60, 20)
    assert len(np.unique(label)) == num_classes  # every class occurs: the check means something
    np.testing.assert_array_equal(prediction.label, label)
    np.testing.assert_array_equal(prediction.member_labels, member_labels)
    assert prediction.uncertainty.shape == (64, 60, 20)
    assert (prediction.uncertainty >= -1e-6).all()


def test_uncertainty_is_computed_only_when_asked(tmp_path: Path) -> None:
    image_path = _ct_like(tmp_path / "ct.nii.gz")
    predictor = _predictor({"organ": 1})
    prediction = predictor.predict_file(image_path)
    assert prediction.uncertainty is None and prediction.member_labels is None
    with pytest.raises(ValueError, match="uncertainty=True"):
        predictor.write_prediction(prediction, tmp_path / "l.nii.gz", tmp_path / "u.nii.gz")


def test_score_is_zero_when_members_agree_and_positive_when_they_differ(tmp_path: Path) -> None:
    """The active-learning score, computed on the model's grid, ranks by disagreement."""
    image_path = _ct_like(tmp_path / "ct.nii.gz")
    assert _predictor({"organ": 1}, identical_members=True).mean_disagreement(image_path) < 1e-7
    differing = _predictor({"organ": 1})
    score = differing.mean_disagreement(image_path)
    mean_on_image = differing.predict_file(image_path, uncertainty=True).uncertainty.mean()
    assert score > 1e-4
    assert score == pytest.approx(mean_on_image, rel=0.2)
