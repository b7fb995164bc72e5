"""Task configs, one per co-training method, by the name ``--conf models`` uses."""

from __future__ import annotations

from lib.configs.base import CoTrainTaskConfig
from lib.configs.dct_seg import DCTSegModel
from lib.configs.duo_segnet import DuoSegNetModel

#: Model name -> task config class, in the order ``--conf models all`` adds them.
CONFIGS: dict[str, type[CoTrainTaskConfig]] = {"dct_seg": DCTSegModel, "duo_segnet": DuoSegNetModel}

__all__ = ["CONFIGS", "CoTrainTaskConfig", "DCTSegModel", "DuoSegNetModel"]
