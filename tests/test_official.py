"""SGM against an independent re-implementation of the authors' released hooks.

The re-implementation below follows the description of the release's ``utils_sgm.py`` (docs/sgm.md,
"the authors' release") with PyTorch's old-style ``Module.register_backward_hook`` -- the mechanism the release
used -- on a model wrapped as ``nn.Sequential(normaliser, net)`` exactly as the release wraps it, so
module names carry the ``"1."`` prefix its name filters saw.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from skipgrad import skip_gradient
from tests.conftest import randomise_batchnorm


def released_hooks(model: nn.Module, arch: str, gamma: float) -> list:
    """Old-style backward hooks placed as the authors' release places them."""
    handles = []

    def scale(factor):
        return lambda module, grad_in, grad_out: (factor * grad_in[0],)

    def normalise(module, grad_in, grad_out):
        return (grad_in[0] / torch.std(grad_in[0]),)

    if arch.startswith("resnet"):
        factor = gamma ** 0.5 if arch in ("resnet50", "resnet101", "resnet152") else gamma
        for name, module in model.named_modules():
            if "relu" in name and "0.relu" not in name:
                handles.append(module.register_backward_hook(scale(factor)))
            if len(name.split(".")) >= 2 and "layer" in name.split(".")[-2]:
                handles.append(module.register_backward_hook(normalise))
    else:
        for name, module in model.named_modules():
            if "relu" in name and "transition" not in name:
                handles.append(module.register_backward_hook(scale(gamma ** 0.5)))
    return handles


def loss_input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def released_grad(model: nn.Module, arch: str, gamma: float, x, y) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old hook API warns that it is deprecated
        handles = released_hooks(model, arch, gamma)
        try:
            return loss_input_grad(model, x, y)
        finally:
            for h in handles:
                h.remove()


def wrapped(arch: str) -> nn.Module:
    torch.manual_seed(0)
    net = randomise_batchnorm(getattr(torchvision.models, arch)(num_classes=10))
    return nn.Sequential(nn.Identity(), net).eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


BATCH = (torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
         torch.tensor([1, 4, 7]))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet101", "densenet121"])
def test_official_mode_reproduces_the_release_gradient(arch):
    model = wrapped(arch)
    x, y = BATCH
    want = released_grad(model, arch, 0.2, x, y)
    with skip_gradient(model, 0.2, official=True):
        got = loss_input_grad(model, x, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet152", "densenet121"])
def test_default_mode_matches_the_release_in_direction(arch):
    """Per-sample cosine >= 0.999 (the release's extra global scales change no direction)."""
    model = wrapped(arch)
    x, y = BATCH
    want = released_grad(model, arch, 0.2, x, y)
    official = arch == "resnet152"  # the release skips layer3.10/.20/.30 of ResNet-152 by accident
    with skip_gradient(model, 0.2, official=official):
        got = loss_input_grad(model, x, y)
    assert cosine(got, want).min() >= 0.999


def test_release_quirk_leaves_layer3_10_and_20_of_resnet101_undecayed():
    model = wrapped("resnet101")
    x, y = BATCH
    want = released_grad(model, "resnet101", 0.2, x, y)
    with skip_gradient(model, 0.2):
        default = loss_input_grad(model, x, y)
    with skip_gradient(model, 0.2, official=True):
        official = loss_input_grad(model, x, y)
    assert cosine(official, want).min() > 0.99999
    assert cosine(default, want).min() < cosine(official, want).min()
