"""skip_gradient: gradients against independent computations, placement, hooks, errors."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.densenet import _DenseLayer
from torchvision.models.resnet import BasicBlock, Bottleneck

import skipgrad
from skipgrad import NoResidualBlockError, UnsupportedOfficialModelError, skip_gradient
from tests.conftest import randomise_batchnorm


def input_grad(model: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Gradient of a fixed random linear functional of the logits w.r.t. the input."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return grad


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


# ---- An independent SGM: the branch output written as gamma*f + (1-gamma)*stop_grad(f). --------

def _decay(out: torch.Tensor, gamma: float) -> torch.Tensor:
    # Same forward value, gradient gamma * df: SGM by autograd algebra, no hooks involved.
    return gamma * out + (1 - gamma) * out.detach()


def _resnet_block_reference(block: nn.Module, x: torch.Tensor, gamma: float) -> torch.Tensor:
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return block.relu(_decay(out, gamma) + identity)


def _dense_layer_reference(layer: nn.Module, inputs: list, gamma: float) -> torch.Tensor:
    x = torch.cat(inputs if isinstance(inputs, list) else [inputs], 1)
    out = layer.conv1(layer.relu1(layer.norm1(x)))
    return _decay(layer.conv2(layer.relu2(layer.norm2(out))), gamma)


def reference_gradient(model: nn.Module, x: torch.Tensor, gamma: float,
                       decayed: set[str]) -> torch.Tensor:
    """Input gradient with the named blocks' branches decayed via the detach identity."""
    patched = []
    for name, module in model.named_modules():
        if name not in decayed:
            continue
        if isinstance(module, (BasicBlock, Bottleneck)):
            module.forward = lambda x, m=module: _resnet_block_reference(m, x, gamma)
        else:
            module.forward = lambda x, m=module: _dense_layer_reference(m, x, gamma)
        patched.append(module)
    try:
        return input_grad(model, x)
    finally:
        for module in patched:
            del module.forward


def decayed_names(model: nn.Module, gamma: float) -> set[str]:
    return {b.name for b in skip_gradient(model, gamma).blocks if b.decayed}


# ---- Gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.2, 0.5])
def test_gradient_matches_autograd_algebra_on_hand_built_resnet(tiny_resnet, tiny_batch, gamma):
    x, _ = tiny_batch
    with skip_gradient(tiny_resnet, gamma):
        got = input_grad(tiny_resnet, x)
    names = decayed_names(tiny_resnet, gamma)
    assert names == {"layer1.1", "layer1.2", "layer2.1", "layer2.2"}
    want = reference_gradient(tiny_resnet, x, gamma, names)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, input_grad(tiny_resnet, x), rtol=1e-3)


@pytest.mark.parametrize("arch,size", [("resnet50", 32), ("densenet121", 32)])
def test_gradient_matches_autograd_algebra_on_torchvision(arch, size):
    torch.manual_seed(0)
    model = randomise_batchnorm(getattr(torchvision.models, arch)(num_classes=10))
    x = torch.rand(2, 3, size, size)
    with skip_gradient(model, 0.3):
        got = input_grad(model, x)
    want = reference_gradient(model, x, 0.3, decayed_names(model, 0.3))
    assert cosine(got, want).min() > 1 - 1e-6
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_hand_built_transformer_style_block_matches_analytic_gradient():
    """y = x + W2 tanh(W1 x): with SGM, dy/dx = I + gamma * W2 diag(1 - tanh^2) W1."""

    class MLPBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.tanh(self.fc1(x)))

    skipgrad.register_block(MLPBlock, lambda b: [b.fc1], decay_first_in_stage=True)
    torch.manual_seed(0)
    block = MLPBlock()
    x = torch.randn(5, requires_grad=True)
    with skip_gradient(block, 0.25):
        jac = torch.autograd.functional.jacobian(block, x)
    h = block.fc1(x).detach()
    branch = block.fc2.weight @ torch.diag(1 - torch.tanh(h) ** 2) @ block.fc1.weight
    torch.testing.assert_close(jac, torch.eye(5) + 0.25 * branch.detach())


def test_gamma_one_gives_the_plain_gradient(tiny_resnet, tiny_batch):
    x, _ = tiny_batch
    with skip_gradient(tiny_resnet, 1.0):
        got = input_grad(tiny_resnet, x)
    assert torch.equal(got, input_grad(tiny_resnet, x))


def test_forward_values_are_identical(tiny_resnet, tiny_batch):
    x, _ = tiny_batch
    models = [tiny_resnet, randomise_batchnorm(torchvision.models.resnet18(num_classes=10)),
              randomise_batchnorm(torchvision.models.densenet121(num_classes=10)),
              randomise_batchnorm(timm.create_model("resnet18", num_classes=10)),
              randomise_batchnorm(timm.create_model("densenet121", num_classes=10))]
    for model in models:
        inp = x if model is tiny_resnet else torch.rand(2, 3, 32, 32)
        inp.requires_grad_(True)
        plain = model(inp)
        with skip_gradient(model, 0.2):
            decayed = model(inp)
        assert torch.equal(plain, decayed), type(model).__name__


def test_wrapped_model_is_found_structurally(tiny_resnet, tiny_batch):
    x, _ = tiny_batch
    wrapped = nn.Sequential(nn.Identity(), nn.Sequential(tiny_resnet))
    with skip_gradient(wrapped, 0.2):
        got = input_grad(wrapped, x)
    with skip_gradient(tiny_resnet, 0.2):
        want = input_grad(tiny_resnet, x)
    assert torch.equal(got, want)


def test_timm_resnet_is_not_a_silent_no_op():
    model = randomise_batchnorm(timm.create_model("resnet26", num_classes=10))
    x = torch.rand(2, 3, 32, 32)
    with skip_gradient(model, 0.2) as sgm:
        got = input_grad(model, x)
    assert sum(b.decayed for b in sgm.blocks) == 8 - 4  # 4 stages of 2 Bottlenecks, first kept
    assert cosine(got, input_grad(model, x)).max() < 0.99


# ---- Placement -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,expected", [
    ("resnet18", {"layer1.1", "layer2.1", "layer3.1", "layer4.1"}),
    ("resnet50", {"layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer2.3", "layer3.1",
                  "layer3.2", "layer3.3", "layer3.4", "layer3.5", "layer4.1", "layer4.2"}),
])
def test_default_decays_every_block_but_the_first_of_each_stage(arch, expected):
    model = getattr(torchvision.models, arch)()
    blocks = skip_gradient(model, 0.2).blocks
    assert {b.name for b in blocks if b.decayed} == expected
    assert {b.name for b in blocks if not b.decayed} == {f"layer{i}.0" for i in range(1, 5)}


@pytest.mark.parametrize("arch,layers", [("resnext50_32x4d", 16), ("wide_resnet50_2", 16),
                                         ("resnet101", 33), ("resnet152", 50), ("resnet34", 16)])
def test_resnet_family_variants_are_found(arch, layers):
    blocks = skip_gradient(getattr(torchvision.models, arch)(), 0.2).blocks
    assert len(blocks) == layers and sum(b.decayed for b in blocks) == layers - 4


@pytest.mark.parametrize("arch,layers", [("densenet121", 58), ("densenet169", 82),
                                         ("densenet201", 98)])
def test_every_dense_layer_is_decayed(arch, layers):
    for model in (getattr(torchvision.models, arch)(), timm.create_model(arch)):
        blocks = skip_gradient(model, 0.5).blocks
        assert len(blocks) == layers and all(b.decayed for b in blocks)


# ---- Hooks and errors ------------------------------------------------------------------------

def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("official", [False, True])
def test_hooks_are_removed_on_exit_and_on_exception(official):
    model = randomise_batchnorm(torchvision.models.resnet18(num_classes=10))
    x = torch.rand(2, 3, 32, 32)
    plain = input_grad(model, x)
    with skip_gradient(model, 0.2, official=official):
        assert _hook_count(model) > 0
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with skip_gradient(model, 0.2, official=official):
            model(x)
            raise RuntimeError("boom")
    assert _hook_count(model) == 0
    assert torch.equal(input_grad(model, x), plain)


def test_model_without_residual_blocks_is_an_error_naming_it():
    with pytest.raises(NoResidualBlockError, match="VGG") as info:
        skip_gradient(torchvision.models.vgg11(), 0.2)
    assert isinstance(info.value, ValueError)
    assert "register_block" in str(info.value)


@pytest.mark.parametrize("gamma", [0, -0.1, 1.5, float("nan"), "0.2", None, True])
def test_gamma_outside_unit_interval_is_rejected(tiny_resnet, gamma):
    with pytest.raises(ValueError, match="gamma"):
        skip_gradient(tiny_resnet, gamma)


def test_official_needs_a_torchvision_resnet_or_densenet(tiny_resnet):
    with pytest.raises(UnsupportedOfficialModelError, match="torchvision ResNet and DenseNet"):
        skip_gradient(timm.create_model("resnet18"), 0.2, official=True)


def test_registering_a_block_twice_is_refused():
    class Twice(nn.Module):
        pass

    skipgrad.register_block(Twice, lambda b: [b])
    with pytest.raises(ValueError, match="already registered"):
        skipgrad.register_block(Twice, lambda b: [b])


def test_registered_block_without_skip_is_ignored():
    class MaybeResidual(nn.Module):
        def __init__(self, residual: bool) -> None:
            super().__init__()
            self.residual, self.body = residual, nn.Linear(3, 3)

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    skipgrad.register_block(MaybeResidual, lambda b: [b.body] if b.residual else [],
                            decay_first_in_stage=True)
    with pytest.raises(NoResidualBlockError):
        skip_gradient(nn.Sequential(MaybeResidual(False)), 0.5)
    assert len(skip_gradient(nn.Sequential(MaybeResidual(True)), 0.5).blocks) == 1


def test_bfloat16_autocast_on_cpu(tiny_resnet, tiny_batch):
    x, _ = tiny_batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = input_grad(tiny_resnet, x)
        with skip_gradient(tiny_resnet, 0.2):
            decayed = input_grad(tiny_resnet, x)
    assert torch.isfinite(decayed).all() and cosine(plain, decayed).max() < 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda(tiny_resnet, tiny_batch):
    x, _ = tiny_batch
    model = tiny_resnet.cuda()
    with skip_gradient(model, 0.2):
        got = input_grad(model, x.cuda())
    with skip_gradient(tiny_resnet.cpu(), 0.2):
        want = input_grad(tiny_resnet, x)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-5)
