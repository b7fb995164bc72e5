"""The one model of this sample app: DCT-Seg with SegResNet members on abdominal CT.

Everything a team changes to adapt co-training to its anatomy sits in :attr:`defaults`, the
:class:`cotrain.config.TrainConfig` values used when ``--conf`` does not set them:

- ``labels``: the structures and their label values (here the spleen, as in MSD Task09);
- ``network``: any MONAI network :func:`cotrain.networks.build_member` knows (``unet``,
  ``basicunet``, ``segresnet``) with its own arguments; each member is one such network;
- ``intensity``: a CT window in Hounsfield units (``ct:LOW,HIGH``, scaled to 0..1) instead of
  the MR z-score;
- ``target_spacing`` and ``roi_size``: the voxel size the members see and their patch.

The method, its loss weights and the serving (soft vote, uncertainty, active learning) are the
co-training app's own (``apps/cotrain/lib``): the class extends the app's DCT-Seg model and
keeps its defaults.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lib.configs.dct_seg import DCTSegModel


class SpleenCT(DCTSegModel):
    """DCT-Seg ensemble of SegResNets for the spleen on CT, served by soft voting."""

    summary = "DCT-Seg SegResNet ensemble for the spleen on CT"
    defaults: ClassVar[dict[str, Any]] = {
        **DCTSegModel.defaults,
        "labels": {"spleen": 1},
        "network": {
            "architecture": "segresnet",
            "init_filters": 16,
            "blocks_down": [1, 2, 2, 4],
            "blocks_up": [1, 1, 1],
            "dropout_prob": 0.2,
        },
        # Abdominal soft-tissue window, as in MONAI Label's radiology app for CT organs.
        "intensity": "ct:-160,240",
        "target_spacing": (1.5, 1.5, 2.0),
        "roi_size": (96, 96, 64),
        "members": 2,
    }
