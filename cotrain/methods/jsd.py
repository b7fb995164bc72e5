"""JSD-only baseline: DCT-Seg without its adversarial diversity term."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cotrain.losses import jensen_shannon_agreement
from cotrain.methods.base import AgreementFocus, Batch, CoTrainingMethod, LossTerms
from cotrain.networks import Ensemble
from cotrain.schedules import gaussian_rampup


class JensenShannonOnly(CoTrainingMethod):
    """``L = L_sup + lambda_cot(t) * JSD(f_1..f_k on unlabeled)``."""

    name = "jsd"
    min_members = 2
    perturbable = True

    @dataclass
    class Params(AgreementFocus):
        """Attributes:
        lambda_cot: Maximum weight of the agreement term.
        rampup_start: Fraction of training at which its ramp-up starts.
        rampup_end: Fraction of training at which it reaches ``lambda_cot``.
        agreement_focus: See :class:`~cotrain.methods.base.AgreementFocus`.
        """

        lambda_cot: float = 0.5
        rampup_start: float = 0.0
        rampup_end: float = 0.3

    def loss_terms(
        self, ensemble: Ensemble, batch: Batch, weights: Mapping[str, float] | None = None
    ) -> LossTerms:
        supervised, _ = self.supervised_term(ensemble, batch)
        _, _, aligned_logits = self.unlabeled_predictions(ensemble, batch)
        agreement = jensen_shannon_agreement(aligned_logits, self.agreement_region(aligned_logits))
        return {"supervised": supervised, "agreement": agreement}

    def loss_weights(self, progress: float) -> dict[str, float]:
        p = self.params
        return {
            "supervised": 1.0,
            "agreement": gaussian_rampup(progress, p.lambda_cot, p.rampup_start, p.rampup_end),
        }
