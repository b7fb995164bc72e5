"""Scoring: the ensemble's uncertainty on the unlabeled images (the members' mean disagreement
and the Dice error the soft vote expects), within a time budget per run.

MONAI Label runs scoring methods in a subprocess after each training (and at start-up and on
next-sample requests, with ``MONAI_LABEL_AUTO_UPDATE_SCORING``). Scores are stored in the
image's datastore info under ``disagreement_MODEL``::

    {"score": 0.0123, "dice_error": 0.19, "model_ts": 1700000000123456789, "ts": 1700000000}

``score`` is the members' mean Jensen-Shannon divergence over the image, which the
``disagreement`` strategy ranks by; ``dice_error`` is
:func:`cotrain.inference.expected_dice_error`, which ``expected_error`` ranks by. Both come
from the same prediction.

A run scores what changed, most needed first: images never scored (the newest study first,
so that one that arrives is scored by the next run), then images scored with an older model,
oldest score first. An image already scored
with the current model file is skipped. The run stops before the next image would pass its
budget (``--conf score_minutes``; the mean time per image so far is the estimate), so scoring
after a publish takes bounded time however many studies the folder holds; the next run goes
on where this one stopped. Next-sample answers at once from the scores stored, whichever
model computed them (:mod:`lib.activelearning.disagreement`).

An image that cannot be segmented (unreadable, 2D, empty, NaN voxels) gets
``{"score": null, "error": REASON, ...}`` instead, and neither strategy ever proposes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.utils.others.generic import name_to_device

from cotrain.files import write_json_atomically
from cotrain.inference import EnsemblePredictor
from cotrain.input_checks import InvalidImageError

logger = logging.getLogger(__name__)

#: Prefix of the image info keys holding the scores, one key per model.
SCORE_KEY_PREFIX = "disagreement_"


def score_key(model: str) -> str:
    """The image info key of ``model``'s scores (``disagreement_MODEL``)."""
    return f"{SCORE_KEY_PREFIX}{model}"


def model_ts(path: str) -> int | None:
    """The served model file's modification time (ns): what a score's ``model_ts`` names;
    ``None`` if no model is published."""
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def scoring_queue(
    datastore: Datastore, key: str, current: int | None
) -> tuple[list[str], list[str], int]:
    """The unlabeled images still to score with the model ``current``, most needed first.

    Args:
        datastore: The studies.
        key: The model's info key (``disagreement_NAME``).
        current: The served model's ``model_ts``.

    Returns:
        ``(never, stale, up_to_date)``: the images never scored, the most recently added
        first (then by id: a study that arrives is scored by the next run, even while a
        backlog waits); those scored with another model, oldest score first; and how many
        are scored with ``current``.
    """
    never: list[tuple[float, str]] = []
    stale: list[tuple[float, str]] = []
    up_to_date = 0
    for image_id in sorted(datastore.get_unlabeled_images()):
        info = datastore.get_image_info(image_id)
        entry = info.get(key)
        if not isinstance(entry, dict):
            never.append((-float(info.get("ts") or 0), image_id))
        elif current is not None and entry.get("model_ts") == current:
            up_to_date += 1
        else:
            stale.append((float(entry.get("ts") or 0), image_id))
    return [i for _, i in sorted(never)], [i for _, i in sorted(stale)], up_to_date


def last_run(record_path: str) -> dict[str, Any] | None:
    """What the latest scoring run wrote to ``record_path`` (``None``: no run yet)."""
    try:
        with open(record_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def scoring_status(datastore: Datastore, key: str, path: str) -> dict[str, int]:
    """How many unlabeled images are scored with the served model.

    Returns:
        ``unlabeled``, ``scored_with_current_model``, ``scored_with_older_model`` and
        ``never_scored`` counts.
    """
    never, stale, up_to_date = scoring_queue(datastore, key, model_ts(path))
    return {
        "unlabeled": len(never) + len(stale) + up_to_date,
        "scored_with_current_model": up_to_date,
        "scored_with_older_model": len(stale),
        "never_scored": len(never),
    }


class EnsembleDisagreement(ScoringMethod):
    """Score unlabeled images by the members' mean Jensen-Shannon divergence and the soft
    vote's expected Dice error.

    Args:
        name: Model name (the info key is ``disagreement_NAME``).
        path: The served ensemble file.
        budget_minutes: Wall-time bound of one scoring run (0: score everything that
            changed); a request's ``budget_minutes`` overrides it.
        record_path: Where each run writes what it did (counts, seconds, the model;
            :func:`last_run` reads it for ``/info``); ``None``: nowhere.
    """

    def __init__(
        self, name: str, path: str, budget_minutes: float = 0.0, record_path: str | None = None
    ) -> None:
        super().__init__(f"Uncertainty of the {name} ensemble on unlabeled images")
        self.name = name
        self.path = path
        self.key = score_key(name)
        self.budget_minutes = budget_minutes
        self.record_path = record_path

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Score the unlabeled images not yet scored with the current model, within budget.

        Args:
            request: Scoring request (optional ``device``, ``budget_minutes``).
            datastore: The studies; each score is written into its image's info.

        Returns:
            Counts of ``scored``, ``skipped`` (already scored with this model), ``invalid``
            and ``deferred`` (left for the next run by the budget) images, or why nothing was
            scored.
        """
        current = model_ts(self.path)
        if current is None:
            logger.info("%s: no model published yet; nothing to score", self.name)
            return {"scored": 0, "skipped": 0, "reason": "no model published yet"}
        budget_s = 60.0 * float(request.get("budget_minutes", self.budget_minutes) or 0.0)
        never, stale, skipped = scoring_queue(datastore, self.key, current)
        to_score = never + stale
        predictor: EnsemblePredictor | None = None
        scored, invalid = 0, 0
        start = time.time()
        for done, image_id in enumerate(to_score):
            elapsed = time.time() - start
            if budget_s and done and elapsed + elapsed / done > budget_s:
                break
            if predictor is None:
                predictor = EnsemblePredictor.load(
                    self.path, device=name_to_device(request.get("device")), fallback=True
                )
            entry: dict[str, Any] = {"model_ts": current, "ts": int(time.time())}
            try:
                scores = predictor.uncertainty_scores(datastore.get_image_uri(image_id))
                entry.update({"score": scores["disagreement"], "dice_error": scores["dice_error"]})
                scored += 1
            except InvalidImageError as e:
                logger.warning("%s: not scoring %s: %s", self.name, image_id, e)
                entry.update({"score": None, "error": str(e)})
                invalid += 1
            # Other processes (the server, a training run) write the datastore file too:
            # reload it just before writing so their changes are kept.
            datastore.refresh()
            datastore.update_image_info(image_id, {self.key: entry})
        deferred = len(to_score) - scored - invalid
        result = {"scored": scored, "skipped": skipped, "invalid": invalid, "deferred": deferred}
        if self.record_path:
            record = {
                **result,
                "seconds": round(time.time() - start, 2),
                "budget_minutes": budget_s / 60.0,
                "model_ts": current,
                "ts": int(time.time()),
            }
            os.makedirs(os.path.dirname(self.record_path) or ".", exist_ok=True)
            write_json_atomically(record, self.record_path)
        logger.info(
            "%s: scored %d unlabeled images in %.1fs (%d already scored with this model, "
            "%d cannot be segmented, %d left for the next run by the %.1f-minute budget)",
            self.name,
            scored,
            time.time() - start,
            skipped,
            invalid,
            deferred,
            budget_s / 60.0,
        )
        return result
