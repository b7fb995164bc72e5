"""What a method is: given the ensemble and one batch, the named loss terms and their weights.

The training engine does everything else (data, optimiser, AMP, validation, checkpoints) the
same way for every method, so baselines and the two papers share one loop and compare fairly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cotrain.losses import dice_ce_loss, foreground_focus
from cotrain.mixing import copy_paste, random_box_mask
from cotrain.networks import Ensemble
from cotrain.perturbation import MemberCopies
from cotrain.schedules import gaussian_rampup

logger = logging.getLogger(__name__)

__all__ = ["AgreementFocus", "Batch", "CoTrainingMethod", "CopyPaste", "LossTerms"]

#: Unweighted loss terms by name; the total is ``sum(weights[name] * term)``.
LossTerms = dict[str, torch.Tensor]


@dataclass
class Batch:
    """One training step's data.

    Attributes:
        labeled: For each member, ``(images, targets)`` drawn from that member's labeled subset;
            images ``(B, C_in, *spatial)``, targets ``(B, 1, *spatial)`` class indices.
        unlabeled: ``(B_u, C_in, *spatial)`` images shared by all members, or ``None`` for
            methods that do not use unlabeled data.
        unlabeled_copies: Each member's own perturbed copy of ``unlabeled``, when the run
            perturbs unlabeled data (``TrainConfig.perturb_unlabeled``).
    """

    labeled: list[tuple[torch.Tensor, torch.Tensor]]
    unlabeled: torch.Tensor | None = None
    unlabeled_copies: MemberCopies | None = None


@dataclass
class AgreementFocus:
    """Base of the ``Params`` of methods with an agreement term (DCT-Seg, Duo-SegNet, JSD).

    Attributes:
        agreement_focus: 0 averages the agreement over every voxel (the paper); a threshold
            t in (0, 1) averages it over the voxels where some member gives the foreground
            probability >= t (the organ and its uncertain rim), so background the members
            already agree on no longer dilutes it.
    """

    agreement_focus: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.agreement_focus < 1.0:
            raise ValueError(f"agreement_focus must be in [0, 1), got {self.agreement_focus}")
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the next Params base in a method's Params
            parent()


@dataclass
class CopyPaste:
    """Base of the ``Params`` of methods that can add the copy-paste term (DCT-Seg,
    Duo-SegNet); not in either paper, off by default.

    ``L_mix``: each member's Dice+CE on its labeled patches and the unlabeled ones mixed by
    bidirectional copy-paste (:mod:`cotrain.mixing`), the unlabeled voxels labelled by the
    argmax of the *other* members' soft vote (so members still teach each other). It is
    ramped up with the method's agreement term.

    ``mix_every = n > 1`` (1 by default) computes ``L_mix`` on every n-th step only, with
    ``n lambda_mix(t)``, so that its mean weight is unchanged and its cost (a pass of every
    member over twice its labeled batch) divided by n.

    Attributes:
        lambda_mix: Maximum weight of ``L_mix`` (0: off).
        mix_box: Side of the pasted box as a fraction of the patch's side (BCP: 2/3).
        mix_every: Compute ``L_mix`` on every n-th step only, weighted n times (1: every step).
    """

    lambda_mix: float = 0.0
    mix_box: float = 2.0 / 3.0
    mix_every: int = 1

    def __post_init__(self) -> None:
        if self.lambda_mix < 0:
            raise ValueError(f"lambda_mix must be >= 0, got {self.lambda_mix}")
        if not 0.0 < self.mix_box < 1.0:
            raise ValueError(f"mix_box must be in (0, 1), got {self.mix_box}")
        if self.mix_every < 1:
            raise ValueError(f"mix_every must be >= 1, got {self.mix_every}")


class CoTrainingMethod(nn.Module):
    """Base class of the methods. Subclasses set ``name``, a ``Params`` dataclass, and implement
    :meth:`loss_terms` and :meth:`loss_weights`.

    A method is an ``nn.Module`` so that its own state (a critic, EMA teachers) moves to the
    device and into checkpoints with it; the ensemble is passed in, never owned.

    Warm starts: a published model also holds its method's state and own optimisers
    (:func:`cotrain.checkpoint.method_state`). A retrain that warm-starts from a model of the
    same method loads them after :meth:`attach` and continues (``TrainState.continued``): its
    :meth:`loss_weights` are taken at progress 1 (the ramps were completed by the run that
    made the model; ramping the unlabeled terms up again would spend the retrain relearning
    from labels alone), and its learning rate warms up (the members' optimiser starts anew).
    What each method carries is said in its module docstring.

    Args:
        num_members: k.
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes including background.
        params: Overrides of the method's ``Params`` fields; an unknown name is an error.
        seed: Seed of the method's own randomness (pair sampling).
    """

    #: The method's name in settings, the command line and the app (``dct_seg``, ...).
    name: ClassVar[str] = ""
    #: Whether a step draws an unlabeled batch.
    uses_unlabeled: ClassVar[bool] = True
    #: Least number of members k.
    min_members: ClassVar[int] = 1
    #: Whether the members learn from each other's predictions on unlabeled data, so that each
    #: may see its own perturbed copy of the unlabeled batch (``TrainConfig.perturb_unlabeled``).
    perturbable: ClassVar[bool] = False

    @dataclass
    class Params:
        """Hyperparameters; subclasses define their own."""

    def __init__(
        self,
        num_members: int,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        params: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_members < self.min_members:
            raise ValueError(
                f"{self.name} needs at least {self.min_members} members, got {num_members}"
            )
        self.params = self.parse_params(params)
        self.num_members = num_members
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.seed = seed
        #: Averages a module's gradients over processes; the engine sets it when distributed.
        self.reduce_gradients: Callable[[nn.Module], None] = lambda module: None
        #: Steps taken (:meth:`loss_terms` calls that count them), for :meth:`every_nth_step`.
        self.steps = 0

    @classmethod
    def parse_params(cls, params: dict[str, Any] | None) -> Params:
        """The method's hyperparameters from overrides of its ``Params`` fields.

        Args:
            params: Field names to values; ``None`` keeps every default.

        Raises:
            ValueError: Naming the unknown fields, or a value out of its range.
        """
        known = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(params or {}) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.name} parameters: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls.Params(**(params or {}))

    def attach(self, ensemble: Ensemble) -> None:
        """Hook called once the ensemble exists (before a checkpoint is loaded into the method)."""

    def loss_terms(
        self, ensemble: Ensemble, batch: Batch, weights: Mapping[str, float] | None = None
    ) -> LossTerms:
        """Unweighted loss terms of one step (each a scalar tensor with a graph to the members).

        Args:
            ensemble: The members.
            batch: The step's data.
            weights: This step's :meth:`loss_weights`, which the engine computes first. A
                method may skip the work of a term whose weight is 0 (:meth:`skipped`) and
                return it as a constant 0; ``None`` computes every term.
        """
        raise NotImplementedError

    def loss_weights(self, progress: float) -> dict[str, float]:
        """Weight of each term at ``progress`` (fraction of training done, in [0, 1]).

        The engine calls it once per step, before :meth:`loss_terms`.
        """
        raise NotImplementedError

    def every_nth_step(self, weight: float, n: int) -> float:
        """A term computed on every n-th step only: ``n weight`` on the steps whose count
        (:attr:`steps`, before the step's :meth:`loss_terms` counts it) is a multiple of ``n``,
        0 on the others, so that its mean weight is ``weight`` and its cost divided by n."""
        return weight * n if self.steps % n == 0 else 0.0

    @staticmethod
    def skipped(weights: Mapping[str, float] | None, name: str) -> bool:
        """Whether term ``name`` has weight 0 this step, so its work can be left out."""
        return weights is not None and weights.get(name, 1.0) == 0.0

    def after_member_step(self, ensemble: Ensemble, batch: Batch) -> dict[str, float]:
        """Hook after the members' optimiser step (critic step, EMA update).

        Returns:
            Extra values to report (e.g. the critic's loss).
        """
        return {}

    def warmup_terms(self, ensemble: Ensemble, batch: Batch) -> LossTerms:
        """The loss of a step of the supervised warm-up (``TrainConfig.supervised_warmup_iterations``):
        the supervised term alone; the batch has no unlabeled part."""
        supervised, _ = self.supervised_term(ensemble, batch)
        return {"supervised": supervised}

    def after_warmup_step(self, ensemble: Ensemble, batch: Batch) -> dict[str, float]:
        """Hook after the members' optimiser step of a warm-up step; by default nothing (a
        critic starts after the warm-up). Mean Teacher's EMA teachers follow the members.

        Returns:
            Extra values to report.
        """
        return {}

    def auxiliary_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers the method owns (Duo-SegNet's critic), by name, for checkpoints."""
        return {}

    @staticmethod
    def unlabeled_predictions(
        ensemble: Ensemble, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every member's logits on the unlabeled batch.

        Returns:
            ``(inputs, logits, aligned)``, each ``(k, B_u, ...)``: member i's input, its logits
            on that input, and those logits on the shared grid (the ones to compare across
            members). Without per-member copies all members share one input and ``aligned``
            is ``logits``.
        """
        copies = batch.unlabeled_copies
        if copies is None:
            logits = ensemble(batch.unlabeled)
            inputs = batch.unlabeled.expand(len(ensemble), *batch.unlabeled.shape)
            return inputs, logits, logits
        logits = ensemble.forward_each(copies.images)
        return copies.images, logits, copies.align(logits)

    def agreement_region(self, aligned_logits: torch.Tensor) -> torch.Tensor | None:
        """Voxels the agreement term averages over: all (``None``) unless the method's
        ``agreement_focus`` threshold is set (see :class:`AgreementFocus`), then
        :func:`cotrain.losses.foreground_focus`."""
        focus = self.params.agreement_focus if isinstance(self.params, AgreementFocus) else 0.0
        return foreground_focus(aligned_logits, focus) if focus > 0 else None

    @staticmethod
    def supervised_term(
        ensemble: Ensemble, batch: Batch
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sum over members of Dice+CE on each member's own labeled batch.

        Returns:
            The summed term and each member's logits on its labeled batch.
        """
        logits = list(ensemble.forward_each([images for images, _ in batch.labeled]).unbind(0))
        total = sum(
            dice_ce_loss(member_logits, targets)
            for member_logits, (_, targets) in zip(logits, batch.labeled, strict=True)
        )
        return total, logits

    def copy_paste_terms(
        self,
        ensemble: Ensemble,
        batch: Batch,
        aligned_logits: torch.Tensor,
        weights: Mapping[str, float] | None,
    ) -> LossTerms:
        """``{"mixed": L_mix}`` when the method's :class:`CopyPaste` option is on (a constant 0
        while its weight is 0), else nothing."""
        p = self.params
        if not isinstance(p, CopyPaste) or p.lambda_mix == 0:
            return {}
        if self.skipped(weights, "mixed"):
            return {"mixed": aligned_logits.new_zeros((), dtype=torch.float32)}
        return {"mixed": self.copy_paste_term(ensemble, batch, aligned_logits, p.mix_box)}

    def copy_paste_weights(self, progress: float, ramp_start: float, ramp_end: float) -> dict:
        """``{"mixed": lambda_mix(t)}`` when the :class:`CopyPaste` option is on (ramped up
        from ``ramp_start`` to ``ramp_end``, the method's agreement ramp; with ``mix_every``,
        :meth:`every_nth_step`), else nothing."""
        p = self.params
        if not isinstance(p, CopyPaste) or p.lambda_mix == 0:
            return {}
        weight = gaussian_rampup(progress, p.lambda_mix, ramp_start, ramp_end)
        return {"mixed": self.every_nth_step(weight, p.mix_every)}

    @staticmethod
    def copy_paste_term(
        ensemble: Ensemble, batch: Batch, aligned_logits: torch.Tensor, box: float
    ) -> torch.Tensor:
        """``L_mix`` of :class:`CopyPaste`: summed over members like the supervised term.

        Args:
            ensemble: The members.
            batch: The step's data (each member's labeled batch is paired with the shared
                unlabeled batch by index, as many pairs as the smaller holds).
            aligned_logits: ``(k, B_u, C, ...)`` the members' logits on the shared unlabeled
                grid (:meth:`unlabeled_predictions`); only their values are used.
            box: The pasted box's side fraction.
        """
        unlabeled = batch.unlabeled
        if unlabeled is None:
            raise ValueError("the copy-paste term needs an unlabeled batch")
        k = len(ensemble)
        with torch.no_grad():
            probabilities = torch.softmax(aligned_logits.detach().float(), dim=2)
            total = probabilities.sum(0)
            inputs, targets = [], []
            for member, (images, labels) in enumerate(batch.labeled):
                peers = (total - probabilities[member]) / max(k - 1, 1)
                n = min(len(images), len(unlabeled))
                mask = random_box_mask(images.shape[2:], box, images.device)
                mixed, mixed_targets = copy_paste(
                    images[:n], labels[:n], unlabeled[:n], peers[:n].argmax(1, keepdim=True), mask
                )
                inputs.append(mixed)
                targets.append(mixed_targets)
        logits = ensemble.forward_each(inputs)
        return sum(
            dice_ce_loss(member_logits, member_targets)
            for member_logits, member_targets in zip(logits.unbind(0), targets, strict=True)
        )
