"""``pna``: Pay No Attention -- every self-attention map is a constant in the backward pass.

Wei et al., "Towards Transferable Adversarial Attacks on Vision Transformers", AAAI 2022
(arXiv:2109.04176), the PNA part (PatchOut, the paper's other half, is an input transform). For
``out = softmax(q k^T / sqrt(d)) v`` the backward pass treats the map as fixed: the gradient reaches
the input through the values only; queries and keys get none through attention.

Both attention paths are covered exactly (forward values unchanged bit for bit):

* fused (``F.scaled_dot_product_attention``, timm's default, and nn.MultiheadAttention with
  ``need_weights=False`` as in torchvision's ViT): the call receives ``q`` and ``k`` (and a mask)
  detached, so the fused kernel's gradient is ``A^T g`` for the values and nothing else;
* explicit (``softmax`` inside the attention forward): the map is returned detached;
* ``nn.MultiheadAttention`` computes its map inside ``F.multi_head_attention_forward``, out of
  reach of the calls above: it receives detached queries and keys instead (the values keep their
  gradient), so torch's own code computes the same output with a constant map.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from skipgrad.backward.attention import AttentionMode, find_attention, run_inside
from skipgrad.backward.base import (Attacher, BackwardContext, Change, NothingToChangeError,
                                    model_label)


class NoAttentionError(NothingToChangeError):
    """The model holds no attention module that the attention-gradient methods know."""


def require_attention(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    """The model's attention modules, or a one-line :class:`NoAttentionError`."""
    found = find_attention(model)
    if not found:
        raise NoAttentionError(
            f"{method} found no self-attention module in {model_label(model)}; it applies to "
            "vision transformers (timm Attention, nn.MultiheadAttention)")
    return found


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


class _ConstantMap(AttentionMode):
    """Within one attention forward: the map (and everything it is made of) carries no gradient."""

    def attention(self, call: dict[str, Any]) -> torch.Tensor:
        # Queries, keys and the mask make the map; only the values keep their gradient.
        for name in ("query", "key", "attn_mask"):
            call[name] = _detached(call[name])
        return super().attention(call)

    def softmax(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        return func(*args, **kwargs).detach()


def _detach_query_and_key(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    slots = [(args, i) for i in (0, 1) if i < len(args)]
    slots += [(kwargs, name) for name in ("query", "key") if name in kwargs]
    detached: dict[int, torch.Tensor] = {}  # self-attention passes one tensor: keep it one
    for holder, slot in slots:
        value = holder[slot]
        holder[slot] = detached.setdefault(id(value), _detached(value))
    return tuple(args), kwargs


def constant_map(module: nn.Module) -> Attacher:
    """An attacher that makes ``module``'s attention map a constant in the backward pass."""
    if isinstance(module, nn.MultiheadAttention):
        return lambda: module.register_forward_pre_hook(_detach_query_and_key, with_kwargs=True)
    return run_inside(module, lambda _m: _ConstantMap())


class pna(BackwardContext):  # noqa: N801 - a context manager named like torch.no_grad
    """Make every self-attention map of ``model`` a constant in the backward pass (PNA).

    Use as a context around the forward *and* backward pass::

        with skipgrad.pna(vit):
            loss = F.cross_entropy(vit(x), y)
            loss.backward()           # gradient through the attention values only

    Attention modules are found by type (timm ``Attention`` and relatives, torchvision's swin
    attention, ``nn.MultiheadAttention``) at any depth, with fused attention on or off. Forward
    values are identical with and without the context (bit for bit, except in
    ``nn.MultiheadAttention``, which projects a detached query and key by a separate matmul:
    within float tolerance); everything is restored on exit, also when
    the body raises; the context may be entered again after it exits. PNA claims the attention
    modules, so combining it with :func:`skipgrad.tgr` on one model raises
    :class:`BackwardConflictError`; it composes with :func:`skipgrad.skip_gradient`.

    Raises:
        NoAttentionError: the model holds no attention module (a ``ValueError``).
    """

    method = "pna"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        found = require_attention(model, self.method)
        changes = [Change(name, "attention map constant in backward (gradient via values only)")
                   for name, _ in found]
        self._set_plan([constant_map(module) for _, module in found], changes, found)

    def __repr__(self) -> str:
        return f"pna({model_label(self.model)}: {len(self.changes)} attention modules)"
