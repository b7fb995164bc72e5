"""Active learning: the unlabeled image whose soft vote expects the lowest Dice of its label."""

from __future__ import annotations

from lib.activelearning.disagreement import Disagreement


class ExpectedError(Disagreement):
    """Pick the unlabeled image with the highest expected Dice error of the soft vote.

    The score is :func:`cotrain.inference.expected_dice_error`, stored by the same scoring
    run as the disagreement. It is relative to the structure's size, where the mean
    disagreement favours tight crops, and it reads the vote's own confidence, which a
    co-trained ensemble keeps where its agreement term has made the members agree. Reserving,
    unscored and unreadable images are handled as by :class:`Disagreement`.

    Args:
        served_timeout_s: How long a served image stays reserved for its client.
    """

    field = "dice_error"
    answer_key = "expected_error"
    description = "Unlabeled image whose ensemble vote expects the lowest Dice (expected error)"
