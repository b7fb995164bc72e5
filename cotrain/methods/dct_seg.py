"""DCT-Seg: deep co-training for segmentation with adversarial diversity (Peng et al. 2020).

``L = L_sup + lambda_cot(t) L_cot + lambda_div(t) L_div [+ lambda_mix(t) L_mix]``:

- ``L_sup``: Dice+CE of every member on its own labeled view (Eq. 2-3);
- ``L_cot``: Jensen-Shannon divergence of all k members on the unlabeled batch (Eq. 4);
- ``L_div``: for a random pair (i, j) each step (every member is in a pair every ceil(k/2)
  steps), member j learns member i's clean prediction on examples made adversarial for i,
  and vice versa (Eq. 5). Adversarial examples: FGSM against the ground truth on labeled
  images (Eq. 7), VAT on unlabeled images (Eq. 6);
- ``L_mix`` (not in the paper, ``lambda_mix = 0`` by default): copy-paste of labeled and
  unlabeled patches, see :class:`~cotrain.methods.base.CopyPaste`.

``diversity_every = n > 1`` (not in the paper; 1 by default) computes ``L_div`` on every n-th step
only, with ``n lambda_div(t)``, so that its mean weight is unchanged and its cost divided by n.
VAT's reference prediction ``f_i(x)`` is the step's own (no second clean forward pass), so is
FGSM's outside autocast (its gradient taken through the supervised pass), and
``L_div`` is not computed while its weight is 0 (the first ``div_rampup_start`` of a run).

Departure from Algorithm 1 for k > 2: the supervised and agreement terms update all members
every step (they are cheap next to the adversarial examples); only the diversity term is
restricted to the sampled pair. For k = 2 it is the paper's algorithm.

Warm starts carry the member-pair sampler's position and the step count of ``diversity_every``
and ``mix_every`` (the members carry no other state of the method).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cotrain.adversarial import fgsm_perturbation, vat_perturbation
from cotrain.losses import adversarial_diversity_loss, jensen_shannon_agreement
from cotrain.methods.base import AgreementFocus, Batch, CopyPaste, CoTrainingMethod, LossTerms
from cotrain.networks import Ensemble
from cotrain.schedules import MemberPairSampler, gaussian_rampup


class DCTSeg(CoTrainingMethod):
    """Deep co-training with adversarial diversity (see module docstring)."""

    name = "dct_seg"
    min_members = 2
    perturbable = True

    @dataclass
    class Params(AgreementFocus, CopyPaste):
        """Attributes:
        lambda_cot: Maximum weight of the JSD agreement term (paper: 0.5).
        lambda_div: Maximum weight of the adversarial diversity term (paper: 0.05).
        cot_rampup_start: Fraction of training where the agreement ramp-up starts.
        div_rampup_start: Fraction of training where the diversity ramp-up starts (the paper
            starts it later, at epoch 20 of its ramp to 50).
        rampup_end: Fraction of training where both reach their maximum.
        fgsm_epsilon: L-infinity size of FGSM perturbations (normalised image units).
        vat_epsilon: L2 size of VAT perturbations per sample, over the whole patch.
        vat_xi: L2 size of VAT's probe step (must not vanish in 3D, see ``vat_perturbation``).
        vat_power_iterations: VAT power iterations.
        diversity_every: Compute the diversity term on every n-th step only, weighted n times
            (1: every step, the paper).
        agreement_focus: See :class:`~cotrain.methods.base.AgreementFocus`.
        lambda_mix, mix_box, mix_every: The copy-paste term, off by default; see
            :class:`~cotrain.methods.base.CopyPaste`.
        """

        lambda_cot: float = 0.5
        lambda_div: float = 0.05
        cot_rampup_start: float = 0.0
        div_rampup_start: float = 0.1
        rampup_end: float = 0.3
        fgsm_epsilon: float = 0.05
        vat_epsilon: float = 6.0
        vat_xi: float = 10.0
        vat_power_iterations: int = 1
        diversity_every: int = 1

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.diversity_every < 1:
                raise ValueError(f"diversity_every must be >= 1, got {self.diversity_every}")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pairs = MemberPairSampler(self.num_members, seed=self.seed)

    def loss_terms(
        self, ensemble: Ensemble, batch: Batch, weights: Mapping[str, float] | None = None
    ) -> LossTerms:
        diverse = not self.skipped(weights, "diversity")
        # Outside autocast the supervised pass is float32: with its inputs requiring grad, its
        # graph gives FGSM's gradient, saving FGSM's own forward pass (under AMP, FGSM runs
        # its own float32 pass).
        reuse = diverse and not torch.is_autocast_enabled(batch.labeled[0][0].device.type)
        supervised_batch = batch
        if reuse:
            supervised_batch = dataclasses.replace(
                batch,
                labeled=[(x.detach().requires_grad_(True), y) for x, y in batch.labeled],
            )
        supervised, labeled_logits = self.supervised_term(ensemble, supervised_batch)
        unlabeled_inputs, unlabeled_logits, aligned_logits = self.unlabeled_predictions(
            ensemble, batch
        )
        i, j = self.pairs()  # drawn every step, so the pairs do not depend on the skipping
        self.steps += 1
        if diverse:
            diversity = self._diversity(
                ensemble,
                supervised_batch,
                (i, j),
                labeled_logits,
                unlabeled_inputs,
                unlabeled_logits,
                reuse_labeled=reuse,
            )
        else:
            diversity = supervised.new_zeros(())
        terms = {
            "supervised": supervised,
            "agreement": jensen_shannon_agreement(
                aligned_logits, self.agreement_region(aligned_logits)
            ),
            "diversity": diversity,
        }
        terms.update(self.copy_paste_terms(ensemble, batch, aligned_logits, weights))
        return terms

    def _adversarial_inputs(
        self,
        ensemble: Ensemble,
        batch: Batch,
        source: int,
        labeled_logits: torch.Tensor | None,
        unlabeled_inputs: torch.Tensor,
        unlabeled_logits: torch.Tensor,
    ) -> torch.Tensor:
        """``g_source(x)``: source's labeled batch made adversarial by FGSM and its unlabeled
        input by VAT, both against member ``source``, concatenated. ``labeled_logits``: the
        step's float32 prediction on that labeled batch (whose images require grad) for FGSM
        to reuse, or ``None``."""
        p = self.params
        source_net = ensemble.members[source]
        images, targets = batch.labeled[source]
        labeled_adv = images.detach() + fgsm_perturbation(
            source_net, images, targets, p.fgsm_epsilon, clean_logits=labeled_logits
        ).to(images.dtype)
        unlabeled = unlabeled_inputs[source]
        unlabeled_adv = unlabeled + vat_perturbation(
            source_net,
            unlabeled,
            p.vat_epsilon,
            p.vat_xi,
            p.vat_power_iterations,
            clean_logits=unlabeled_logits[source],
        ).to(unlabeled.dtype)
        return torch.cat([labeled_adv, unlabeled_adv])

    def _diversity(
        self,
        ensemble: Ensemble,
        batch: Batch,
        pair: tuple[int, int],
        labeled_logits: list[torch.Tensor],
        unlabeled_inputs: torch.Tensor,
        unlabeled_logits: torch.Tensor,
        reuse_labeled: bool = False,
    ) -> torch.Tensor:
        """Both directions of the pair: ``KL(f_s(x) || f_o(g_s(x)))`` for ``(s, o) = (i, j)``
        and ``(j, i)``, over the source's labeled batch and its unlabeled input (both members
        judged on the source's view, so no alignment is needed). The two members' passes on
        the adversarial inputs run as one ensemble call."""
        i, j = pair
        adversarial = [
            self._adversarial_inputs(
                ensemble,
                batch,
                source,
                labeled_logits[source] if reuse_labeled else None,
                unlabeled_inputs,
                unlabeled_logits,
            )
            for source in (i, j)
        ]
        others_on_adversarial = ensemble.forward_each(adversarial, members=(j, i))
        diversity = 0.0
        for source, other_on_adv in zip((i, j), others_on_adversarial, strict=True):
            source_clean = torch.cat([labeled_logits[source], unlabeled_logits[source]])
            diversity = diversity + adversarial_diversity_loss(source_clean, other_on_adv)
        return diversity

    def loss_weights(self, progress: float) -> dict[str, float]:
        """The ramped weights; with ``diversity_every = n``, the diversity weight is n times
        the ramp on the steps that compute it (:meth:`every_nth_step`) and 0 on the others."""
        p = self.params
        diversity = gaussian_rampup(progress, p.lambda_div, p.div_rampup_start, p.rampup_end)
        weights = {
            "supervised": 1.0,
            "agreement": gaussian_rampup(progress, p.lambda_cot, p.cot_rampup_start, p.rampup_end),
            "diversity": self.every_nth_step(diversity, p.diversity_every),
        }
        weights.update(self.copy_paste_weights(progress, p.cot_rampup_start, p.rampup_end))
        return weights

    def get_extra_state(self) -> dict:
        return {"pairs": self.pairs.state_dict(), "steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.pairs.load_state_dict(state["pairs"])
        self.steps = int(state.get("steps", 0))  # checkpoints before diversity_every: 0
