"""The supervised baseline served the same way: k members trained on the labels alone."""

from __future__ import annotations

from typing import Any, ClassVar

from cotrain.config import SERVED_RECIPE
from lib.configs.base import CoTrainTaskConfig


class SupervisedModel(CoTrainTaskConfig):
    """k independently initialised members trained on the submitted labels only, served by
    soft voting, with the same trainer, scoring and strategies as the co-training models.

    The baseline a co-training model must beat in the annotation loop (``bench/session.py``
    compares them at equal retrain time); unlabeled studies are not read while it trains. It
    trains with the same recipe as the co-training models (:data:`cotrain.config.SERVED_RECIPE`),
    so that it is as strong a baseline as they are.
    """

    method = "supervised"
    summary = "supervised ensemble (labels only; the baseline)"
    defaults: ClassVar[dict[str, Any]] = dict(SERVED_RECIPE)  # the same recipe as the others
    in_all = False  # served when named: ``--conf models supervised`` (or ``dct_seg,supervised``)
