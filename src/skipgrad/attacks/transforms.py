"""Input and gradient transforms that improve transfer: input diversity (DI) and translation
invariance (TI)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from skipgrad.attacks.randomness import PerImageRandom


@dataclass(frozen=True)
class DiversityDraw:
    """One step's DI decision for one image: resize to (height, width), paste at (top, left) on
    a zero canvas of (canvas_h, canvas_w). ``None`` in a list of draws means "left unchanged"."""

    height: int
    width: int
    top: int
    left: int
    canvas_h: int
    canvas_w: int


def draw_diversity(rng: PerImageRandom, size: tuple[int, int], prob: float,
                   scale: float) -> list[DiversityDraw | None]:
    """Sample DI parameters for every image (Xie et al., CVPR 2019, "Improving Transferability of
    Adversarial Examples with Input Diversity"): with probability ``prob`` the image is resized to a
    random size between its own and ``scale`` times it, then zero-padded at a random offset."""
    h, w = size
    canvas_h, canvas_w = max(h, math.floor(h * scale)), max(w, math.floor(w * scale))
    draws = []
    for apply, u_size, u_top, u_left in rng.uniform((4,)).tolist():
        if apply >= prob:
            draws.append(None)
            continue
        new_h = min(canvas_h, h + math.floor(u_size * (canvas_h - h + 1)))
        new_w = min(canvas_w, round(w * new_h / h))
        top = math.floor(u_top * (canvas_h - new_h + 1))
        left = math.floor(u_left * (canvas_w - new_w + 1))
        draws.append(DiversityDraw(new_h, new_w, top, left, canvas_h, canvas_w))
    return draws


def apply_diversity(x: torch.Tensor, draws: list[DiversityDraw | None]) -> torch.Tensor:
    """Resize (nearest, as Xie et al.) and pad each drawn image, then resize the canvas back to the
    input size (bilinear) so that models with a fixed input size accept it. Differentiable."""
    out = []
    for image, draw in zip(x, draws):
        out.append(image if draw is None else _resize_and_pad(image, draw, x.shape[-2:]))
    return torch.stack(out)


def _resize_and_pad(image: torch.Tensor, d: DiversityDraw, size: torch.Size) -> torch.Tensor:
    resized = F.interpolate(image[None], size=(d.height, d.width), mode="nearest")
    padding = (d.left, d.canvas_w - d.width - d.left, d.top, d.canvas_h - d.height - d.top)
    canvas = F.pad(resized, padding)
    return F.interpolate(canvas, size=tuple(size), mode="bilinear", align_corners=False)[0]


def gaussian_kernel(size: int, nsig: float = 3.0) -> torch.Tensor:
    """A normalised 2-D Gaussian of ``size`` x ``size`` spanning +-``nsig`` standard deviations,
    the kernel of Dong et al. (CVPR 2019, "Evading Defenses to Transferable Adversarial Examples by
    Translation-Invariant Attacks")."""
    if size == 1:
        return torch.ones(1, 1)
    x = torch.linspace(-nsig, nsig, size, dtype=torch.float64)
    k1 = torch.exp(-0.5 * x**2)
    k2 = torch.outer(k1, k1)
    return (k2 / k2.sum()).float()


def smooth_gradient(grad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """TI: convolve each channel of the gradient with ``kernel`` (zero padding, same size)."""
    channels = grad.shape[1]
    weight = kernel.to(grad)[None, None].expand(channels, 1, *kernel.shape)
    return F.conv2d(grad, weight, padding=kernel.shape[-1] // 2, groups=channels)
