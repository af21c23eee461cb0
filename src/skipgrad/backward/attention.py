"""Shared plumbing of the attention-gradient methods (PNA, TGR): finding attention, reaching in.

*Finding.* Attention modules are matched by type (``isinstance`` through the MRO), never by name:
timm's ``Attention`` and its relatives, torchvision's swin attention and ``nn.MultiheadAttention``
(inside torchvision's ``EncoderBlock``). timm and torchvision classes are named by
``"module:Class"`` path and resolved only once their module is imported, as the block registry
does: skipgrad never imports timm just to look. A transformer block's MLP is a module of a known MLP
type that sits beside an attention module (same parent) -- structure, not attribute names.

*Reaching in.* Fused attention (``F.scaled_dot_product_attention``, timm's default) never builds
the attention map as a tensor, so hooks on ``attn_drop`` -- what other libraries use -- never fire.
Instead, while an attention module's ``forward`` runs, a :class:`torch.overrides.TorchFunctionMode`
sees its calls of ``scaled_dot_product_attention`` and ``softmax`` (the explicit path) and lets a
method replace them. The mode is entered by a wrapper that replaces the module's ``forward`` for
the lifetime of the context (:class:`~skipgrad.backward.base.ForwardSwap`), so it is popped even
when the forward raises. ``nn.MultiheadAttention`` is the exception: it makes its map inside
``F.multi_head_attention_forward``, a Python-level torch function whose body runs with the mode
popped, so each method treats it on its own (PNA through its inputs, TGR through
:func:`multihead_self_attention`).
"""
from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from skipgrad.backward.base import Attacher, ForwardSwap, Removable
from skipgrad.errors import InputError

# Attention modules whose map the methods reach through scaled_dot_product_attention or softmax.
ATTENTION_TYPES: tuple[type | str, ...] = (
    nn.MultiheadAttention,
    "timm.layers.attention:Attention",            # timm ViT / DeiT / (most) relatives
    "timm.layers.attention:AttentionRope",
    "timm.models.vision_transformer:Attention",   # older timm defined it here
    "timm.models.eva:EvaAttention",
    "timm.models.beit:Attention",
    "timm.models.swin_transformer:WindowAttention",
    "timm.models.cait:ClassAttn",
    "timm.models.cait:TalkingHeadAttn",
    "torchvision.models.swin_transformer:ShiftedWindowAttention",
)

# The feed-forward half of a transformer block (TGR regularizes its output gradient).
MLP_TYPES: tuple[type | str, ...] = (
    "timm.layers.mlp:Mlp",
    "timm.layers.mlp:GluMlp",
    "timm.layers.mlp:SwiGLU",
    "timm.layers.mlp:GatedMlp",
    "torchvision.ops.misc:MLP",                   # torchvision ViT's MLPBlock subclasses it
)

SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax)


def resolve_types(entries: Iterable[type | str]) -> tuple[type, ...]:
    """The classes among ``entries``; ``"module:Class"`` paths count only if already imported."""
    found = []
    for entry in entries:
        if isinstance(entry, type):
            found.append(entry)
            continue
        module_name, class_name = entry.split(":")
        if module_name in sys.modules:
            cls = getattr(importlib.import_module(module_name), class_name, None)
            if isinstance(cls, type):
                found.append(cls)
    return tuple(found)


def find_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every attention module in ``model`` (outermost only: one nested in another is covered)."""
    types = resolve_types(ATTENTION_TYPES)
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, types) and not any(_inside(name, outer) for outer, _ in found):
            found.append((name, module))
    return found


def find_block_mlps(model: nn.Module, attention: list[tuple[str, nn.Module]]
                    ) -> list[tuple[str, nn.Module]]:
    """The MLPs that share a parent with one of the ``attention`` modules (a transformer block)."""
    types = resolve_types(MLP_TYPES)
    parents = {name.rpartition(".")[0] for name, _ in attention}
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, types) and name and name.rpartition(".")[0] in parents]


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name.startswith(outer + ".")


_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                    "enable_gqa")


def bind_attention_call(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of an ``F.scaled_dot_product_attention`` call by name, defaults filled in
    (callers pass the first ones by position and the rest by keyword, or all by position)."""
    call: dict[str, Any] = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                enable_gqa=False)
    call.update(zip(_SDPA_PARAMETERS, args))
    call.update(kwargs)
    return call


def call_attention(call: dict[str, Any]) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on bound arguments (``enable_gqa`` only when set, for
    torch versions that predate it)."""
    call = dict(call)
    if not call["enable_gqa"]:
        del call["enable_gqa"]
    return F.scaled_dot_product_attention(**call)


class AttentionMode(TorchFunctionMode):
    """Sees the torch calls of one attention forward; subclasses override the two hooks below."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.attention(bind_attention_call(args, kwargs))
        if func in SOFTMAX_FUNCTIONS:
            return self.softmax(func, args, kwargs)
        return func(*args, **kwargs)

    def attention(self, call: dict[str, Any]) -> torch.Tensor:
        """A call of ``F.scaled_dot_product_attention`` (fused path), arguments by name."""
        return call_attention(call)

    def softmax(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        """A softmax call: in an attention forward, the one that makes the map (explicit path)."""
        return func(*args, **kwargs)


def run_inside(module: nn.Module, make_mode: Callable[[nn.Module], AttentionMode]) -> Attacher:
    """An attacher that runs ``module.forward`` inside ``make_mode(module)`` until removed."""

    def wrap(original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            with make_mode(module):
                return original(*args, **kwargs)

        return forward

    return swap_forward(module, wrap)


def swap_forward(module: nn.Module, wrap: Callable[[Callable], Callable]) -> Attacher:
    """An attacher that replaces ``module.forward`` by ``wrap(module.forward)`` until removed."""

    def attach() -> Removable:
        return ForwardSwap(module, functools.wraps(module.forward)(wrap(module.forward)))

    return attach


_MHA_PARAMETERS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                   "average_attn_weights", "is_causal")


def bind_multihead_call(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of an ``nn.MultiheadAttention`` call by name, defaults filled in."""
    call: dict[str, Any] = dict(key_padding_mask=None, need_weights=True, attn_mask=None,
                                average_attn_weights=True, is_causal=False)
    call.update(zip(_MHA_PARAMETERS, args))
    call.update(kwargs)
    return call


def multihead_self_attention(mha: nn.MultiheadAttention, call: dict[str, Any],
                             attend: Callable[..., torch.Tensor], method: str
                             ) -> tuple[torch.Tensor, None]:
    """``nn.MultiheadAttention`` self-attention written out around ``attend(q, k, v)``, each
    (batch, heads, tokens, features). Covers the configuration torchvision's ViT uses (packed
    projection, no masks, ``need_weights=False``); anything else is refused with the reason."""
    _check_plain_self_attention(mha, call, method)
    x = call["query"] if mha.batch_first else call["query"].transpose(0, 1)
    batch, tokens, width = x.shape
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.unflatten(-1, (3, mha.num_heads, width // mha.num_heads)).permute(2, 0, 3, 1, 4)
    out = attend(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
    out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
    return (out if mha.batch_first else out.transpose(0, 1)), None


def _check_plain_self_attention(mha: nn.MultiheadAttention, call: dict[str, Any],
                                method: str) -> None:
    q = call["query"]
    problems = [
        ("cross-attention", not (q is call["key"] and q is call["value"])),
        ("need_weights=True", call["need_weights"]),
        ("attention masks", call["attn_mask"] is not None or call["key_padding_mask"] is not None
         or call["is_causal"]),
        ("unbatched input", q.dim() != 3),
        ("separate q/k/v projections, bias_k/bias_v or add_zero_attn",
         not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn),
        ("attention dropout in training mode", mha.training and mha.dropout > 0),
    ]
    found = [name for name, present in problems if present]
    if found:
        raise InputError(f"{method} supports nn.MultiheadAttention as plain batched self-attention "
                         f"(as torchvision's ViT calls it); this call has {', '.join(found)}")


class AttributeSwap:
    """Sets ``module.name = value`` now; ``remove`` puts the old value back."""

    def __init__(self, module: nn.Module, name: str, value: Any) -> None:
        self._module, self._name = module, name
        self._old = getattr(module, name)
        setattr(module, name, value)

    def remove(self) -> None:
        setattr(self._module, self._name, self._old)
