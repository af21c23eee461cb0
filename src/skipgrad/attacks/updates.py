"""Update rules and projections for L-inf and L2 balls."""
from __future__ import annotations

import math

import torch

_TINY = 1e-12


def per_sample_norm(x: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample p-norm, shaped (N, 1, 1, ...) for broadcasting."""
    return x.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (x.dim() - 1)))


def l1_normalise(grad: torch.Tensor) -> torch.Tensor:
    """Divide each sample by its mean absolute value: the momentum input of MI-FGSM (Dong et al.,
    CVPR 2018, "Boosting Adversarial Attacks with Momentum"); a per-sample L1 normalisation."""
    scale = grad.abs().flatten(1).mean(dim=1).view(-1, *([1] * (grad.dim() - 1)))
    return grad / scale.clamp_min(_TINY)


def steepest_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit-step direction for the ball: the sign for L-inf, the L2-normalised gradient for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / per_sample_norm(grad, 2).clamp_min(_TINY)


def project(x: torch.Tensor, origin: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the eps-ball around ``origin`` intersected with the [0, 1] box."""
    delta = x - origin
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / per_sample_norm(delta, 2).clamp_min(_TINY)).clamp(max=1.0)
    return (origin + delta).clamp(0.0, 1.0)


def quantise_in_ball(adv: torch.Tensor, images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Round to 8-bit levels so that the bound holds on the rounded values.

    The reference is ``round(images * 255)``, i.e. the clean image as it would be saved. For L-inf
    the rounded perturbation is clipped to ``floor(eps * 255)`` levels; for L2 a perturbation whose
    rounding leaves the ball is rescaled onto the sphere and truncated towards zero, which can only
    shrink every coordinate.
    """
    clean = (images * 255).round()
    delta = adv * 255 - clean
    if norm == "linf":
        levels = math.floor(eps * 255 + 1e-6)
        q = delta.round().clamp(-levels, levels)
    else:
        radius = eps * 255
        q = delta.round()
        outside = per_sample_norm(q, 2) > radius
        shrunk = (delta * (radius / per_sample_norm(delta, 2).clamp_min(_TINY))).trunc()
        q = torch.where(outside, shrunk, q)
    return (clean + q).clamp(0, 255) / 255
