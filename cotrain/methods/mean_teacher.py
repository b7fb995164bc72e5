"""Mean Teacher baseline (Tarvainen & Valpola, NeurIPS 2017), one EMA teacher per member.

Warm starts carry each member's EMA teacher, so the consistency targets continue rather than
restarting from the served members' raw weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cotrain.losses import mean_teacher_consistency
from cotrain.methods.base import Batch, CoTrainingMethod, LossTerms
from cotrain.networks import Ensemble
from cotrain.schedules import gaussian_rampup


class MeanTeacher(CoTrainingMethod):
    """``L = L_sup + lambda(t) * MSE(softmax f_i(u + n), softmax teacher_i(u + n'))``.

    Each member (the student) has a teacher whose weights are an exponential moving average of
    the student's. The ensemble that is served and evaluated holds the students.
    """

    name = "mean_teacher"

    @dataclass
    class Params:
        """Attributes:
        lambda_consistency: Maximum weight of the consistency term (UA-MT, SSL4MIS: 0.1).
        rampup_start: Fraction of training where its ramp-up starts.
        rampup_end: Fraction of training where it reaches its maximum.
        ema_decay: Teacher EMA decay.
        noise_std: Standard deviation of the Gaussian input noise (clipped at 2 std).
        """

        lambda_consistency: float = 0.1
        rampup_start: float = 0.0
        rampup_end: float = 0.3
        ema_decay: float = 0.99
        noise_std: float = 0.1

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teachers = nn.ModuleList()

    def attach(self, ensemble: Ensemble) -> None:
        """Teachers start as copies of their students."""
        self.teachers = nn.ModuleList(copy.deepcopy(m) for m in ensemble.members)
        self.teachers.requires_grad_(False)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        s = self.params.noise_std
        return x + (torch.randn_like(x) * s).clamp(-2 * s, 2 * s)

    def loss_terms(
        self, ensemble: Ensemble, batch: Batch, weights: Mapping[str, float] | None = None
    ) -> LossTerms:
        supervised, _ = self.supervised_term(ensemble, batch)
        unlabeled = batch.unlabeled
        consistency = 0.0
        for student, teacher in zip(ensemble.members, self.teachers, strict=True):
            with torch.no_grad():
                teacher_logits = teacher(self._noisy(unlabeled))
            consistency = consistency + mean_teacher_consistency(
                student(self._noisy(unlabeled)), teacher_logits
            )
        return {"supervised": supervised, "consistency": consistency}

    def loss_weights(self, progress: float) -> dict[str, float]:
        p = self.params
        return {
            "supervised": 1.0,
            "consistency": gaussian_rampup(
                progress, p.lambda_consistency, p.rampup_start, p.rampup_end
            ),
        }

    @torch.no_grad()
    def after_member_step(self, ensemble: Ensemble, batch: Batch) -> dict[str, float]:
        """Teacher weights move towards the students': ``t = d * t + (1 - d) * s``."""
        decay = self.params.ema_decay
        for student, teacher in zip(ensemble.members, self.teachers, strict=True):
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.mul_(decay).add_(s.detach(), alpha=1 - decay)
            for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
                t.copy_(s)
        return {}

    def after_warmup_step(self, ensemble: Ensemble, batch: Batch) -> dict[str, float]:
        """The teachers follow the members during the supervised warm-up too."""
        return self.after_member_step(ensemble, batch)
