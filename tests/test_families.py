"""SGM on every registered timm/torchvision family: placement, forward, gradients, and the algebra.

Models are built without pretrained weights (pretrained=False), 10 classes, small inputs.
"""
from __future__ import annotations

from typing import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import skipgrad
from skipgrad import skip_gradient
from tests.conftest import randomise_batchnorm

SGM_GAMMA = 0.2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On two cores shared with other jobs, two OpenMP threads wait on each other: ~50x slower here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wake(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode, random BatchNorm statistics, and no zero-initialised branch.

    timm zero-initialises the last norm/conv of many residual branches and ConvNeXt starts its layer
    scale at 1e-6: with such weights a branch contributes nothing and SGM could not be observed.
    """
    randomise_batchnorm(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().max() < 1e-3:
                param.copy_(0.5 + 0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def outputs_and_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the input gradient of a fixed random linear functional of them."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


# ---- The families ----------------------------------------------------------------------------

def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(num_classes=10, **kwargs)


def _resnetv2_post_activation() -> nn.Module:
    # No registered timm model uses ResNetV2's post-activation Bottleneck; build one from the class.
    from timm.models.resnetv2 import ResNetV2
    return ResNetV2(layers=(2, 2), channels=(128, 256), preact=False, num_classes=10)


def _timm_vit_with(block: str) -> Callable[[], nn.Module]:
    """A small timm ViT built from one of its alternative block classes."""

    def build() -> nn.Module:
        from timm.models import vision_transformer as vt
        return vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                    num_classes=10, block_fn=getattr(vt, block))

    return build


def _stages(fmt: str, n: int = 4, start: int = 1) -> set[str]:
    return {fmt.format(i) for i in range(start, start + n)}


RESNET_FIRSTS = _stages("layer{}.0")
# (id, factory, input size, blocks found, blocks left undecayed, block kinds)
FAMILIES = [
    ("timm-seresnet18", _timm("seresnet18"), 32, 8, RESNET_FIRSTS, {"timm.BasicBlock"}),
    ("timm-legacy_seresnet18", _timm("legacy_seresnet18"), 32, 8, RESNET_FIRSTS,
     {"timm.senet.SEResNetBlock"}),
    ("timm-legacy_senet154", _timm("legacy_senet154"), 32, 50, RESNET_FIRSTS,
     {"timm.senet.Bottleneck"}),
    ("timm-resnet18d", _timm("resnet18d"), 32, 8, RESNET_FIRSTS, {"timm.BasicBlock"}),
    ("timm-resnetv2_18", _timm("resnetv2_18"), 32, 8, _stages("stages.{}.blocks.0", start=0),
     {"timm.resnetv2.PreActBasic"}),
    ("timm-resnetv2_50", _timm("resnetv2_50"), 32, 16, _stages("stages.{}.blocks.0", start=0),
     {"timm.resnetv2.PreActBottleneck"}),
    ("timm-resnetv2-post-act", _resnetv2_post_activation, 32, 4,
     _stages("stages.{}.blocks.0", 2, 0), {"timm.resnetv2.Bottleneck"}),
    ("timm-inception_resnet_v2", _timm("inception_resnet_v2"), 75, 40, set(),
     {f"timm.inception_resnet_v2.{k}" for k in ("Block35", "Block17", "Block8")}),
    ("timm-mobilenetv2_050", _timm("mobilenetv2_050"), 32, 10, set(),
     {"timm.efficientnet_blocks.InvertedResidual"}),
    ("timm-mobilenetv3_small_050", _timm("mobilenetv3_small_050"), 32, 7, set(),
     {"timm.efficientnet_blocks.InvertedResidual"}),
    ("timm-mobilenetv3_large_075", _timm("mobilenetv3_large_075"), 32, 10, set(),
     {"timm.efficientnet_blocks.DepthwiseSeparableConv",
      "timm.efficientnet_blocks.InvertedResidual"}),
    ("timm-efficientnet_b0", _timm("efficientnet_b0"), 32, 9, set(),
     {"timm.efficientnet_blocks.InvertedResidual"}),
    ("timm-tf_efficientnetv2_b0", _timm("tf_efficientnetv2_b0"), 32, 15, set(),
     {"timm.efficientnet_blocks.EdgeResidual", "timm.efficientnet_blocks.InvertedResidual"}),
    ("timm-mobilenetv4_conv_small", _timm("mobilenetv4_conv_small"), 32, 10, set(),
     {"timm.efficientnet_blocks.UniversalInvertedResidual"}),
    ("timm-regnetx_002", _timm("regnetx_002"), 32, 13, _stages("s{}.b1"),
     {"timm.regnet.Bottleneck"}),
    ("timm-convnext_atto", _timm("convnext_atto"), 32, 12, set(), {"timm.convnext.ConvNeXtBlock"}),
    ("timm-vit_tiny", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8), 32, 12, set(),
     {"timm.vision_transformer.Block"}),
    ("timm-deit_tiny", _timm("deit_tiny_patch16_224", img_size=32, patch_size=8), 32, 12, set(),
     {"timm.vision_transformer.Block"}),
    ("timm-swin_tiny", _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2), 64, 12,
     set(), {"timm.swin_transformer.SwinTransformerBlock"}),
    ("timm-mixer_s32", _timm("mixer_s32_224", img_size=64), 64, 8, set(),
     {"timm.mlp_mixer.MixerBlock"}),
    ("timm-resmlp_12", _timm("resmlp_12_224", img_size=64), 64, 12, set(),
     {"timm.mlp_mixer.ResBlock"}),
    ("timm-gmlp_ti16", _timm("gmlp_ti16_224", img_size=64), 64, 30, set(),
     {"timm.mlp_mixer.SpatialGatingBlock"}),
    *[(f"timm-vit-{block}", _timm_vit_with(block), 32, 3, set(),
       {f"timm.vision_transformer.{block}"})
      for block in ("ResPostBlock", "ParallelScalingBlock", "DiffParallelScalingBlock",
                    "ParallelThingsBlock")],
    ("tv-mobilenet_v2", _tv("mobilenet_v2"), 32, 10, set(),
     {"torchvision.mobilenetv2.InvertedResidual"}),
    ("tv-mobilenet_v3_small", _tv("mobilenet_v3_small"), 32, 6, set(),
     {"torchvision.mobilenetv3.InvertedResidual"}),
    ("tv-efficientnet_b0", _tv("efficientnet_b0"), 32, 9, set(),
     {"torchvision.efficientnet.MBConv"}),
    ("tv-efficientnet_v2_s", _tv("efficientnet_v2_s"), 32, 35, set(),
     {"torchvision.efficientnet.FusedMBConv", "torchvision.efficientnet.MBConv"}),
    ("tv-regnet_x_400mf", _tv("regnet_x_400mf"), 32, 22,
     {f"trunk_output.block{i}.block{i}-0" for i in range(1, 5)},
     {"torchvision.regnet.ResBottleneckBlock"}),
    ("tv-convnext_tiny", _tv("convnext_tiny"), 32, 18, set(), {"torchvision.convnext.CNBlock"}),
    ("tv-vit_b_16", _tv("vit_b_16", image_size=32), 32, 12, set(),
     {"torchvision.vision_transformer.EncoderBlock"}),
    ("tv-swin_t", _tv("swin_t"), 32, 12, set(),
     {"torchvision.swin_transformer.SwinTransformerBlock"}),
    ("tv-swin_v2_t", _tv("swin_v2_t"), 32, 12, set(),
     {"torchvision.swin_transformer.SwinTransformerBlockV2"}),
]


@pytest.mark.parametrize("factory,size,n_blocks,undecayed,kinds",
                         [f[1:] for f in FAMILIES], ids=[f[0] for f in FAMILIES])
def test_family_placement_forward_and_gradient(factory, size, n_blocks, undecayed, kinds):
    torch.manual_seed(0)
    model = wake(factory())
    blocks = skip_gradient(model, SGM_GAMMA).blocks
    assert len(blocks) == n_blocks
    assert {b.name for b in blocks if not b.decayed} == undecayed
    assert {b.kind for b in blocks} == kinds
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    plain_out, plain_grad = outputs_and_grad(model, x)
    with skip_gradient(model, SGM_GAMMA):
        out, grad = outputs_and_grad(model, x)
    assert torch.equal(out, plain_out), "SGM changed the forward pass"
    assert (grad - plain_grad).norm() > 0.01 * plain_grad.norm(), "SGM was a silent no-op"
    with skip_gradient(model, 1.0):
        _, unit_grad = outputs_and_grad(model, x)
    assert torch.equal(unit_grad, plain_grad)


# ---- Placement against an independent SGM: each branch output written as g*f + (1-g)*f.detach() --

def _decay(out: torch.Tensor, gamma: float) -> torch.Tensor:
    # Same forward value, gradient gamma * df: SGM by autograd algebra, no hooks involved.
    return gamma * out + (1 - gamma) * out.detach()


def _ref_timm_vit(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    x = x + _decay(b.ls1(b.attn(b.norm1(x))), g)
    return x + _decay(b.ls2(b.mlp(b.norm2(x))), g)


def _ref_tv_encoder(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    y = b.ln_1(x)
    x = x + _decay(b.self_attention(y, y, y, need_weights=False)[0], g)
    return x + _decay(b.mlp(b.ln_2(x)), g)


def _ref_timm_preact(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    pre = b.norm1(x)
    shortcut = x if b.downsample is None else b.downsample(pre)
    return _decay(b.conv2(b.norm2(b.conv1(pre))), g) + shortcut


def _ref_block35(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    out = b.conv2d(torch.cat((b.branch0(x), b.branch1(x), b.branch2(x)), 1)) * b.scale
    return b.act(_decay(out, g) + x)


def _ref_block17_8(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    out = _decay(b.conv2d(torch.cat((b.branch0(x), b.branch1(x)), 1)) * b.scale, g) + x
    act = getattr(b, "act", None) or getattr(b, "relu", None)
    return act(out) if act is not None else out


def _ref_timm_ir(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    out = b.bn2(b.conv_dw(b.bn1(b.conv_pw(x))))
    return x + _decay(b.bn3(b.conv_pwl(b.se(b.aa(out)))), g)


def _ref_tv_block_attr(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    body = b.conv if hasattr(b, "conv") else b.block        # MobileNetV2 / V3, MBConv
    return x + _decay(body(x), g)


def _ref_timm_swin(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    B, H, W, C = x.shape
    x = (x + _decay(b._attn(b.norm1(x)), g)).reshape(B, -1, C)
    return (x + _decay(b.mlp(b.norm2(x)), g)).reshape(B, H, W, C)


def _ref_tv_swin_v2(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    x = x + _decay(b.norm1(b.attn(x)), g)
    return x + _decay(b.norm2(b.mlp(x)), g)


def _ref_tv_cnblock(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    return x + _decay(b.layer_scale * b.block(x), g)


def _ref_tv_regnet(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    shortcut = x if b.proj is None else b.proj(x)
    return b.activation(shortcut + _decay(b.f(x), g))


def _ref_mixer(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    x = x + _decay(b.mlp_tokens(b.norm1(x).transpose(1, 2)).transpose(1, 2), g)
    return x + _decay(b.mlp_channels(b.norm2(x)), g)


def _ref_senet(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    out = b.relu(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))))
    shortcut = x if b.downsample is None else b.downsample(x)
    return b.relu(_decay(b.se_module(b.bn3(b.conv3(out))), g) + shortcut)


def _ref_timm_regnet(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    return b.act3(_decay(b.conv3(b.se(b.conv2(b.conv1(x)))), g) + b.downsample(x))


def _ref_timm_convnext(b: nn.Module, x: torch.Tensor, g: float) -> torch.Tensor:
    if b.use_conv_mlp:
        out = b.mlp(b.norm(b.conv_dw(x)))
    else:
        out = b.mlp(b.norm(b.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    return _decay(out.mul(b.gamma.reshape(1, -1, 1, 1)), g) + b.shortcut(x)


REFERENCES = [
    ("timm-legacy_seresnet50", _timm("legacy_seresnet50"), 32, {"SEResNetBottleneck": _ref_senet}),
    ("timm-regnetx_002", _timm("regnetx_002"), 32, {"Bottleneck": _ref_timm_regnet}),
    ("timm-convnext_atto", _timm("convnext_atto"), 32, {"ConvNeXtBlock": _ref_timm_convnext}),
    ("timm-vit", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3), 32,
     {"Block": _ref_timm_vit}),
    ("tv-vit", _tv("vit_b_16", image_size=32), 32, {"EncoderBlock": _ref_tv_encoder}),
    ("timm-resnetv2_18", _timm("resnetv2_18"), 32, {"PreActBasic": _ref_timm_preact}),
    ("timm-inception_resnet_v2", _timm("inception_resnet_v2"), 75,
     {"Block35": _ref_block35, "Block17": _ref_block17_8, "Block8": _ref_block17_8}),
    ("timm-mobilenetv2_050", _timm("mobilenetv2_050"), 32, {"InvertedResidual": _ref_timm_ir}),
    ("tv-mobilenet_v2", _tv("mobilenet_v2"), 32, {"InvertedResidual": _ref_tv_block_attr}),
    ("tv-efficientnet_b0", _tv("efficientnet_b0"), 32, {"MBConv": _ref_tv_block_attr}),
    ("timm-swin", _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2), 64,
     {"SwinTransformerBlock": _ref_timm_swin}),
    ("tv-swin_v2_t", _tv("swin_v2_t"), 32, {"SwinTransformerBlockV2": _ref_tv_swin_v2}),
    ("tv-convnext_tiny", _tv("convnext_tiny"), 32, {"CNBlock": _ref_tv_cnblock}),
    ("tv-regnet_x_400mf", _tv("regnet_x_400mf"), 32, {"ResBottleneckBlock": _ref_tv_regnet}),
    ("timm-mixer", _timm("mixer_s32_224", img_size=64), 64, {"MixerBlock": _ref_mixer}),
]


def reference_gradient(model: nn.Module, x: torch.Tensor, gamma: float, decayed: set[str],
                       refs: dict[str, Callable]) -> torch.Tensor:
    """Input gradient with the named blocks' forwards replaced by their detach-algebra reference."""
    patched = []
    for name, module in model.named_modules():
        if name in decayed:
            ref = refs[type(module).__name__]
            module.forward = lambda x, m=module, ref=ref: ref(m, x, gamma)
            patched.append(module)
    try:
        return outputs_and_grad(model, x)[1]
    finally:
        for module in patched:
            del module.forward


@pytest.mark.parametrize("factory,size,refs", [r[1:] for r in REFERENCES],
                         ids=[r[0] for r in REFERENCES])
def test_gradient_matches_autograd_algebra_per_family(factory, size, refs):
    torch.manual_seed(0)
    model = wake(factory())
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with skip_gradient(model, 0.3) as sgm:
        got = outputs_and_grad(model, x)[1]
    decayed = {b.name for b in sgm.blocks if b.decayed}
    want = reference_gradient(model, x, 0.3, decayed, refs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_preact_projection_block_decays_from_conv1():
    """A pre-activation block with a projection shortcut: the shortcut reads norm1's output."""
    from timm.models.resnetv2 import DownsampleConv, PreActBasic

    torch.manual_seed(0)
    model = wake(nn.Sequential(PreActBasic(32, 32), PreActBasic(32, 64, stride=2,
                                                                proj_layer=DownsampleConv)))
    x = torch.randn(2, 32, 8, 8)
    with skip_gradient(model, 0.3) as sgm:
        got = outputs_and_grad(model, x)[1]
    assert [b.decayed for b in sgm.blocks] == [False, True] and model[1].downsample is not None
    want = reference_gradient(model, x, 0.3, {"1"}, {"PreActBasic": _ref_timm_preact})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


# ---- Hand-built blocks against the analytic Jacobian -----------------------------------------

class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x1 = x + attn(norm1(x)); y = x1 + mlp(norm2(x1))."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        return self.attn(y, y, y, need_weights=False)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        return x + self.mlp(self.norm2(x))


class ResidualConvBlock(nn.Module):
    """Post-activation CNN block: y = relu(x + bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.branch(x))


skipgrad.register_block(TransformerBlock, lambda b: [b.norm1, b.norm2], decay_first_in_stage=True)
skipgrad.register_block(ResidualConvBlock, lambda b: [b.conv1], decay_first_in_stage=True)


def _jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    return torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).flatten(), x.flatten()
                                              ).view(n, n)


@pytest.mark.parametrize("gamma", [0.25, 0.6])
def test_hand_built_transformer_block_matches_the_chain_rule(gamma):
    """dy/dx = (I + gamma * dM(x1)) (I + gamma * dA(x)): both branches decayed, the skips not."""
    torch.manual_seed(0)
    block = TransformerBlock().eval()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    block.double()
    with skip_gradient(block, gamma):
        got = _jacobian(block, x)
    x1 = (x + block.attention(x)).detach()
    eye = torch.eye(x.numel(), dtype=torch.float64)
    attn_jac = _jacobian(block.attention, x)
    mlp_jac = _jacobian(lambda v: block.mlp(block.norm2(v)), x1)
    torch.testing.assert_close(got, (eye + gamma * mlp_jac) @ (eye + gamma * attn_jac))
    assert not torch.allclose(got, _jacobian(block, x))


def test_hand_built_residual_cnn_block_matches_the_chain_rule():
    """dy/dx = diag(relu'(x + f(x))) (I + gamma * df/dx)."""
    torch.manual_seed(0)
    block = wake(ResidualConvBlock()).double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    with skip_gradient(block, 0.3):
        got = _jacobian(block, x)
    pre = (x + block.branch(x)).detach().flatten()
    relu_grad = torch.diag((pre > 0).double())
    eye = torch.eye(x.numel(), dtype=torch.float64)
    torch.testing.assert_close(got, relu_grad @ (eye + 0.3 * _jacobian(block.branch, x)))
