"""Adversarial perturbations for DCT-Seg's diversity term: FGSM (labeled) and VAT (unlabeled).

Both are computed in float32 with the network in eval mode (no normalisation statistics are
updated, no dropout) and restored to its previous mode afterwards. The returned perturbation
is detached: it is an input, not a path for gradients.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["evaluation_mode", "fgsm_perturbation", "l2_normalize", "vat_perturbation"]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with autocast off, and restore its mode on exit."""
    was_training = model.training
    model.eval()
    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield model
    finally:
        model.train(was_training)


def l2_normalize(d: torch.Tensor) -> torch.Tensor:
    """Scale each sample of ``d`` (first dimension) to unit L2 norm over all its voxels."""
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    return d / norm.view(-1, *([1] * (d.dim() - 1)))


def fgsm_perturbation(
    model: nn.Module,
    image: torch.Tensor,
    target: torch.Tensor,
    epsilon: float,
    clean_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast Gradient Sign Method: ``r = eps * sign(grad_x CE(f(x), y))`` (Peng et al., Eq. 7).

    Args:
        model: The member the example is made against.
        image: ``(B, C_in, *spatial)``.
        target: ``(B, 1, *spatial)`` class indices.
        epsilon: L-infinity size of the perturbation, in units of the (normalised) image.
        clean_logits: ``f(image)`` when the caller has it already with a float32 graph from an
            ``image`` that requires grad (a training step's prediction outside autocast; for
            cotrain's members, without dropout or batch statistics, it equals the eval-mode
            one): the gradient is taken through that graph, which is kept for the step's own
            backward pass, saving a forward pass. ``None`` computes it.

    Returns:
        The perturbation ``r`` (detached, float32); the adversarial input is ``image + r``.
    """
    if clean_logits is not None:
        if not image.requires_grad or clean_logits.dtype != torch.float32:
            raise ValueError(
                "clean_logits must be float32 logits with a graph from an image that requires grad"
            )
        loss = F.cross_entropy(clean_logits, target[:, 0].long())
        (grad,) = torch.autograd.grad(loss, image, retain_graph=True)
        return epsilon * grad.detach().sign()
    x = image.detach().float().requires_grad_(True)
    with evaluation_mode(model):
        loss = F.cross_entropy(model(x).float(), target[:, 0].long())
        (grad,) = torch.autograd.grad(loss, x)
    return epsilon * grad.sign()


def vat_perturbation(
    model: nn.Module,
    image: torch.Tensor,
    epsilon: float,
    xi: float = 10.0,
    power_iterations: int = 1,
    clean_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Virtual adversarial perturbation (Miyato et al. 2018; Peng et al., Eq. 6).

    ``r_adv = eps * normalise(grad_r KL(f(x) || f(x + r)))`` at ``r = xi * d``, with ``d`` a
    random direction normalised per sample over the whole volume and refined by power
    iterations. In 3D the original ``xi = 1e-6`` vanishes against ~1e6 voxels (the KL change is
    below float precision); a 3D reference (SS-Net VAT3d) uses ``xi = 10``, ``eps = 6`` on
    z-scored volumes, the defaults here.

    Args:
        model: The member the example is made against.
        image: ``(B, C_in, *spatial)``.
        epsilon: L2 norm of the returned perturbation, per sample.
        xi: L2 norm of the probe step used to find the direction.
        power_iterations: Number of power iterations.
        clean_logits: ``f(x)`` when the caller has it already (a training step's prediction
            on ``image``; the members cotrain builds have no dropout or batch statistics, so
            it equals the eval-mode prediction), saving a forward pass; ``None`` computes it.

    Returns:
        The perturbation ``r_adv`` (detached, float32) with L2 norm ``epsilon`` per sample.
    """
    x = image.detach().float()
    with evaluation_mode(model):
        if clean_logits is None:
            with torch.no_grad():
                clean_logits = model(x)
        clean = torch.softmax(clean_logits.detach().float(), dim=1)
        d = l2_normalize(torch.randn_like(x))
        for _ in range(power_iterations):
            d = (xi * d).requires_grad_(True)
            log_q = torch.log_softmax(model(x + d).float(), dim=1)
            divergence = F.kl_div(log_q, clean, reduction="batchmean")
            (grad,) = torch.autograd.grad(divergence, d)
            d = l2_normalize(grad.detach())
    return epsilon * d
