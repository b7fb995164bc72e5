"""Active learning: the unlabeled image the ensemble members disagree on most."""

from __future__ import annotations

import logging
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.disagreement import SCORE_KEY_PREFIX

logger = logging.getLogger(__name__)


def image_score(info: dict[str, Any], field: str = "score") -> float | None:
    """Mean of one score of all models stored in an image's info (``None``: not scored yet).

    Args:
        info: The image's datastore info.
        field: Which score of each model's entry (:mod:`lib.scoring.disagreement`).
    """
    scores = [
        float(v[field])
        for k, v in info.items()
        if k.startswith(SCORE_KEY_PREFIX) and isinstance(v, dict) and v.get(field) is not None
    ]
    return sum(scores) / len(scores) if scores else None


def image_error(info: dict[str, Any]) -> str | None:
    """Why scoring could not segment the image (stored by the scoring method), or ``None``."""
    for key, value in info.items():
        if key.startswith(SCORE_KEY_PREFIX) and isinstance(value, dict) and value.get("error"):
            return str(value["error"])
    return None


def last_served(info: dict[str, Any]) -> tuple[float, Any]:
    """When and to whom an image was last served by any strategy: ``(ts, client_id)``.

    MONAI Label's ``/activelearning`` endpoint records ``{"ts", "client_id"}`` per strategy
    under ``info["strategy"]``.
    """
    latest: tuple[float, Any] = (0.0, None)
    for entry in (info.get("strategy") or {}).values():
        if isinstance(entry, dict) and float(entry.get("ts", 0)) > latest[0]:
            latest = (float(entry.get("ts", 0)), entry.get("client_id"))
    return latest


class Disagreement(Strategy):
    """Pick the unlabeled image with the highest ensemble disagreement.

    Images served (by any strategy) to *another* client within ``served_timeout_s`` are
    skipped, so two annotators do not get the same image; a request without ``client_id``
    counts as a different client each time. If every unlabeled image was served that
    recently, the one served longest ago is returned. Images not scored yet (no model, or
    added since the last scoring) come after scored ones, in id order. Images that scoring
    found cannot be segmented (unreadable, 2D, ...) are never proposed.

    Request params (optional): ``client_id``, ``served_timeout_s``.

    Subclasses rank by another score of the same scoring run: :attr:`field` names it in the
    stored entry, :attr:`answer_key` in the answer.

    Args:
        served_timeout_s: How long a served image stays reserved for its client.
    """

    field = "score"
    answer_key = "disagreement"
    description = "Most uncertain unlabeled image (ensemble members' disagreement)"

    def __init__(self, served_timeout_s: float = 600.0) -> None:
        super().__init__(self.description)
        self.served_timeout_s = served_timeout_s

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        """Select the next image to annotate.

        Returns:
            ``{"id": image_id, ANSWER_KEY: score or None}``, or ``None`` if every image is
            labeled.
        """
        # Scores are written by a scoring subprocess; pick up its changes of the datastore.
        datastore.refresh()
        infos = {
            image: datastore.get_image_info(image) for image in datastore.get_unlabeled_images()
        }
        images = sorted(image for image, info in infos.items() if image_error(info) is None)
        if not images:
            return None
        client_id = request.get("client_id")
        timeout = float(request.get("served_timeout_s", self.served_timeout_s))
        now = time.time()

        served = {image: last_served(info) for image, info in infos.items()}
        free = [
            image
            for image in images
            if not (
                now - served[image][0] < timeout
                and (client_id is None or served[image][1] != client_id)
            )
        ]
        if not free:
            image = min(images, key=lambda i: served[i][0])
            logger.info(
                "%s: every unlabeled image is reserved; oldest served: %s", self.answer_key, image
            )
            return {"id": image, self.answer_key: image_score(infos[image], self.field)}

        scores = {image: image_score(infos[image], self.field) for image in free}
        # Highest score first; unscored images last; ties by id.
        image = min(free, key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))
        logger.info(
            "%s: selected %s (score %s; %d candidates, %d scored)",
            self.answer_key,
            image,
            scores[image],
            len(free),
            sum(s is not None for s in scores.values()),
        )
        return {"id": image, self.answer_key: scores[image]}
