"""Cross Pseudo Supervision baseline (Chen et al., CVPR 2021)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

from cotrain.losses import cross_pseudo_supervision_loss
from cotrain.methods.base import Batch, CoTrainingMethod, LossTerms
from cotrain.networks import Ensemble
from cotrain.schedules import gaussian_rampup


class CrossPseudoSupervision(CoTrainingMethod):
    """``L = L_sup + lambda(t) * mean over pairs of CE(f_a, argmax f_b) + CE(f_b, argmax f_a)``."""

    name = "cps"
    min_members = 2
    perturbable = True

    @dataclass
    class Params:
        """Attributes:
        lambda_cps: Maximum weight of the cross pseudo-supervision term.
        rampup_start: Fraction of training where its ramp-up starts.
        rampup_end: Fraction of training where it reaches ``lambda_cps``.
        """

        lambda_cps: float = 1.0
        rampup_start: float = 0.0
        rampup_end: float = 0.3

    def loss_terms(
        self, ensemble: Ensemble, batch: Batch, weights: Mapping[str, float] | None = None
    ) -> LossTerms:
        supervised, _ = self.supervised_term(ensemble, batch)
        _, _, logits = self.unlabeled_predictions(ensemble, batch)
        pairs = list(itertools.combinations(range(len(ensemble)), 2))
        pseudo = sum(cross_pseudo_supervision_loss(logits[a], logits[b]) for a, b in pairs) / len(
            pairs
        )
        return {"supervised": supervised, "pseudo_supervision": pseudo}

    def loss_weights(self, progress: float) -> dict[str, float]:
        p = self.params
        return {
            "supervised": 1.0,
            "pseudo_supervision": gaussian_rampup(
                progress, p.lambda_cps, p.rampup_start, p.rampup_end
            ),
        }
