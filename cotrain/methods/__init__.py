"""The co-training methods, by name. Each returns named loss terms for one step."""

from __future__ import annotations

from typing import Any

from cotrain.methods.base import Batch, CoTrainingMethod, LossTerms
from cotrain.methods.cps import CrossPseudoSupervision
from cotrain.methods.dct_seg import DCTSeg
from cotrain.methods.duo_segnet import DuoSegNet
from cotrain.methods.jsd import JensenShannonOnly
from cotrain.methods.mean_teacher import MeanTeacher
from cotrain.methods.supervised import Supervised

__all__ = ["METHOD_CLASSES", "Batch", "CoTrainingMethod", "LossTerms", "build_method"]

METHOD_CLASSES: dict[str, type[CoTrainingMethod]] = {
    cls.name: cls
    for cls in (
        DCTSeg,
        DuoSegNet,
        Supervised,
        JensenShannonOnly,
        MeanTeacher,
        CrossPseudoSupervision,
    )
}


def build_method(
    name: str,
    num_members: int,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    params: dict[str, Any] | None = None,
    seed: int = 0,
) -> CoTrainingMethod:
    """Instantiate a method by name.

    Args:
        name: One of :data:`METHOD_CLASSES`.
        num_members: k.
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes including background.
        params: Hyperparameter overrides.
        seed: Seed of the method's own randomness.
    """
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_CLASSES)}")
    return METHOD_CLASSES[name](num_members, spatial_dims, in_channels, num_classes, params, seed)
