"""Loss terms of the co-training methods, one named function each.

Conventions: ``logits`` have shape ``(B, C, *spatial)`` (stacked ensembles ``(k, B, C, *spatial)``),
class probabilities are ``p = softmax(logits)`` over C, and every per-voxel quantity is summed
over classes and averaged over batch and voxels. All terms are computed in float32 whatever
the dtype of the logits (mixed precision must not reach ``log``/``softmax``/``KL``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

logger = logging.getLogger(__name__)

__all__ = [
    "adversarial_diversity_loss",
    "critic_adversarial_loss",
    "critic_discriminator_loss",
    "cross_pseudo_supervision_loss",
    "dice_ce_loss",
    "entropy",
    "foreground_focus",
    "jensen_shannon_agreement",
    "jensen_shannon_map",
    "mean_teacher_consistency",
    "symmetric_cross_entropy_agreement",
]

_EPS = 1e-8
_dice_ce = DiceCELoss(
    to_onehot_y=True, softmax=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5
)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Supervised loss: soft Dice + cross-entropy (MONAI ``DiceCELoss``).

    ``L_sup = 1 - 2<Y, p> / (|Y|_1 + |p|_1) - <Y, log p>``, Dice averaged over classes
    (background included) and CE averaged over voxels.

    Args:
        logits: ``(B, C, *spatial)``.
        target: ``(B, 1, *spatial)`` integer class indices.
    """
    return _dice_ce(logits.float(), target)


def entropy(probabilities: torch.Tensor, dim: int) -> torch.Tensor:
    """Shannon entropy ``H(p) = -sum_c p_c log p_c`` (natural log) along ``dim``."""
    return -(probabilities * torch.log(probabilities + _EPS)).sum(dim=dim)


def jensen_shannon_map(member_logits: torch.Tensor) -> torch.Tensor:
    """Per-voxel Jensen-Shannon divergence of k members: ``H(mean_i p_i) - mean_i H(p_i)``.

    It is 0 where all members predict the same distribution and at most ``log k``.

    Args:
        member_logits: ``(k, B, C, *spatial)``.

    Returns:
        ``(B, *spatial)`` in nats.
    """
    p = torch.softmax(member_logits.float(), dim=2)
    divergence = entropy(p.mean(dim=0), dim=1) - entropy(p, dim=2).mean(dim=0)
    return divergence.clamp_min(0.0)  # rounding can leave -1e-8 where members agree


def foreground_focus(member_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Voxels where some member gives the foreground classes probability ``>= threshold``.

    Agreement terms averaged over every voxel are dominated by background the members
    already agree on; averaged over this region they weigh the organ and its boundary.
    The region carries no gradient.

    Args:
        member_logits: ``(k, B, C, *spatial)``, class 0 being background.
        threshold: Foreground probability ``1 - p_background`` a member must reach.

    Returns:
        ``(B, *spatial)`` bool.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"foreground focus threshold must be in (0, 1), got {threshold}")
    background = torch.softmax(member_logits.detach().float(), dim=2)[:, :, 0]
    return (1.0 - background >= threshold).any(dim=0)


def _voxel_mean(values: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """Mean of a ``(B, *spatial)`` map over every voxel, or over ``region`` (0 if it is empty)."""
    if region is None:
        return values.mean()
    return (values * region).sum() / region.sum().clamp_min(1)


def jensen_shannon_agreement(
    member_logits: torch.Tensor, region: torch.Tensor | None = None
) -> torch.Tensor:
    """DCT-Seg agreement loss ``L_cot`` (Peng et al. 2020, Eq. 4), over all k members.

    ``L_cot = E_x,voxels[ H(1/k sum_i p_i) - 1/k sum_i H(p_i) ]``.

    Args:
        member_logits: ``(k, B, C, *spatial)`` logits of every member on the same unlabeled batch.
        region: ``(B, *spatial)`` bool voxels to average over (e.g. :func:`foreground_focus`);
            every voxel (the paper) when ``None``.
    """
    return _voxel_mean(jensen_shannon_map(member_logits), region)


def adversarial_diversity_loss(
    source_logits: torch.Tensor, other_logits_on_adversarial: torch.Tensor
) -> torch.Tensor:
    """One direction of DCT-Seg's diversity loss ``L_div`` (Peng et al. 2020, Eq. 5).

    ``KL( p_source(x) || p_other(g_source(x)) )``: the other member, fed the adversarial example
    made against the source member, is taught the source member's prediction on the clean
    input. The source prediction is a detached target, so only the other member learns from it
    (same gradient as the paper's cross-entropy ``H(p_source(x), p_other(g_source(x)))``).

    Args:
        source_logits: ``(B, C, *spatial)`` source member on the clean input (detached here).
        other_logits_on_adversarial: ``(B, C, *spatial)`` other member on the adversarial input.
    """
    target = torch.softmax(source_logits.detach().float(), dim=1)
    log_q = torch.log_softmax(other_logits_on_adversarial.float(), dim=1)
    return (target * (torch.log(target + _EPS) - log_q)).sum(dim=1).mean()


def symmetric_cross_entropy_agreement(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    region: torch.Tensor | None = None,
    entropy_weight: float = 1.0,
) -> torch.Tensor:
    """Duo-SegNet agreement loss ``L_u`` (Peiris et al. 2021, Eq. 5).

    ``L_u = -E[ <p_a, log p_b> + <p_b, log p_a> ]``; gradients reach both members (the
    official code computed it through ``.item()``, so it never trained anything).

    The two cross-entropies are the members' own entropies plus the two KL divergences,
    ``H(p_a) + H(p_b) + KL(p_a || p_b) + KL(p_b || p_a)``: the entropy part pushes each member
    towards confidence, the KL part towards the other member. ``entropy_weight`` scales the
    entropy part: 1 is the paper's loss, 0 leaves the symmetric KL divergence, which (like
    Jensen-Shannon) is zero wherever the members agree, however unsure.

    Args:
        logits_a: ``(B, C, *spatial)`` first member on an unlabeled batch.
        logits_b: ``(B, C, *spatial)`` second member on the same batch.
        region: ``(B, *spatial)`` bool voxels to average over; every voxel when ``None``.
        entropy_weight: Weight of the members' own entropies (>= 0).
    """
    if entropy_weight < 0:
        raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
    log_a = torch.log_softmax(logits_a.float(), dim=1)
    log_b = torch.log_softmax(logits_b.float(), dim=1)
    p_a, p_b = log_a.exp(), log_b.exp()
    cross_entropies = -(p_a * log_b).sum(dim=1) - (p_b * log_a).sum(dim=1)
    if entropy_weight != 1.0:
        entropies = -(p_a * log_a).sum(dim=1) - (p_b * log_b).sum(dim=1)
        cross_entropies = cross_entropies - (1.0 - entropy_weight) * entropies
    return _voxel_mean(cross_entropies, region)


def critic_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The critic's own loss (Duo-SegNet Eq. 6): tell ground truth from predictions.

    ``BCE(psi(x, Y), 1) + BCE(psi(x, p), 0)``, on logits (numerically safe under AMP).

    Args:
        real_logits: Critic logits on (image, one-hot ground truth).
        fake_logits: Critic logits on (image, detached member probabilities).
    """
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def critic_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The members' adversarial loss ``L_c`` (Duo-SegNet Eqs. 6-8): fool the critic.

    ``BCE(psi(x, p), 1) = -E[log psi(x, p)]``, for labeled and unlabeled predictions alike.

    Args:
        fake_logits: Critic logits on (image, member probabilities), not detached.
    """
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def cross_pseudo_supervision_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Cross Pseudo Supervision (Chen et al., CVPR 2021): each member learns the other's argmax.

    ``CE(p_a, argmax p_b) + CE(p_b, argmax p_a)``, the hard pseudo-labels carrying no gradient.

    Args:
        logits_a: ``(B, C, *spatial)``.
        logits_b: ``(B, C, *spatial)``.
    """
    pseudo_a = logits_a.detach().argmax(dim=1)
    pseudo_b = logits_b.detach().argmax(dim=1)
    return F.cross_entropy(logits_a.float(), pseudo_b) + F.cross_entropy(logits_b.float(), pseudo_a)


def mean_teacher_consistency(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """Mean Teacher consistency (Tarvainen & Valpola, 2017): MSE between softmax outputs.

    ``E[ sum_c (p_student - p_teacher)^2 ]``, the teacher being a detached target.

    Args:
        student_logits: ``(B, C, *spatial)`` student on a perturbed input.
        teacher_logits: ``(B, C, *spatial)`` EMA teacher on a differently perturbed input.
    """
    p_student = torch.softmax(student_logits.float(), dim=1)
    p_teacher = torch.softmax(teacher_logits.detach().float(), dim=1)
    return ((p_student - p_teacher) ** 2).sum(dim=1).mean()
