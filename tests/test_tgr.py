"""tgr: Token Gradient Regularization (Zhang et al., CVPR 2023), extreme tokens chosen per image.

The reference below is written independently of skipgrad: a ViT forward spelled out by hand with
an explicit attention map, and TGR's edits placed where the authors' release places them (the
``qkv`` projection output, the softmax input, the MLP output) as tensor hooks that pick the extreme
tokens with numpy loops -- per image, or from the first image only as the release does.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import skipgrad
from skipgrad import pna, tgr
from skipgrad.backward.token_gradient_regularization import regularize_scores, regularize_tokens
from tests.tiny_vits import (images_for, input_gradient, relative_difference, timm_vit,
                             torchvision_vit, zoo_vit)


# ----------------------------------------------------------------- the independent reference

def _edit_tokens(grad: torch.Tensor, scale: float, first_only: bool) -> torch.Tensor:
    """(B, N, C): scale; zero, per channel, the arg-max and arg-min token (numpy's tie-break)."""
    source = grad.detach().numpy()
    out = grad.clone() * scale
    for b in range(grad.shape[0]):
        chosen = source[0 if first_only else b]
        for c in range(grad.shape[2]):
            out[b, int(np.argmax(chosen[:, c])), c] = 0.0
            out[b, int(np.argmin(chosen[:, c])), c] = 0.0
    return out


def _edit_scores(grad: torch.Tensor, scale: float, first_only: bool) -> torch.Tensor:
    """(B, H, N, N): scale; per head, zero the row and column of the arg-max and arg-min entry."""
    source = grad.detach().numpy()
    out = grad.clone() * scale
    n = grad.shape[-1]
    for b in range(grad.shape[0]):
        for h in range(grad.shape[1]):
            chosen = source[0 if first_only else b, h]
            for flat in (np.argmax(chosen), np.argmin(chosen)):
                row, column = divmod(int(flat), n)
                out[b, h, row, :] = 0.0
                out[b, h, :, column] = 0.0
    return out


def _edit(tensor: torch.Tensor, edit, scale: float, edits: str) -> torch.Tensor:
    """Hooks ``tensor``'s gradient: ``edits`` is "" (none), "scale-only", "per-image" or "first"."""
    if edits == "scale-only":
        tensor.register_hook(lambda g: g * scale)
    elif edits:
        tensor.register_hook(lambda g: edit(g, scale, edits == "first"))
    return tensor


def _hand_block(x, norm1, qkv_weight, qkv_bias, heads, proj, norm2, mlp, edits):
    h = norm1(x)
    batch, tokens, width = h.shape
    qkv = _edit(F.linear(h, qkv_weight, qkv_bias), _edit_tokens, 0.75, edits)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    scores = _edit(q @ k.transpose(-2, -1) * (width // heads) ** -0.5, _edit_scores, 0.25, edits)
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + proj(out)
    return x + _edit(mlp(norm2(x)), _edit_tokens, 0.5, edits)


def _hand_timm(model: nn.Module, images: torch.Tensor, edits: str) -> torch.Tensor:
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    for blk in model.blocks:
        a = blk.attn
        x = _hand_block(x, blk.norm1, a.qkv.weight, a.qkv.bias, a.num_heads, a.proj, blk.norm2,
                        blk.mlp, edits)
    return model.head(model.norm(x)[:, 0])


def _hand_torchvision(model: nn.Module, images: torch.Tensor, edits: str) -> torch.Tensor:
    x = model._process_input(images)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + model.encoder.pos_embedding
    for layer in model.encoder.layers:
        a = layer.self_attention
        x = _hand_block(x, layer.ln_1, a.in_proj_weight, a.in_proj_bias, a.num_heads, a.out_proj,
                        layer.ln_2, layer.mlp, edits)
    return model.heads(model.encoder.ln(x)[:, 0])


HAND = {"timm": (timm_vit, _hand_timm), "torchvision": (torchvision_vit, _hand_torchvision)}


def _hand_gradient(forward, model, images, labels, edits: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.clone().requires_grad_(True)
    logits = forward(model, x, edits)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), x)
    return logits.detach(), grad


# ----------------------------------------------------------------- gradients

@pytest.mark.parametrize("kind", list(HAND))
def test_gradient_equals_hand_written_reference_per_image(kind):
    build, forward = HAND[kind]
    model = build()
    if kind == "timm":
        assert all(block.attn.fused_attn for block in model.blocks)
    images, labels = images_for(model)
    logits, plain = input_gradient(model, images, labels)
    hand_logits, hand_plain = _hand_gradient(forward, model, images, labels, "")
    assert torch.allclose(hand_logits, logits, atol=1e-5)  # the reference is the same network
    assert torch.allclose(hand_plain, plain, atol=1e-5, rtol=1e-4)
    tgr_logits, grad = input_gradient(model, images, labels, tgr(model))
    _, expected = _hand_gradient(forward, model, images, labels, "per-image")
    assert torch.allclose(tgr_logits, logits, atol=1e-6)
    assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-4)
    assert relative_difference(grad, plain) > 0.1


def test_top_k_zero_only_scales_the_three_gradients():
    # The scales alone, no token zeroed: the ablation docs/backward.md reports on the zoo ViT.
    model = timm_vit()
    images, labels = images_for(model)
    _, grad = input_gradient(model, images, labels, tgr(model, top_k=0))
    _, expected = _hand_gradient(_hand_timm, model, images, labels, "scale-only")
    _, zeroed = _hand_gradient(_hand_timm, model, images, labels, "per-image")
    assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-4)
    assert relative_difference(grad, zeroed) > 0.1


def test_batch_of_four_equals_four_batches_of_one():
    model = timm_vit()
    images, labels = images_for(model)
    _, batched = input_gradient(model, images, labels, tgr(model))
    singles = torch.cat([input_gradient(model, images[i:i + 1], labels[i:i + 1], tgr(model))[1]
                         for i in range(4)])
    assert torch.allclose(batched, singles, atol=1e-6, rtol=1e-4)
    # The release's choice (tokens of the first image, zeroed in all) couples the images:
    _, first_image = _hand_gradient(_hand_timm, model, images, labels, "first")
    assert torch.allclose(first_image[0], batched[0], atol=1e-6, rtol=1e-4)
    assert all(relative_difference(first_image[i], batched[i]) > 1e-3 for i in range(1, 4))


def test_token_edit_against_loops_with_ties_and_top_k():
    grad = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [3.0, 0.0], [-2.0, 0.0], [0.5, 0.0]]])
    out = regularize_tokens(grad, 0.5, top_k=1, dim=1)
    # channel 0: first of the tied maxima (token 1) and the minimum (token 3) go;
    # channel 1 is all ties: token 0 is both the arg-max and the arg-min.
    expected = torch.tensor([[[0.5, 0.0], [0.0, 0.0], [1.5, 0.0], [0.0, 0.0], [0.25, 0.0]]])
    assert torch.equal(out, expected)
    assert torch.equal(out, _edit_tokens(grad, 0.5, first_only=False))
    two = regularize_tokens(grad, 1.0, top_k=2, dim=1)
    # the two largest (3, 3: tokens 1, 2) and the two smallest (-2, 0.5: tokens 3, 4) go
    assert two[0, :, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_score_edit_against_loops():
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(3, 2, 5, 5, generator=gen)
    assert torch.equal(regularize_scores(grad, 0.25, top_k=1),
                       _edit_scores(grad, 0.25, first_only=False))
    out = regularize_scores(grad, 1.0, top_k=2)
    zero_rows = (out == 0).all(dim=-1).sum(dim=-1)
    assert (zero_rows >= 2).all() and (zero_rows <= 4).all()


# ----------------------------------------------------------------- the context contract

def test_explicit_timm_attention_is_switched_to_fused_and_back():
    model = zoo_vit()
    images, labels = images_for(model)
    fused_logits, fused_grad = input_gradient(model, images, labels, tgr(model))
    for block in model.vit.blocks:
        block.attn.fused_attn = False
    logits, grad = input_gradient(model, images, labels, tgr(model))
    assert all(block.attn.fused_attn is False for block in model.vit.blocks)
    assert torch.allclose(logits, fused_logits, atol=1e-5)  # float tolerance: fused vs explicit
    assert torch.allclose(grad, fused_grad, atol=1e-6, rtol=1e-3)


def test_bad_settings_are_refused_in_one_line():
    # The refusal of a model without attention is in test_backward_contract.py.
    model = timm_vit()
    with pytest.raises(ValueError, match="^tgr top_k must be an integer >= 0, got -1$"):
        tgr(model, top_k=-1)
    with pytest.raises(ValueError, match="^tgr mlp_scale must be a finite number >= 0, got -1$"):
        tgr(model, mlp_scale=-1)


def test_multihead_attention_outside_plain_self_attention_is_refused():
    model = torchvision_vit()
    images, _ = images_for(model)
    mha = model.encoder.layers[0].self_attention
    x = torch.randn(2, 5, 32)
    with tgr(model), pytest.raises(ValueError, match="^tgr supports nn.MultiheadAttention as "
                                                      "plain batched self-attention .*; this call "
                                                      "has need_weights=True$"):
        mha(x, x, x)


def test_settings_reach_the_gradient():
    model = timm_vit()
    images, labels = images_for(model)
    _, default = input_gradient(model, images, labels, tgr(model))
    _, other = input_gradient(model, images, labels, tgr(model, top_k=3, mlp_scale=1.0))
    assert relative_difference(default, other) > 1e-3


def _release_mechanics(model: nn.Module) -> list:
    """The release's hook mechanics on a timm ViT (explicit attention, as timm had then): old-style
    module backward hooks on ``attn_drop``, ``qkv`` and ``mlp`` that edit ``grad_input[0]``."""

    def tokens(scale: float):
        def hook(_module, grad_in, _grad_out):
            grad = grad_in[0]
            flat = grad.dim() == 2  # a 3-D Linear ends in a view: (tokens, channels) at batch 1
            out = _edit_tokens(grad.unsqueeze(0) if flat else grad, scale, first_only=True)
            return (out.squeeze(0) if flat else out, *grad_in[1:])
        return hook

    def scores(_module, grad_in, _grad_out):
        return (_edit_scores(grad_in[0], 0.25, first_only=True),)

    handles = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles += [blk.attn.attn_drop.register_backward_hook(scores),
                    blk.attn.qkv.register_backward_hook(tokens(0.75)),
                    blk.mlp.register_backward_hook(tokens(0.5))]
    return handles


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_equals_the_release_hook_mechanics_at_batch_size_one():
    # In eval mode dropout returns its input, so the hook "on attn_drop" edits the gradient of the
    # softmax input: the scores. tgr on the fused model gives the same input gradient.
    model = timm_vit()
    images, labels = images_for(model, n=2)
    ours = [input_gradient(model, images[i:i + 1], labels[i:i + 1], tgr(model))[1]
            for i in range(2)]
    handles = _release_mechanics(model)
    release = [input_gradient(model, images[i:i + 1], labels[i:i + 1])[1] for i in range(2)]
    for handle in handles:
        handle.remove()
    plain = input_gradient(model, images[:1], labels[:1])[1]
    assert relative_difference(release[0], plain) > 0.1  # the release's hooks did fire
    for mine, theirs in zip(ours, release):
        assert torch.allclose(mine, theirs, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", [pna, tgr], ids=["pna", "tgr"])
def test_torch_compiled_with_the_context_attached_equals_eager(method):
    # attack --compile enters the contexts once, then compiles (skipgrad.attacks.compiled): the
    # mode inside the attention forward and TGR's autograd functions must survive tracing.
    model = timm_vit()
    images, labels = images_for(model)
    _, eager = input_gradient(model, images, labels, method(model))
    with method(model):
        _, compiled = input_gradient(torch.compile(model, backend="aot_eager"), images, labels)
    torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-7)
    assert relative_difference(compiled, input_gradient(model, images, labels)[1]) > 1e-4
