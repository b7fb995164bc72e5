"""Supervised-only baseline: k members trained independently on their labeled subsets ("bagging")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cotrain.methods.base import Batch, CoTrainingMethod, LossTerms
from cotrain.networks import Ensemble


class Supervised(CoTrainingMethod):
    """``L = sum_i L_sup(f_i; S_i)``; unlabeled data is not used."""

    name = "supervised"
    uses_unlabeled = False

    @dataclass
    class Params:
        """No hyperparameters beyond the engine's."""

    def loss_terms(
        self, ensemble: Ensemble, batch: Batch, weights: Mapping[str, float] | None = None
    ) -> LossTerms:
        supervised, _ = self.supervised_term(ensemble, batch)
        return {"supervised": supervised}

    def loss_weights(self, progress: float) -> dict[str, float]:
        return {"supervised": 1.0}
