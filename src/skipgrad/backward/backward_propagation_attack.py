"""``bpa``: the Backward Propagation Attack's gradient rules as a context.

Xiaosen Wang, Kangheng Tong, Kun He, "Rethinking the Backward Propagation for Adversarial
Transferability", NeurIPS 2023 (arXiv:2306.12685). The arg-max of max-pooling and the
step of the ReLU derivative truncate the gradient; BPA keeps the forward pass and replaces their
derivatives by smooth ones:

* max-pool: the gradient of each output is distributed over its window by ``softmax(T * window)``
  (the arg-max is the limit ``T -> inf``);
* ReLU: the derivative of SiLU, ``d/dx [x * sigmoid(T x)] = s + T x s (1 - s)`` with
  ``s = sigmoid(T x)`` (the ReLU step is the limit ``T -> inf``).

Defaults reproduce the release (Trustworthy-AI-Group/BPA, ``utils.py`` and
``attack_eval_imagenet.py``): on torchvision ResNet-50 the 3x3/s2 stem max-pool at T=10 and every
ReLU of ``layer3[1:]`` and ``layer4``; on torchvision VGG19-bn all five 2x2 max-pools at T=1 and the
last two ReLUs of ``features``. Two deviations, both invisible at the defaults:

* the release's padded 3x3 pool lets its zero padding take part in the softmax (``F.unfold`` pads
  with zeros, while the forward pool pads with -inf): border windows send part of their gradient
  to the padding, where it is dropped. Kept, as released, for every padded pool.
* the release's ``relu_silu_temperature`` multiplies the SiLU derivative by T (a plain scale); our
  ``relu_temperature`` sharpens the sigmoid, so that T interpolates between SiLU (T=1) and ReLU.
  At T=1 both are the SiLU derivative.

The softmax is computed stably (the release exponentiates raw activations, which overflows to
``inf/inf = NaN`` once ``T * activation`` exceeds ~88 in float32).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from skipgrad.backward.base import (Attacher, BackwardContext, Change, ForwardSwap,
                                    NothingToChangeError, model_label)
from skipgrad.backward.sgm import find_blocks
from skipgrad.backward.units import resolve_start, trunk_relus
from skipgrad.errors import InputError

# The release's pool temperatures by window size: 10 for ResNet-50's 3x3 stem pool, 1 for VGG's
# 2x2 pools; other sizes take 1.
_RELEASE_POOL_TEMPERATURE = {3: 10.0, 2: 1.0}


class _SiLUGradReLU(torch.autograd.Function):
    """``relu(x)`` forward; backward with the derivative of ``x * sigmoid(T x)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.temperature = temperature
        return torch.relu(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        # d/dx [x sigmoid(Tx)] = silu'(Tx): one fused kernel instead of six elementwise passes.
        tx = x if ctx.temperature == 1.0 else ctx.temperature * x
        return torch.ops.aten.silu_backward(grad, tx), None


class _SoftMaxPool2d(torch.autograd.Function):
    """``max_pool2d`` forward; backward spreads each output's gradient over its window by
    ``softmax(T * window)``, the window zero-padded as in the release."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pool: nn.MaxPool2d, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.pool, ctx.temperature = pool, temperature
        return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return soft_pool_gradient(x, grad, ctx.pool, ctx.temperature), None, None


def soft_pool_gradient(x: torch.Tensor, grad: torch.Tensor, pool: nn.MaxPool2d,
                       temperature: float) -> torch.Tensor:
    """The input gradient of a max-pool whose arg-max is replaced by a softmax over each window."""
    geometry = dict(kernel_size=pool.kernel_size, dilation=pool.dilation, padding=pool.padding,
                    stride=pool.stride)
    n, c = x.shape[:2]
    windows = F.unfold(x, **geometry)                        # (N, C*K, L), zero padding
    weights = windows.view(n, c, -1, windows.shape[-1])      # (N, C, K, L)
    # softmax over K, in place on the fresh unfolded copy (half the time of torch.softmax over a
    # middle dimension); the window maximum is subtracted first, so exp never overflows.
    weights.sub_(weights.amax(dim=2, keepdim=True)).mul_(temperature).exp_()
    weights.mul_(grad.reshape(n, c, 1, -1) / weights.sum(dim=2, keepdim=True))
    return F.fold(windows, x.shape[-2:], **geometry)


def check_temperature(name: str, value: float, *, zero_ok: bool = False) -> float:
    """A finite real number, positive (or non-negative when ``zero_ok``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _window(pool: nn.MaxPool2d) -> int:
    size = pool.kernel_size
    return size if isinstance(size, int) else max(size)


class bpa(BackwardContext):  # noqa: N801 - a context manager named like torch.no_grad
    """Smooth backward rules (BPA): soft max-pool windows and SiLU-derivative ReLUs.

    Use as a context around the forward *and* backward pass::

        with skipgrad.bpa(model):
            loss = F.cross_entropy(model(x), y)
            loss.backward()

    Args:
        model: any network with ``nn.ReLU`` or ``nn.MaxPool2d`` modules.
        start: the first unit whose ReLUs get the SiLU derivative: a residual block's module name
            or index (blocks in forward order; the ReLUs of the convolutional trunk from that block
            on change), or, in a network without residual blocks, a trunk ReLU's name or index.
            Default: the block at half depth (``layer3.1`` in torchvision ResNet-50, as released),
            or the last two trunk ReLUs (VGG19-bn's ``features.48`` and ``features.51``, as
            released). The classifier head's ReLUs never change.
        relu_temperature: T of the SiLU derivative ``d/dx [x sigmoid(T x)]``; 1 is the release.
        pool_temperature: T of the window softmax for *every* max-pool of the model (``start``
            does not apply: the release softens ResNet-50's stem pool). ``None``: the release's
            values, 10 for 3x3 windows and 1 otherwise; 0 spreads each gradient uniformly.

    Raises:
        NothingToChangeError: no ReLU from ``start`` on and no max-pool (a ``ValueError``).
        ValueError: ``start`` names no unit (the message lists the valid ones), a temperature out
            of range, or a max-pool BPA cannot soften (``ceil_mode`` or ``return_indices``).
    """

    method = "bpa"

    def __init__(self, model: nn.Module, *, start: str | int | None = None,
                 relu_temperature: float = 1.0, pool_temperature: Optional[float] = None) -> None:
        super().__init__(model)
        self.relu_temperature = check_temperature("relu_temperature", relu_temperature)
        self.pool_temperature = None if pool_temperature is None else \
            check_temperature("pool_temperature", pool_temperature, zero_ok=True)
        relus = self._relus(start)
        pools = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)]
        if not relus and not pools:
            raise NothingToChangeError(
                f"bpa found no ReLU from start={self.start!r} on and no max-pool in "
                f"{model_label(model)}; BPA changes the backward of ReLUs and max-pools")
        self._set_plan([*map(self._relu_attacher, (m for _, m in relus)),
                        *(self._pool_attacher(m) for _, m in pools)],
                       self._changes(relus, pools), [*relus, *pools])

    def _relus(self, start: str | int | None) -> list[tuple[str, nn.Module]]:
        """Trunk ReLUs from the start unit on, in module order."""
        trunk = trunk_relus(self.model)
        blocks = [name for name, _, _ in find_blocks(self.model)]
        if blocks:
            index = resolve_start(self.method, self.model, blocks, start, len(blocks) // 2,
                                  "residual blocks")
            self.start = blocks[index]
            order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
            return [(n, m) for n, m in trunk if order[n] >= order[self.start]]
        if not trunk:
            self.start = None
            return []
        index = resolve_start(self.method, self.model, [n for n, _ in trunk], start,
                              max(len(trunk) - 2, 0), "trunk ReLUs")
        self.start = trunk[index][0]
        return trunk[index:]

    def _pool_temperature(self, pool: nn.MaxPool2d) -> float:
        if self.pool_temperature is not None:
            return self.pool_temperature
        return _RELEASE_POOL_TEMPERATURE.get(_window(pool), 1.0)

    def _changes(self, relus: list, pools: list) -> list[Change]:
        changes = [Change(n, f"max-pool backward: softmax over each window, "
                             f"T={self._pool_temperature(m):g}") for n, m in pools]
        return changes + [Change(n, f"ReLU backward: SiLU derivative, T={self.relu_temperature:g}")
                          for n, _ in relus]

    def _relu_attacher(self, relu: nn.Module) -> Attacher:
        temperature = self.relu_temperature
        return lambda: ForwardSwap(relu, lambda x: _SiLUGradReLU.apply(x, temperature))

    def _pool_attacher(self, pool: nn.MaxPool2d) -> Attacher:
        if pool.ceil_mode or pool.return_indices:
            raise InputError(f"bpa cannot soften the max-pool {pool} of {model_label(self.model)} "
                             "(ceil_mode / return_indices); pass a model without it")
        temperature = self._pool_temperature(pool)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 4:  # unbatched input: the plain pool
                return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation)
            return _SoftMaxPool2d.apply(x, pool, temperature)

        return lambda: ForwardSwap(pool, forward)

    def __repr__(self) -> str:
        return f"bpa({model_label(self.model)}, start={self.start!r}: {len(self.changes)} changed)"
