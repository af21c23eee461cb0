"""Update rules and projections for L-inf and L2 balls."""
from __future__ import annotations

import torch

from skipgrad.units import l2_radius_squared, linf_levels

_TINY = 1e-12
# Relative shrink of the L2 radius before truncation in quantise_in_ball: room for float rounding.
_L2_MARGIN = 1e-6


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

    The reference is ``clean = round(images * 255)``, the clean image as it would be saved, and
    ``q = round(adv * 255) - clean`` (after the steps below) is the saved perturbation in levels.
    Guarantee, per image, exactly (no float slack;
    :func:`skipgrad.store.verify.bound_violation` checks the same numbers):

    - L-inf: ``|q_i| <= skipgrad.units.linf_levels(eps) = floor(eps*255)`` for every pixel; the
      rounded perturbation is clipped to that many levels.
    - L2: the integer ``sum(q_i**2) <= skipgrad.units.l2_radius_squared(eps)``, the float64 value
      of ``(eps*255)**2``, i.e. ``||q||_2 <= eps*255`` levels. The rounded perturbation is kept
      when its exact sum of squares (integers, summed in float64: exact below 2**53) passes;
      otherwise the unrounded one is rescaled to ``eps*255*(1 - 1e-6)`` levels in float64 and
      truncated towards zero. Truncation only shrinks coordinates, and the margin of 1e-6 is far
      above the float64 rounding of the norm and the scale (relative n*2**-53 at worst for n
      values), so the result is strictly inside.

    Clamping ``clean + q`` to [0, 255] afterwards only shrinks ``|q_i|`` (``clean`` is in
    [0, 255]), which keeps both guarantees.
    """
    clean = (images * 255).round()
    delta = adv * 255 - clean
    if norm == "linf":
        levels = linf_levels(eps)
        q = delta.round().clamp(-levels, levels)
    else:
        q = delta.round()
        outside = _sum_of_squares(q) > l2_radius_squared(eps)
        wide = delta.double()
        scale = eps * 255 * (1 - _L2_MARGIN) / per_sample_norm(wide, 2).clamp_min(_TINY)
        shrunk = (wide * scale).trunc().to(delta.dtype)
        q = torch.where(outside, shrunk, q)
    return (clean + q).clamp(0, 255) / 255


def _sum_of_squares(levels: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squares of integer-valued ``levels``, exact in float64, shaped to
    broadcast."""
    return levels.double().square().flatten(1).sum(dim=1).view(-1, *([1] * (levels.dim() - 1)))
