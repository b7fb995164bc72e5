"""Task configs, one per co-training method, by the name ``--conf models`` uses."""

from __future__ import annotations

from lib.configs.common import CoTrainTaskConfig
from lib.configs.dct_seg import DCTSeg
from lib.configs.duo_segnet import DuoSegNet

#: Model name -> task config class, in the order ``--conf models all`` adds them.
CONFIGS: dict[str, type[CoTrainTaskConfig]] = {"dct_seg": DCTSeg, "duo_segnet": DuoSegNet}

__all__ = ["CONFIGS", "CoTrainTaskConfig", "DCTSeg", "DuoSegNet"]
