"""Evaluation, in one place: the engine's validation and the scoring of a served model.

- :func:`validate_ensemble` scores the members and their soft vote on validation cases during
  training (on the preprocessed grid, whole volumes by sliding window): each member's Dice, the
  vote's Dice per class and the members' disagreement.
- :func:`evaluate_predictor` scores a published ensemble on labeled cases the way a user sees
  its labels (in each image's own grid): Dice and HD95 per class of the soft vote and of each
  member. ``cotrain evaluate`` and the benchmarks report it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from cotrain.config import TrainConfig
from cotrain.data import preprocessing
from cotrain.inference import EnsemblePredictor, member_logits_sliding_window, soft_vote
from cotrain.losses import jensen_shannon_map
from cotrain.metrics import dice_and_hd95, load_reference, mean_over_cases
from cotrain.networks import Ensemble

logger = logging.getLogger(__name__)

__all__ = ["evaluate_predictor", "validate_ensemble"]


def _case_dice(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice per foreground class of one case's prediction (NaN where the class is absent)."""
    prediction = one_hot(logits.argmax(1, keepdim=True), num_classes)
    return compute_dice(prediction, target, include_background=False)[0].cpu().numpy()


@torch.no_grad()
def validate_ensemble(
    ensemble: Ensemble,
    cases: Sequence[Mapping[str, str]],
    config: TrainConfig,
    device: torch.device,
    use_amp: bool = False,
) -> dict[str, Any]:
    """Dice of each member and of the soft vote on validation cases (whole volumes).

    Args:
        ensemble: The members (put in eval mode).
        cases: ``{"image", "label"}`` paths.
        config: Preprocessing, labels and the sliding window's ``roi_size``.
        device: Where to run.
        use_amp: Mixed precision for the forward passes.

    Returns:
        ``"vote_dice"`` (mean over classes), ``"vote_dice_per_class"`` (label name -> Dice),
        ``"member_dice"`` (one per member) and ``"disagreement"`` (members' mean Jensen-Shannon
        divergence, nats).
    """
    ensemble.eval()
    transform = preprocessing(config, keys=("image", "label"))
    # Per-case Dice (k members + the vote) x classes. MONAI's DiceMetric.aggregate() would
    # all-gather across processes, and only rank 0 validates: it would wait forever.
    member_scores: list[list[np.ndarray]] = [[] for _ in range(len(ensemble))]
    vote_scores: list[np.ndarray] = []
    disagreements = []
    num_classes = config.num_classes
    for case in cases:
        data = transform({"image": case["image"], "label": case["label"]})
        image = data["image"].as_tensor().unsqueeze(0).to(device)
        target = one_hot(data["label"].as_tensor().unsqueeze(0).to(device), num_classes)
        with torch.autocast(device.type, enabled=use_amp):
            logits = member_logits_sliding_window(ensemble, image, config.roi_size)
        for scores, member_logits in zip(member_scores, logits, strict=True):
            scores.append(_case_dice(member_logits, target, num_classes))
        vote_scores.append(_case_dice(soft_vote(logits), target, num_classes))
        disagreements.append(float(jensen_shannon_map(logits).mean()))
    per_class = np.nanmean(np.stack(vote_scores), axis=0)
    names = sorted(config.labels, key=config.labels.get)
    return {
        "vote_dice": float(np.nanmean(per_class)),
        "vote_dice_per_class": {name: float(v) for name, v in zip(names, per_class, strict=True)},
        "member_dice": [float(np.nanmean(np.nanmean(np.stack(m), axis=0))) for m in member_scores],
        "disagreement": float(np.mean(disagreements)),
    }


def evaluate_predictor(
    predictor: EnsemblePredictor,
    cases: Iterable[Mapping[str, str]],
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, Any]:
    """Dice and HD95 (mm) per class of the soft vote and of each member, in each image's grid.

    Args:
        predictor: The loaded ensemble.
        cases: ``{"image", "label"}`` paths, and optionally ``"name"``.
        progress: Wraps the cases while they are predicted (e.g. ``tqdm``).

    Returns:
        ``"cases"`` (count), ``"vote"`` and ``"members"`` (one per member): the means of
        :func:`cotrain.metrics.mean_over_cases`; ``"member_mean_dice"``, the members' mean
        Dice; ``"per_case"``: each case's ``name``, ``vote`` and ``members`` results.

    Raises:
        ValueError: If there is no case to evaluate.
    """
    labels = predictor.labels
    cases = list(cases)
    if not cases:
        raise ValueError("no labeled cases to evaluate")
    per_case = []
    for case in progress(cases) if progress else cases:
        prediction = predictor.predict_file(case["image"], members=True)
        reference, spacing, _ = load_reference(case["label"])
        per_case.append(
            {
                "name": case.get("name", str(case["image"])),
                "vote": dice_and_hd95(prediction.label, reference, labels, spacing),
                "members": [
                    dice_and_hd95(m, reference, labels, spacing) for m in prediction.member_labels
                ],
            }
        )
    k = len(per_case[0]["members"])
    members = [mean_over_cases([c["members"][i] for c in per_case], labels) for i in range(k)]
    return {
        "cases": len(per_case),
        "vote": mean_over_cases([c["vote"] for c in per_case], labels),
        "members": members,
        "member_mean_dice": float(np.mean([m["mean_dice"] for m in members])),
        "per_case": per_case,
    }
