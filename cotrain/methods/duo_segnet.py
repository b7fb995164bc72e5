"""Duo-SegNet: adversarial dual-view co-training with a critic (Peiris et al., MICCAI 2021).

Members minimise ``lambda_s L_s + lambda_u(t) L_u + lambda_c(t) L_c [+ lambda_mix(t) L_mix]``
and the critic maximises ``L_c`` with its own optimiser (one critic step per members' step, as
in the official code):

- ``L_s``: Dice+CE of each member on its labeled view (Eqs. 3-4);
- ``L_u``: symmetric cross-entropy between every pair of members on unlabeled data (Eq. 5);
- ``L_c``: the members' adversarial loss, fooling the critic on labeled and unlabeled
  predictions (Eqs. 6-8);
- ``L_mix`` (not in the paper, ``lambda_mix = 0`` by default): copy-paste of labeled and
  unlabeled patches, see :class:`~cotrain.methods.base.CopyPaste`.

Fixed against the official code: ``L_u`` and the Dice term keep their gradients (the official
code computes them through ``.item()``), and the critic sees the image and spatial context
(the official critic is 1x1 convolutions on the probabilities alone).

The members' adversarial passes run with the critic's parameters frozen: the members' backward
pass then computes the gradients it needs (through the critic into the members' predictions)
and not the critic's own weight gradients, which its step would discard. The critic judges all
its inputs of a pass in one call: every member's labeled and unlabeled predictions in the
members' pass, every ground truth and labeled prediction in its own step.

Warm starts carry the critic and its RMSprop state: a retrain's members keep being judged by the
critic that learned their previous predictions, instead of a random one whose gradients would
be noise until it catches up. The step count of ``mix_every`` starts again with each run (its
mean weight is the same either way).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cotrain.losses import (
    critic_adversarial_loss,
    critic_discriminator_loss,
    symmetric_cross_entropy_agreement,
)
from cotrain.methods.base import AgreementFocus, Batch, CopyPaste, CoTrainingMethod, LossTerms
from cotrain.networks import Critic, Ensemble, frozen
from cotrain.schedules import gaussian_rampup


class DuoSegNet(CoTrainingMethod):
    """Dual-view co-training with a critic (see module docstring)."""

    name = "duo_segnet"
    min_members = 2
    perturbable = True

    @dataclass
    class Params(AgreementFocus, CopyPaste):
        """Attributes:
        lambda_u: Maximum weight of the symmetric cross-entropy agreement (paper 0.3, code 0.4).
        lambda_c: Maximum weight of the members' adversarial (critic) loss (paper and code 0.2).
        rampup_start: Fraction of training where both ramp-ups start.
        rampup_end: Fraction of training where both reach their maximum.
        critic_learning_rate: RMSprop learning rate of the critic (paper 5e-5).
        critic_channels: Feature channels of the critic's blocks.
        entropy_weight: Weight of the members' own entropies inside ``L_u`` (1: the paper's
            symmetric cross-entropy; 0: the symmetric KL divergence, zero wherever the members
            agree; see :func:`~cotrain.losses.symmetric_cross_entropy_agreement`).
        agreement_focus: See :class:`~cotrain.methods.base.AgreementFocus`.
        lambda_mix, mix_box, mix_every: The copy-paste term, off by default; see
            :class:`~cotrain.methods.base.CopyPaste`.
        """

        lambda_u: float = 0.3
        lambda_c: float = 0.2
        rampup_start: float = 0.0
        rampup_end: float = 0.3
        critic_learning_rate: float = 5e-5
        critic_channels: tuple[int, ...] = (16, 32, 64)
        entropy_weight: float = 1.0

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.entropy_weight < 0:
                raise ValueError(f"entropy_weight must be >= 0, got {self.entropy_weight}")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.critic = Critic(
            self.spatial_dims,
            self.in_channels,
            self.num_classes,
            tuple(self.params.critic_channels),
        )
        self.critic_optimizer = torch.optim.RMSprop(
            self.critic.parameters(), lr=self.params.critic_learning_rate
        )
        self._labeled_probabilities: list[torch.Tensor] = []

    def loss_terms(
        self, ensemble: Ensemble, batch: Batch, weights: Mapping[str, float] | None = None
    ) -> LossTerms:
        supervised, labeled_logits = self.supervised_term(ensemble, batch)
        unlabeled_inputs, unlabeled_logits, aligned_logits = self.unlabeled_predictions(
            ensemble, batch
        )
        pairs = list(itertools.combinations(range(len(ensemble)), 2))
        region = self.agreement_region(aligned_logits)
        agreement = sum(
            symmetric_cross_entropy_agreement(
                aligned_logits[a], aligned_logits[b], region, self.params.entropy_weight
            )
            for a, b in pairs
        ) / len(pairs)

        labeled_probabilities = [torch.softmax(logits.float(), dim=1) for logits in labeled_logits]
        unlabeled_probabilities = torch.softmax(unlabeled_logits.float(), dim=2)
        images = [x for x, _ in batch.labeled]
        with frozen(self.critic):  # the members' gradients only; the critic learns in its step
            adversarial = self._adversarial_loss(
                [*images, *unlabeled_inputs.unbind(0)],
                [*labeled_probabilities, *unlabeled_probabilities.unbind(0)],
            )
        # Detached labeled predictions are the critic's "fake" examples in its own step.
        self._labeled_probabilities = [p.detach() for p in labeled_probabilities]
        self.steps += 1
        terms = {"supervised": supervised, "agreement": agreement, "adversarial": adversarial}
        terms.update(self.copy_paste_terms(ensemble, batch, aligned_logits, weights))
        return terms

    def _judge(
        self, images: list[torch.Tensor], segmentations: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The critic's logits on each (image batch, segmentation batch) pair, in one call when
        their shapes allow (instance norm: each sample is normalised on its own, so one call
        gives each pair's logits, up to floating-point order)."""
        if len({x.shape[1:] for x in images}) > 1:
            return [self.critic(x, seg) for x, seg in zip(images, segmentations, strict=True)]
        logits = self.critic(torch.cat(images), torch.cat(segmentations))
        return list(logits.split([len(x) for x in images]))

    def _adversarial_loss(
        self, images: list[torch.Tensor], probabilities: list[torch.Tensor]
    ) -> torch.Tensor:
        """Sum of ``L_c`` over the (image batch, member probabilities) pairs."""
        return sum(critic_adversarial_loss(logits) for logits in self._judge(images, probabilities))

    def loss_weights(self, progress: float) -> dict[str, float]:
        p = self.params
        weights = {
            "supervised": 1.0,
            "agreement": gaussian_rampup(progress, p.lambda_u, p.rampup_start, p.rampup_end),
            "adversarial": gaussian_rampup(progress, p.lambda_c, p.rampup_start, p.rampup_end),
        }
        weights.update(self.copy_paste_weights(progress, p.rampup_start, p.rampup_end))
        return weights

    def critic_loss(self, batch: Batch, member_probabilities: list[torch.Tensor]) -> torch.Tensor:
        """The critic's loss: ground truths are real, the members' labeled predictions fake;
        every member's real and fake examples judged together (:meth:`_judge`)."""
        images, segmentations = [], []
        for (member_images, targets), probabilities in zip(
            batch.labeled, member_probabilities, strict=True
        ):
            one_hot = F.one_hot(targets[:, 0].long(), self.num_classes).movedim(-1, 1).float()
            images.append(torch.cat([member_images, member_images]))
            segmentations.append(torch.cat([one_hot, probabilities.detach()]))
        total = 0.0
        for logits in self._judge(images, segmentations):
            real, fake = logits.chunk(2)
            total = total + critic_discriminator_loss(real, fake)
        return total / len(member_probabilities)

    def after_member_step(self, ensemble: Ensemble, batch: Batch) -> dict[str, float]:
        """One critic step on this step's labeled predictions."""
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss = self.critic_loss(batch, self._labeled_probabilities)
        loss.backward()
        self.reduce_gradients(self.critic)
        self.critic_optimizer.step()
        self._labeled_probabilities = []
        return {"critic": float(loss.detach())}

    def auxiliary_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic": self.critic_optimizer}
