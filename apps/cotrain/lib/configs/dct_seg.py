"""DCT-Seg: k-view deep co-training, each member trained on its own view of the labels."""

from __future__ import annotations

from lib.configs.common import CoTrainTaskConfig


class DCTSeg(CoTrainTaskConfig):
    """Deep co-training (DCT-Seg) ensemble served by soft voting."""

    method = "dct_seg"
    summary = "DCT-Seg deep co-training ensemble"
