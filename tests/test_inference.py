"""Auto-segment returns what a full inversion would, while inverting only what it returns."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from cotrain import inference
from cotrain.config import TrainConfig
from cotrain.inference import (
    EnsemblePredictor,
    invert_axis_aligned_resampling,
    labels_from_foreground,
    soft_vote,
)
from cotrain.losses import jensen_shannon_map
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


def _on_model_grid(channels: torch.Tensor, image: MetaTensor) -> MetaTensor:
    """The channels with the preprocessed image's metadata and its own copy of the steps."""
    return MetaTensor(channels, meta=image.meta, applied_operations=list(image.applied_operations))


def _monai_inverse(predictor: EnsemblePredictor, channels: torch.Tensor, image) -> torch.Tensor:
    """The channels back through MONAI's own inverse of every preprocessing step."""
    stacked = _on_model_grid(channels, image)
    return predictor._preprocess.inverse({"image": stacked})["image"].as_tensor()


#: Image grids: axis order, origin and direction that the resampling must all get right.
AFFINES = pytest.mark.parametrize(
    "affine",
    [
        np.diag([0.8, 0.8, 2.5, 1.0]),  # RAS, origin 0
        np.array([[-0.7, 0, 0, 90.0], [0, -0.9, 0, 120.3], [0, 0, 3.0, -41.7], [0, 0, 0, 1]]),
        np.array([[0, 0, 2.5, 10.0], [0.8, 0, 0, -3.3], [0, -0.8, 0, 55.0], [0, 0, 0, 1]]),
        np.array(  # oblique: 20 degrees about the z axis
            [[0.752, -0.274, 0, 0], [0.274, 0.752, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]]
        ),
    ],
    ids=["ras", "lps-with-origin", "axes-permuted", "oblique"],
)


@AFFINES
def test_the_preprocessing_equals_monais(
    affine: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resampling to the model's spacing, run without MONAI's dense grid, gives MONAI's
    image (same values to float32 precision, grid and record), so training (MONAI's) and an
    exported bundle see what the server sees."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 200, (37, 29, 11)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "ct.nii.gz"))
    predictor = _predictor({"organ": 1})
    calls = []
    resample = inference.resample_axis_aligned
    monkeypatch.setattr(
        inference, "resample_axis_aligned", lambda *a: calls.append(a) or resample(*a)
    )
    image = predictor.load_image(tmp_path / "ct.nii.gz")
    assert len(calls) == 1 and calls[0][0].dtype == torch.float64  # the fast path, in float64
    reference = predictor._preprocess({"image": str(tmp_path / "ct.nii.gz")})["image"]

    assert image.shape == reference.shape and image.dtype == reference.dtype
    torch.testing.assert_close(image.as_tensor(), reference.as_tensor(), atol=1e-6, rtol=0)
    torch.testing.assert_close(image.affine, reference.affine)
    assert not image.pending_operations
    ours, monais = image.applied_operations, reference.applied_operations
    assert [op["class"] for op in ours] == [op["class"] for op in monais]
    assert ours[-1]["orig_size"] == monais[-1]["orig_size"] and ours[-1]["lazy"] is False
    for key, value in monais[-1]["extra_info"].items():
        assert str(ours[-1]["extra_info"][key]) == str(value)


@AFFINES
def test_the_inversion_to_the_image_grid_equals_monais(affine: np.ndarray, tmp_path: Path) -> None:
    """The resampling back from the model's spacing, done without MONAI's dense grid, gives
    MONAI's values (float32 rounding) and its labels, whatever the image's axis order, origin
    and direction (``Spacing`` keeps the directions, so its grids differ per axis only)."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 200, (37, 29, 11)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "ct.nii.gz"))
    predictor = _predictor({"liver": 1, "tumour": 2})
    image = predictor.load_image(tmp_path / "ct.nii.gz")
    channels = torch.softmax(torch.randn(3, *image.shape[1:]) * 4, 0)

    assert invert_axis_aligned_resampling(_on_model_grid(channels, image)) is not None  # fast path
    fast = predictor._to_image_grid(channels, image)
    reference = _monai_inverse(predictor, channels, image)
    assert fast.shape == reference.shape == (3, 37, 29, 11)
    torch.testing.assert_close(fast, reference.float(), atol=1e-4, rtol=0)
    assert (fast.argmax(0) != reference.argmax(0)).float().mean() < 1e-3


@AFFINES
@pytest.mark.parametrize("organ", ["small", "none", "everywhere"])
def test_the_label_resampled_only_where_a_class_can_win_is_the_full_label(
    affine: np.ndarray, organ: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Auto-segment resamples the probabilities back only inside the box where a foreground
    class can win, then reorients the label: the same label as resampling every voxel."""
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 200, (37, 29, 11)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "ct.nii.gz"))
    predictor = _predictor({"liver": 1, "tumour": 2})
    image = predictor.load_image(tmp_path / "ct.nii.gz")
    torch.manual_seed(0)
    logits = torch.randn(3, *image.shape[1:])
    logits[0] += {"small": 10.0, "none": 20.0, "everywhere": -6.0}[organ]  # background
    if organ == "small":  # an organ in a corner of the volume, near its border
        logits[1:, 2:9, 3:10, :4] += 12.0
    foreground = torch.softmax(logits, 0)[1:]
    full = labels_from_foreground(predictor._to_image_grid(foreground, image))
    sizes = []
    resample = inference.resample_axis_aligned
    monkeypatch.setattr(
        inference, "resample_axis_aligned", lambda *a: sizes.append(a[3]) or resample(*a)
    )
    label = predictor._to_image_grid(foreground, image, as_label=True)
    monkeypatch.setattr(inference, "LABEL_SLAB_VOXELS", 50)  # slabs of one or two rows
    in_slabs = predictor._to_image_grid(foreground, image, as_label=True)

    assert label.dtype == torch.uint8 and torch.equal(label, full)
    assert torch.equal(in_slabs, full)
    if organ == "small":
        assert (full > 0).any() and math.prod(sizes[0]) < full.numel() / 2
    elif organ == "none":
        assert not (full > 0).any() and not sizes  # nothing to resample
    else:
        assert (full > 0).all() and math.prod(sizes[0]) == full.numel()


def test_a_last_step_that_is_not_a_resampling_is_left_to_monai(tmp_path: Path) -> None:
    """Neither fast path claims a step that is not MONAI's resampling (here the
    reorientation, whose record holds no source grid): both answer None, not an error."""
    predictor = _predictor({"organ": 1})
    image = predictor.load_image(_ct_like(tmp_path / "ct.nii.gz"))
    channels = _on_model_grid(torch.rand(1, *image.shape[1:]), image)
    channels.applied_operations = channels.applied_operations[:-1]  # Orientation is last
    assert channels.applied_operations[-1]["class"] == "Orientation"
    assert invert_axis_aligned_resampling(channels) is None
    assert inference.label_after_axis_aligned_resampling(channels) is None


def test_a_resampling_it_does_not_reproduce_is_left_to_monai(tmp_path: Path) -> None:
    image_path = _ct_like(tmp_path / "ct.nii.gz")
    predictor = _predictor({"organ": 1})
    image = predictor.load_image(image_path)
    image.applied_operations[-1]["extra_info"]["mode"] = "nearest"  # as if labels were resampled
    channels = torch.rand(1, *image.shape[1:])

    assert invert_axis_aligned_resampling(_on_model_grid(channels, image)) is None
    restored = predictor._to_image_grid(channels, image)
    torch.testing.assert_close(restored, _monai_inverse(predictor, channels, image).float())


@pytest.mark.parametrize("chunk", [7, 1 << 16])  # chunks that do and do not divide the volume
@pytest.mark.parametrize("dim", [0, 1])
def test_the_label_is_the_argmax_with_the_background_ties_to_the_lower_class(
    dim: int, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "CHUNK_VOXELS", chunk)
    probabilities = torch.softmax(torch.randn(2, 4, 6, 5, 3) * 3, dim=1)  # (members, classes, ...)
    probabilities[:, :, 0, 0, 0] = 0.25  # a four-way tie: background wins
    probabilities[:, :, 1, 0, 0] = torch.tensor([0.1, 0.3, 0.3, 0.3])  # class 1 wins
    foreground = probabilities[:, 1:] if dim == 1 else probabilities[0, 1:]
    expected = probabilities.argmax(1) if dim == 1 else probabilities[0].argmax(0)

    labels = labels_from_foreground(foreground, dim=dim)
    assert labels.dtype == torch.uint8
    assert torch.equal(labels.long(), expected)
    assert (expected == 0).any() and (expected == 3).any()


def test_uncertainty_is_computed_only_when_asked(tmp_path: Path) -> None:
    image_path = _ct_like(tmp_path / "ct.nii.gz")
    predictor = _predictor({"organ": 1})
    prediction = predictor.predict_file(image_path)
    assert prediction.uncertainty is None and prediction.member_labels is None
    with pytest.raises(ValueError, match="uncertainty=True"):
        predictor.write_prediction(prediction, tmp_path / "l.nii.gz", tmp_path / "u.nii.gz")


@pytest.mark.parametrize("chunk", [7, 1 << 14])
def test_the_mean_disagreement_in_chunks_is_the_maps_mean(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "CHUNK_VOXELS", chunk)
    logits = torch.randn(3, 2, 4, 9, 8, 5) * 3  # (members, batch, classes, ...)
    expected = float(jensen_shannon_map(logits).mean())
    assert inference.mean_jensen_shannon(logits) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("chunk", [7, 1 << 14])
def test_the_expected_dice_error_in_chunks_is_that_of_the_whole_vote(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "CHUNK_VOXELS", chunk)
    logits = torch.randn(2, 1, 3, 9, 8, 5) * 3
    vote = inference.soft_vote(logits)
    label = torch.nn.functional.one_hot(vote.argmax(1), 3).movedim(-1, 1)[:, 1:].float()
    dice = (2 * (vote[:, 1:] * label).sum() + 1) / (vote[:, 1:].sum() + label.sum() + 1)
    assert inference.expected_dice_error(logits) == pytest.approx(1 - float(dice), rel=1e-5)


def _organ_logits(boundary_logit: float, pad: int = 0) -> torch.Tensor:
    """Two members' logits on a cube: a confident organ inside, an uncertain shell around it
    (the organ's logit ``boundary_logit`` there, the members differing), confident background
    elsewhere, with ``pad`` more confident background voxels on every side."""
    size = 12 + 2 * pad
    logits = torch.zeros(2, 1, 2, size, size, size)
    logits[:, :, 1] = -14.0
    shell, inner = slice(pad + 3, pad + 9), slice(pad + 4, pad + 8)
    logits[0, :, 1, shell, shell, shell] = boundary_logit
    logits[1, :, 1, shell, shell, shell] = -boundary_logit / 2
    logits[:, :, 1, inner, inner, inner] = 8.0
    return logits


def test_the_expected_dice_error_follows_the_organs_uncertainty_not_the_crop() -> None:
    """What the expected_error strategy ranks by: an organ with an uncertain boundary scores
    higher than one segmented confidently, and a wider crop around the same organ scores the
    same, where the mean disagreement over the volume falls with the crop's size."""
    uncertain, confident = _organ_logits(1.0), _organ_logits(8.0)
    confident[1] = confident[0]
    assert inference.expected_dice_error(confident) < 0.01
    assert inference.expected_dice_error(uncertain) > 0.1
    wide = _organ_logits(1.0, pad=6)
    assert inference.expected_dice_error(wide) == pytest.approx(
        inference.expected_dice_error(uncertain), rel=1e-2
    )
    assert inference.mean_jensen_shannon(wide) < 0.5 * inference.mean_jensen_shannon(uncertain)
    # The organ confidently absent: nothing to get wrong. Half the image possibly organ but
    # none of it labeled: almost all error.
    absent = torch.zeros(2, 1, 2, 8, 8, 8)
    absent[:, :, 1] = -20.0
    assert inference.expected_dice_error(absent) < 1e-3
    assert inference.expected_dice_error(torch.zeros(2, 1, 2, 8, 8, 8)) > 0.99


def test_score_is_zero_when_members_agree_and_positive_when_they_differ(tmp_path: Path) -> None:
    """The active-learning score, computed on the model's grid, ranks by disagreement."""
    image_path = _ct_like(tmp_path / "ct.nii.gz")
    assert _predictor({"organ": 1}, identical_members=True).mean_disagreement(image_path) < 1e-7
    differing = _predictor({"organ": 1})
    score = differing.mean_disagreement(image_path)
    mean_on_image = differing.predict_file(image_path, uncertainty=True).uncertainty.mean()
    assert score > 1e-4
    assert score == pytest.approx(mean_on_image, rel=0.2)
