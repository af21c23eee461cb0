"""pna: attention maps are constants in the backward pass (Wei et al., AAAI 2022)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import skipgrad
from skipgrad import pna, tgr
from skipgrad.backward.attention import find_attention
from tests.tiny_vits import (images_for, input_gradient, relative_difference, timm_vit,
                             torchvision_vit, zoo_vit)

BUILDERS = {"timm": timm_vit, "torchvision": torchvision_vit, "zoo": zoo_vit}


def _hand_timm_attention(module: nn.Module, x: torch.Tensor, constant_map: bool) -> torch.Tensor:
    """timm's Attention written out from its weights; the map detached when ``constant_map``."""
    batch, tokens, width = x.shape
    heads = module.num_heads
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    attention = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(dim=-1)
    if constant_map:
        attention = attention.detach()
    out = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
    return F.linear(out, module.proj.weight, module.proj.bias)


def _hand_mha(mha: nn.MultiheadAttention, x: torch.Tensor, constant_map: bool) -> torch.Tensor:
    """nn.MultiheadAttention (batch_first self-attention) written out from its weights."""
    batch, tokens, width = x.shape
    heads = mha.num_heads
    split = [t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)
             for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)]
    q, k, v = split
    attention = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(dim=-1)
    if constant_map:
        attention = attention.detach()
    out = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


class _SelfAttention(nn.Module):
    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=self.need_weights)[0]


def _grad_of(fn, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


def test_timm_fused_attention_gradient_equals_hand_written_constant_map():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    module = Attention(16, num_heads=2, qkv_bias=True).eval()
    assert module.fused_attn  # timm's default: the path where attn_drop hooks never fire
    x, w = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    plain_out, plain = _grad_of(module, x, w)
    with pna(module):
        out, grad = _grad_of(module, x, w)
    _, expected = _grad_of(lambda t: _hand_timm_attention(module, t, True), x, w)
    _, hand_plain = _grad_of(lambda t: _hand_timm_attention(module, t, False), x, w)
    assert torch.equal(out, plain_out)
    assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(plain, hand_plain, atol=1e-5, rtol=1e-4)
    assert relative_difference(grad, plain) > 0.05


def test_timm_explicit_attention_path_too():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    module = Attention(16, num_heads=2, qkv_bias=True).eval()
    module.fused_attn = False
    x, w = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    plain_out, _ = _grad_of(module, x, w)
    with pna(module):
        out, grad = _grad_of(module, x, w)
    _, expected = _grad_of(lambda t: _hand_timm_attention(module, t, True), x, w)
    assert torch.equal(out, plain_out)
    assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "explicit-softmax"])
def test_multihead_attention_gradient_equals_hand_written(need_weights):
    torch.manual_seed(0)
    model = _SelfAttention(need_weights).eval()
    x, w = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    plain_out, plain = _grad_of(model, x, w)
    with pna(model):
        out, grad = _grad_of(model, x, w)
    _, expected = _grad_of(lambda t: _hand_mha(model.mha, t, True), x, w)
    # Not bit for bit: with the query and key detached (one tensor, the value another) torch
    # projects q and k/v by separate matmuls instead of one packed one (docs/backward.md, PNA).
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-4)
    assert relative_difference(grad, plain) > 0.05


def test_a_map_that_does_not_depend_on_the_input_gives_the_plain_gradient():
    # Analytic case: with zero query/key weights and biases every map is uniform and constant,
    # so "no gradient through the map" changes nothing.
    torch.manual_seed(0)
    model = _SelfAttention(False).eval()
    with torch.no_grad():
        model.mha.in_proj_weight[:32].zero_()
        model.mha.in_proj_bias[:32].zero_()
    x, w = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    _, plain = _grad_of(model, x, w)
    with pna(model):
        _, grad = _grad_of(model, x, w)
    assert torch.allclose(grad, plain, atol=1e-6)


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("method", [pna, tgr], ids=["pna", "tgr"])
def test_every_vit_kind_forward_unchanged_gradient_changed(method, kind):
    # The attention methods on each ViT the issue names (the contract itself, on one timm ViT for
    # every method, is in test_backward_contract.py).
    model = BUILDERS[kind]()
    if kind == "timm":
        assert all(block.attn.fused_attn for block in model.blocks)
    images, labels = images_for(model)
    plain_logits, plain = input_gradient(model, images, labels)
    context = method(model)
    # depth 2: pna changes the attention of each block, tgr its attention and its MLP
    assert len(context.changes) == (2 if method is pna else 4)
    logits, grad = input_gradient(model, images, labels, context)
    if method is pna and kind != "torchvision":
        # pna only detaches the arguments of the model's own attention call: same kernel, same
        # values. Not on nn.MultiheadAttention (torchvision), whose q/k/v projections then run
        # as separate matmuls, nor tgr, whose attention call is its own autograd function.
        assert torch.equal(logits, plain_logits)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-6)
    assert relative_difference(grad, plain) > 1e-3
    assert torch.equal(input_gradient(model, images, labels)[1], plain)  # restored


def test_found_by_type_not_by_name():
    model = timm_vit()
    renamed = nn.Sequential()
    renamed.add_module("whatever", model)
    names = [name for name, _ in find_attention(renamed)]
    assert names == ["whatever.blocks.0.attn", "whatever.blocks.1.attn"]


def test_conflicts_with_tgr_on_the_same_model_in_either_order():
    model = timm_vit()
    for first, second in ((pna, tgr), (tgr, pna)):
        expected = (f"{second.method} and {first.method} would both redefine the backward pass "
                    "of blocks.0.attn")
        with first(model), pytest.raises(skipgrad.BackwardConflictError, match=expected):
            second(model).__enter__()


def test_attention_dropout_hooks_are_a_silent_no_op_under_fused_attention():
    # Why pna reaches into the attention call: other libraries hook attn_drop, which timm's fused
    # path never calls, so their hook changes nothing. pna changes the gradient on the same model.
    model = timm_vit()
    images, labels = images_for(model)
    calls = []
    handles = [block.attn.attn_drop.register_forward_hook(lambda *_: calls.append(1))
               for block in model.blocks]
    _, plain = input_gradient(model, images, labels)
    _, grad = input_gradient(model, images, labels, pna(model))
    for handle in handles:
        handle.remove()
    assert calls == []
    assert relative_difference(grad, plain) > 1e-3


def _timm_relative(name: str) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    if name == "swin":  # WindowAttention: fused call with a relative-position mask
        return SwinTransformer(img_size=16, patch_size=2, in_chans=1, window_size=4, embed_dim=16,
                               depths=(1, 1), num_heads=(2, 2), num_classes=10).eval()
    return VisionTransformerDistilled(img_size=16, patch_size=4, in_chans=1, num_classes=10,
                                      embed_dim=32, depth=2, num_heads=2).eval()


@pytest.mark.parametrize("relative", ["swin", "deit-distilled"])
@pytest.mark.parametrize("method", [pna, tgr], ids=["pna", "tgr"])
def test_timm_relatives_found_by_type_forward_unchanged(relative, method):
    model = _timm_relative(relative)
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2])
    logits, plain = input_gradient(model, images, labels)
    context = method(model)
    assert len(context.changes) == (2 if method is pna else 4)
    method_logits, grad = input_gradient(model, images, labels, context)
    if method is pna:  # the model's own attention call with q/k detached: bit for bit
        assert torch.equal(method_logits, logits)
    else:  # tgr switches timm's swin (fused_attn off by default) to the fused kernel: 1e-8 apart
        torch.testing.assert_close(method_logits, logits, rtol=0, atol=1e-6)
    assert relative_difference(grad, plain) > 1e-5


def test_torchvision_swin_explicit_softmax_path_and_tgr_refusal():
    # torchvision's shifted-window attention makes its map with an explicit softmax (with a
    # shift mask): pna detaches it; tgr cannot reach its Q/K/V and says so when built.
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[2],
                            window_size=[4, 4], num_classes=10).eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2])
    logits, plain = input_gradient(model, images, labels)
    pna_logits, grad = input_gradient(model, images, labels, pna(model))
    assert torch.equal(pna_logits, logits)
    assert relative_difference(grad, plain) > 1e-6
    with pytest.raises(ValueError, match=r"^tgr cannot regularize features.1.0.attn "
                                         r"\(ShiftedWindowAttention\): its attention map is not "
                                         r"computed by scaled_dot_product_attention$"):
        tgr(model)
