"""``tgr``: Token Gradient Regularization, with the extreme tokens chosen per image.

Zhang et al., "Transferable Adversarial Attacks on Vision Transformers with Token Gradient
Regularization", CVPR 2023 (arXiv:2303.15754). In every transformer block the backward pass scales
three gradients and zeroes, per channel, the tokens whose gradient is most extreme (the largest and
the smallest, ``top_k`` of each), because those few tokens carry a high-variance, model-specific
signal:

* attention: the gradient at the attention scores (the softmax input), ``x attention_scale``; for
  every head, the ``top_k`` largest and smallest entries of the N x N gradient are found and their
  whole row and column are zeroed;
* Q/K/V: the gradient of the query, key and value projections, ``x qkv_scale``; for every channel
  (head and feature) the ``top_k`` largest and smallest tokens are zeroed;
* MLP: the gradient of the block's MLP output, ``x mlp_scale``, extreme tokens zeroed per channel.

Defaults (0.25, 0.75, 0.5, top-1) are the authors' release (jpzhang1810/TGR, ``methods.py``).
Where skipgrad deviates, and why (docs/backward.md has the details):

* the extreme tokens are chosen for *each image*; the release picks them from the first image of
  the batch and zeroes the same tokens in every image (at batch size 1, the two agree);
* the release hooks ``attn_drop``; in eval mode dropout returns its input, so the hook lands on the
  softmax's backward node and edits the gradient of the *scores* -- which is what is done here;
* with fused attention (timm's default) there is no map to hook: the attention call keeps its fused
  forward (values unchanged) and its backward recomputes the attention explicitly with the
  regularization in place. timm attention modules with ``fused_attn`` switched off are switched
  on for the duration (their forward then equals the explicit one within float tolerance);
* Q/K/V gradients are regularized at the inputs of the attention call, where the release edits the
  output of the ``qkv`` projection: the same tensor up to a reshape, unless a q/k norm sits between
  (not in ViT/DeiT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from skipgrad.backward.attention import (AttentionMode, AttributeSwap, bind_multihead_call,
                                         call_attention, find_block_mlps,
                                         multihead_self_attention, run_inside, swap_forward)
from skipgrad.backward.base import (Attacher, BackwardContext, Change, HandleGroup, Removable,
                                    model_label)
from skipgrad.backward.pay_no_attention import require_attention
from skipgrad.errors import InputError

GradientTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TGRSettings:
    """The scales of the three regularized gradients and how many extreme tokens are zeroed."""

    attention_scale: float = 0.25
    qkv_scale: float = 0.75
    mlp_scale: float = 0.5
    top_k: int = 1

    def __post_init__(self) -> None:
        for name in ("attention_scale", "qkv_scale", "mlp_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise InputError(f"tgr {name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"tgr top_k must be an integer >= 0, got {self.top_k!r}")


def extreme_indices(values: torch.Tensor, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` largest and the ``k`` smallest entries along ``dim``; ties go to the
    first index, as ``argmax``/``argmin`` (and numpy's, used by the release) break them."""
    if k == 1:  # the release's case; argmax/argmin are documented to return the first index
        return values.argmax(dim, keepdim=True), values.argmin(dim, keepdim=True)
    k = min(k, values.shape[dim])
    largest = values.sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    smallest = values.sort(dim=dim, stable=True).indices.narrow(dim, 0, k)
    return largest, smallest


def regularize_tokens(grad: torch.Tensor, scale: float, top_k: int, dim: int) -> torch.Tensor:
    """``grad * scale`` with, for every image (dim 0) and channel, the ``top_k`` largest and
    smallest tokens along ``dim`` set to zero (none at ``top_k=0``)."""
    out = grad * scale
    if top_k == 0:
        return out
    for indices in extreme_indices(grad, dim, top_k):
        out.scatter_(dim, indices, 0.0)
    return out


def regularize_scores(grad: torch.Tensor, scale: float, top_k: int) -> torch.Tensor:
    """``grad * scale`` for attention scores (..., N, M): for every image and head, the row and
    the column of each of the ``top_k`` largest and smallest entries are zeroed (none at 0)."""
    if top_k == 0:
        return grad * scale
    columns = grad.shape[-1]
    keep_rows = grad.new_ones(grad.shape[:-1])
    keep_columns = grad.new_ones(grad.shape[:-2] + (columns,))
    for flat in extreme_indices(grad.flatten(-2), -1, top_k):
        keep_rows.scatter_(-1, flat // columns, 0.0)
        keep_columns.scatter_(-1, flat % columns, 0.0)
    return grad * scale * keep_rows.unsqueeze(-1) * keep_columns.unsqueeze(-2)


class _TransformGradient(torch.autograd.Function):
    """Identity forward (a copy); the gradient passes through ``transform``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, transform: GradientTransform) -> torch.Tensor:
        ctx.transform = transform
        return x.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.transform(grad), None


def explicit_attention(call: dict[str, Any], on_scores: GradientTransform) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` written out, with ``on_scores`` applied to the scores
    (the softmax input); the arguments are those of ``F.scaled_dot_product_attention``."""
    q, k, v, mask = call["query"], call["key"], call["value"], call["attn_mask"]
    if call["enable_gqa"]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = call["scale"] if call["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if call["is_causal"]:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    return on_scores(scores).softmax(dim=-1) @ v


class _RegularizedAttention(torch.autograd.Function):
    """Fused attention forward; backward recomputed explicitly with TGR's score and Q/K/V edits."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None, call: dict[str, Any],
                settings: TGRSettings) -> torch.Tensor:
        ctx.call, ctx.settings = call, settings
        ctx.save_for_backward(query, key, value, attn_mask)
        return call_attention(dict(call, query=query, key=key, value=value, attn_mask=attn_mask))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        s = ctx.settings
        tensors = [t.detach().requires_grad_(need) if t is not None else None
                   for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        wanted = [t for t in tensors if t is not None and t.requires_grad]
        with torch.enable_grad():
            on_scores = _scores_transform(s)
            out = explicit_attention(dict(ctx.call, query=tensors[0], key=tensors[1],
                                          value=tensors[2], attn_mask=tensors[3]), on_scores)
            found = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        grads = [next(found) if t is not None and t.requires_grad else None for t in tensors]
        for i in range(3):  # query, key, value: token axis -2 of (batch, heads, tokens, features)
            if grads[i] is not None:
                grads[i] = regularize_tokens(grads[i], s.qkv_scale, s.top_k, dim=-2)
        return (*grads, None, None)


def _scores_transform(s: TGRSettings) -> GradientTransform:
    def transform(grad: torch.Tensor) -> torch.Tensor:
        return regularize_scores(grad, s.attention_scale, s.top_k)

    return lambda scores: _TransformGradient.apply(scores, transform)


def regularized_attention(call: dict[str, Any], settings: TGRSettings) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on bound arguments, with TGR in its backward pass."""
    call = dict(call)
    tensors = [call.pop(name) for name in ("query", "key", "value", "attn_mask")]
    return _RegularizedAttention.apply(*tensors, call, settings)


_NO_OPTIONS = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)


class _TokenRegularizedAttention(AttentionMode):
    """Within one attention forward: each attention call goes through _RegularizedAttention."""

    def __init__(self, module: nn.Module, settings: TGRSettings) -> None:
        super().__init__()
        self.module, self.settings = module, settings

    def attention(self, call: dict[str, Any]) -> torch.Tensor:
        if call["dropout_p"] > 0:
            raise InputError("tgr needs attention dropout off: put the model in eval mode")
        if call["query"].dim() != 4:
            raise InputError("tgr expects attention inputs shaped (batch, heads, tokens, "
                             f"features), got {tuple(call['query'].shape)}")
        return regularized_attention(call, self.settings)

    def softmax(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        raise InputError(
            f"tgr cannot regularize {type(self.module).__name__}: it computed its attention map "
            "with an explicit softmax, not scaled_dot_product_attention")


class tgr(BackwardContext):  # noqa: N801 - a context manager named like torch.no_grad
    """Token Gradient Regularization (TGR) on every transformer block of ``model``, per image.

    Use as a context around the forward *and* backward pass::

        with skipgrad.tgr(vit):
            loss = F.cross_entropy(vit(x), y)
            loss.backward()

    Args:
        model: any module containing attention modules (timm ViT/DeiT and relatives with fused
            attention on or off, torchvision ViT, the zoo's ViT).
        attention_scale: factor on the attention-score gradient (release: 0.25).
        qkv_scale: factor on the query/key/value gradient (release: 0.75).
        mlp_scale: factor on the gradient of each block's MLP output (release: 0.5).
        top_k: how many largest and how many smallest tokens are zeroed per channel (release: 1);
            0 zeroes none and leaves the three scales alone (an ablation).

    Raises:
        ValueError: a scale < 0 or not finite, ``top_k`` < 0, or an attention module TGR cannot
            reach (its map is not computed by ``scaled_dot_product_attention``).
        NoAttentionError: the model holds no attention module (a ``ValueError``).

    Forward values are unchanged (within float tolerance where fused attention had to be switched
    on; see the module docstring). Everything is restored on exit, also when the body raises; the
    context may be entered again. TGR claims the attention modules and the MLPs, so it conflicts
    with :func:`skipgrad.pna` on the same model; it composes with :func:`skipgrad.skip_gradient`.
    """

    method = "tgr"

    def __init__(self, model: nn.Module, *, attention_scale: float = 0.25,
                 qkv_scale: float = 0.75, mlp_scale: float = 0.5, top_k: int = 1) -> None:
        super().__init__(model)
        self.settings = TGRSettings(attention_scale, qkv_scale, mlp_scale, top_k)
        attention = require_attention(model, self.method)
        for name, module in attention:
            _check_reachable(name, module)
        mlps = find_block_mlps(model, attention)
        attachers = [self._attach_attention(m) for _, m in attention]
        attachers += [self._attach_mlp(m) for _, m in mlps]
        self._set_plan(attachers, self._changes(attention, mlps), attention + mlps)

    def _attach_attention(self, module: nn.Module) -> Attacher:
        if isinstance(module, nn.MultiheadAttention):
            return self._attach_multihead(module)
        swap = run_inside(module, lambda m: _TokenRegularizedAttention(m, self.settings))

        def attach() -> Removable:
            # timm's explicit path builds the map with matmuls TGR cannot see: use the fused call.
            fused = hasattr(module, "fused_attn")
            switch = [AttributeSwap(module, "fused_attn", True)] if fused else []
            return HandleGroup([*switch, swap()])

        return attach

    def _attach_multihead(self, module: nn.MultiheadAttention) -> Attacher:
        # Its map is made inside F.multi_head_attention_forward, out of a mode's sight: the
        # forward is written out instead (identical values for the self-attention ViTs use).
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            call = dict(_NO_OPTIONS, query=q, key=k, value=v)
            return regularized_attention(call, self.settings)

        def wrap(_original: Any) -> Any:
            return lambda *args, **kwargs: multihead_self_attention(
                module, bind_multihead_call(args, kwargs), attend, self.method)

        return swap_forward(module, wrap)

    def _attach_mlp(self, module: nn.Module) -> Attacher:
        s = self.settings

        def transform(grad: torch.Tensor) -> torch.Tensor:
            return regularize_tokens(grad, s.mlp_scale, s.top_k, dim=1)

        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            if output.dim() != 3:
                raise InputError("tgr expects MLP outputs shaped (batch, tokens, channels), "
                                 f"got {tuple(output.shape)}")
            return _TransformGradient.apply(output, transform)

        return lambda: module.register_forward_hook(hook)

    def _changes(self, attention: list, mlps: list) -> list[Change]:
        s = self.settings
        per_image = (f"top-{s.top_k} extreme tokens zeroed per image" if s.top_k
                     else "no tokens zeroed")
        return ([Change(name, f"attention-score gradient x {s.attention_scale:g}, Q/K/V gradient "
                              f"x {s.qkv_scale:g}, {per_image}") for name, _ in attention]
                + [Change(name, f"MLP output gradient x {s.mlp_scale:g}, {per_image}")
                   for name, _ in mlps])

    def __repr__(self) -> str:
        s = self.settings
        return (f"tgr({model_label(self.model)}, attention_scale={s.attention_scale}, "
                f"qkv_scale={s.qkv_scale}, mlp_scale={s.mlp_scale}, top_k={s.top_k}: "
                f"{len(self.changes)} modules)")


def _check_reachable(name: str, module: nn.Module) -> None:
    # TGR edits gradients inside the attention call; modules without a fused path never make one.
    if not (isinstance(module, nn.MultiheadAttention) or hasattr(module, "fused_attn")):
        raise InputError(f"tgr cannot regularize {name} ({type(module).__name__}): its attention "
                         "map is not computed by scaled_dot_product_attention")
