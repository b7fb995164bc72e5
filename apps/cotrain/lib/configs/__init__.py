"""Task configs, one per served method (the two co-training papers and the supervised
baseline), by the name ``--conf models`` uses."""

from __future__ import annotations

from lib.configs.base import CoTrainTaskConfig
from lib.configs.dct_seg import DCTSegModel
from lib.configs.duo_segnet import DuoSegNetModel
from lib.configs.supervised import SupervisedModel

#: Model name -> task config class, in the order ``--conf models all`` adds them.
CONFIGS: dict[str, type[CoTrainTaskConfig]] = {
    "dct_seg": DCTSegModel,
    "duo_segnet": DuoSegNetModel,
    "supervised": SupervisedModel,
}

__all__ = ["CONFIGS", "CoTrainTaskConfig", "DCTSegModel", "DuoSegNetModel", "SupervisedModel"]
