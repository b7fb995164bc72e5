"""Scoring: the ensemble members' mean disagreement on every unlabeled image.

MONAI Label runs scoring methods in a subprocess after each training (and at start-up and on
next-sample requests, with ``MONAI_LABEL_AUTO_UPDATE_SCORING``). Scores are stored in the
image's datastore info under ``disagreement_MODEL``::

    {"score": 0.0123, "model_ts": 1700000000123456789, "ts": 1700000000}

An image already scored with the current model file is skipped, so repeated runs are cheap.
An image that cannot be segmented (unreadable, 2D, empty, NaN voxels) gets
``{"score": null, "error": REASON, ...}`` instead, and the ``disagreement`` strategy never
proposes it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.utils.others.generic import name_to_device

from cotrain.inference import EnsemblePredictor
from cotrain.input_checks import InvalidImageError

logger = logging.getLogger(__name__)

#: Prefix of the image info keys holding the scores, one key per model.
SCORE_KEY_PREFIX = "disagreement_"


class EnsembleDisagreement(ScoringMethod):
    """Score unlabeled images by the mean Jensen-Shannon divergence of the members.

    Args:
        name: Model name (the info key is ``disagreement_NAME``).
        path: The served ensemble file.
    """

    def __init__(self, name: str, path: str) -> None:
        super().__init__(f"Mean disagreement of the {name} ensemble members on unlabeled images")
        self.name = name
        self.path = path
        self.key = f"{SCORE_KEY_PREFIX}{name}"

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Score the unlabeled images not yet scored with the current model.

        Args:
            request: Scoring request (optional ``device``).
            datastore: The studies; each score is written into its image's info.

        Returns:
            Counts of scored and skipped images, or why nothing was scored.
        """
        if not os.path.exists(self.path):
            logger.info("%s: no model published yet; nothing to score", self.name)
            return {"scored": 0, "skipped": 0, "reason": "no model published yet"}
        model_ts = os.stat(self.path).st_mtime_ns
        predictor: EnsemblePredictor | None = None
        scored, skipped, invalid = 0, 0, 0
        start = time.time()
        for image_id in sorted(datastore.get_unlabeled_images()):
            info = datastore.get_image_info(image_id).get(self.key) or {}
            if info.get("model_ts") == model_ts:
                skipped += 1
                continue
            if predictor is None:
                predictor = EnsemblePredictor.load(
                    self.path, device=name_to_device(request.get("device")), fallback=True
                )
            entry: dict[str, Any] = {"model_ts": model_ts, "ts": int(time.time())}
            try:
                entry["score"] = predictor.mean_disagreement(datastore.get_image_uri(image_id))
                scored += 1
            except InvalidImageError as e:
                logger.warning("%s: not scoring %s: %s", self.name, image_id, e)
                entry.update({"score": None, "error": str(e)})
                invalid += 1
            # Other processes (the server, a training run) write the datastore file too:
            # reload it just before writing so their changes are kept.
            datastore.refresh()
            datastore.update_image_info(image_id, {self.key: entry})
        logger.info(
            "%s: scored %d unlabeled images in %.1fs (%d already scored with this model, "
            "%d cannot be segmented)",
            self.name,
            scored,
            time.time() - start,
            skipped,
            invalid,
        )
        return {"scored": scored, "skipped": skipped, "invalid": invalid}
