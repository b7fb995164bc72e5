"""Duo-SegNet: two members co-trained with an adversarial critic."""

from __future__ import annotations

from lib.configs.common import CoTrainTaskConfig


class DuoSegNet(CoTrainTaskConfig):
    """Duo-SegNet dual-view ensemble served by soft voting."""

    method = "duo_segnet"
    summary = "Duo-SegNet adversarial dual-view ensemble"
