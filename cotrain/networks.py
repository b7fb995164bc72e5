"""Networks: the ensemble members (MONAI networks), the ensemble that holds them, and the critic.

Members are ordinary MONAI networks kept in one :class:`Ensemble`, so that every method and
the soft vote see the same object and a checkpoint holds all members at once. Methods call
the ensemble (:meth:`Ensemble.forward`, :meth:`Ensemble.forward_each`) rather than indexing its
members, so the members can run one after the other (the reference) or stacked into one
vectorised call (``Ensemble.stacked``: ``torch.func.functional_call`` under ``vmap``, which turns
the k convolutions into grouped ones); both give the same outputs and gradients.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.utils.module import locate
from torch import nn
from torch.func import functional_call, vmap

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "Critic", "Ensemble", "build_member", "frozen", "member_definition"]

#: MONAI network class of each architecture a member can be, by name.
ARCHITECTURES = {
    "unet": "monai.networks.nets.UNet",
    "basicunet": "monai.networks.nets.BasicUNet",
    "segresnet": "monai.networks.nets.SegResNet",
}


def member_definition(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    architecture: str = "unet",
    **kwargs: Any,
) -> dict[str, Any]:
    """One member network as a MONAI config item: the class and every argument it is built
    with (cotrain's defaults filled in). :func:`build_member` builds it, and an exported MONAI
    bundle writes it out, so both make the same network.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        out_channels: Classes including background (the network returns logits).
        architecture: ``"unet"``, ``"basicunet"`` or ``"segresnet"`` (see :data:`ARCHITECTURES`).
        **kwargs: Network arguments (e.g. ``channels``, ``strides`` for the UNet).

    Returns:
        ``{"_target_": "monai.networks.nets.NAME", **arguments}``.

    Raises:
        ValueError: If the architecture is unknown.
    """
    architecture = architecture.lower()
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; use {', '.join(sorted(ARCHITECTURES))}"
        )
    kwargs = copy.deepcopy(kwargs)
    if architecture == "unet":
        kwargs.setdefault("channels", (16, 32, 64, 128))
        kwargs.setdefault("strides", (2,) * (len(kwargs["channels"]) - 1))
        kwargs.setdefault("num_res_units", 2)
        # Instance norm with an affine: robust at the small batch sizes of 3D training.
        kwargs.setdefault("norm", ("instance", {"affine": True}))
    return {
        "_target_": ARCHITECTURES[architecture],
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        **kwargs,
    }


def build_member(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    architecture: str = "unet",
    **kwargs: Any,
) -> nn.Module:
    """Build one segmentation network (the arguments of :func:`member_definition`)."""
    arguments = member_definition(spatial_dims, in_channels, out_channels, architecture, **kwargs)
    network_class = locate(arguments.pop("_target_"))
    return network_class(**arguments)


class Ensemble(nn.Module):
    """k segmentation networks of one architecture, each with its own initialisation.

    Args:
        num_members: k.
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes including background.
        seed: Member ``i`` is initialised with seed ``seed + i`` (different initialisations are
            one of the sources of diversity co-training relies on).
        network: Keyword arguments of :func:`build_member`.
    """

    def __init__(
        self,
        num_members: int,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        seed: int = 0,
        network: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.spec = {
            "num_members": num_members,
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "network": dict(network or {}),
        }
        members = []
        for i in range(num_members):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                members.append(
                    build_member(
                        spatial_dims, in_channels, num_classes, **copy.deepcopy(network or {})
                    )
                )
        self.members = nn.ModuleList(members)

    #: Run the members stacked (one vectorised call) instead of one after the other.
    stacked: bool = False

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every member on the same input.

        Args:
            x: ``(B, C_in, *spatial)``.

        Returns:
            ``(k, B, num_classes, *spatial)``.
        """
        if self.stacked:
            return self.forward_each(x.expand(len(self), *x.shape))
        return torch.stack([member(x) for member in self.members])

    def forward_each(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        members: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits of each member on its own input.

        Args:
            inputs: One ``(B, C_in, *spatial)`` input per member, as a sequence or stacked
                ``(n, B, C_in, *spatial)``.
            members: The members, in the order of ``inputs`` (all, in order, by default).

        Returns:
            ``(n, B, num_classes, *spatial)``: member ``members[i]`` on ``inputs[i]``.
        """
        chosen = [self.members[i] for i in (members if members is not None else range(len(self)))]
        if len(chosen) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs for {len(chosen)} members")
        if not self.stacked or len(chosen) == 1:
            return torch.stack([member(x) for member, x in zip(chosen, inputs, strict=True)])
        return _stacked_forward(chosen, torch.stack(list(inputs)))


def _stacked_forward(members: Sequence[nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    """Members of one architecture in one vectorised call: their parameters stacked (a
    differentiable copy, so gradients reach each member's own parameters) and the first
    member's structure run under ``vmap`` over the stack."""
    names = [name for name, _ in members[0].named_parameters()]
    buffer_names = [name for name, _ in members[0].named_buffers()]
    per_member = [dict(m.named_parameters()) for m in members]
    per_member_buffers = [dict(m.named_buffers()) for m in members]
    parameters = {n: torch.stack([p[n] for p in per_member]) for n in names}
    buffers = {n: torch.stack([b[n] for b in per_member_buffers]) for n in buffer_names}
    structure = members[0]

    def one(parameters: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(structure, (parameters, buffers), (x,))

    return vmap(one)(parameters, buffers, inputs)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Record passes through ``module`` without gradients for its own parameters.

    Gradients still flow through it to its inputs (the graph is kept), but a backward pass
    does not compute, nor accumulate, the gradients of ``module``'s weights: for a module
    that is trained by another loss (Duo-SegNet's critic), they would be discarded anyway.
    Each parameter's ``requires_grad`` is restored on exit.
    """
    parameters = list(module.parameters())
    before = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, requires_grad in zip(parameters, before, strict=True):
            p.requires_grad_(requires_grad)


class Critic(nn.Module):
    """A 3D (or 2D) fully convolutional critic for Duo-SegNet.

    It sees the image together with a segmentation (class probabilities or a one-hot ground
    truth) and answers, per location of a coarse grid, the logit that the segmentation is a
    ground-truth one. Unlike the official 2D code (1x1 convolutions on the probabilities alone),
    its strided 3x3x3 convolutions give it spatial context and the image, so it can judge shape
    and fit to the anatomy.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes of the segmentation it judges.
        channels: Feature channels of its stride-2 convolution blocks.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        channels: tuple[int, ...] = (16, 32, 64),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels + num_classes
        for c in channels:
            layers.append(
                Convolution(
                    spatial_dims,
                    previous,
                    c,
                    strides=2,
                    kernel_size=3,
                    act=("leakyrelu", {"negative_slope": 0.2}),
                    norm=("instance", {"affine": True}),
                )
            )
            previous = c
        layers.append(Convolution(spatial_dims, previous, 1, kernel_size=3, conv_only=True))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, segmentation: torch.Tensor) -> torch.Tensor:
        """Logit map that ``segmentation`` is a ground truth.

        Args:
            image: ``(B, C_in, *spatial)``.
            segmentation: ``(B, num_classes, *spatial)`` probabilities or one-hot.
        """
        return self.net(torch.cat([image, segmentation], dim=1))
