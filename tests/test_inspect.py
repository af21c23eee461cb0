"""inspect_model: the branch/skip split of the gradient against an independent computation."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import skipgrad
from skipgrad import NoResidualBlockError
from skipgrad.backward.inspect import SGMReport, format_report, inspect_model
from tests.conftest import randomise_batchnorm


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On two cores shared with other jobs, two OpenMP threads wait on each other: ~50x slower here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TanhBlock(nn.Module):
    """y = x + conv2(tanh(conv1(x))): identity skip, smooth branch."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


skipgrad.register_block(TanhBlock, lambda b: [b.conv1])  # first block of the stage kept


class TanhNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(TanhBlock(), TanhBlock(), TanhBlock())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def independent_split(net: TanhNet, images: torch.Tensor, labels: torch.Tensor,
                      decayed: dict[int, float]) -> list[tuple[float, float, float]]:
    """(total, branch, skip) norms per block, by autograd on copies; no hooks involved.

    Each block computes x + g*f(u) + (1-g)*f(u).detach() with u a copy of x: dL/du is the branch
    part of dL/dx and dL/dx - dL/du the skip part.
    """
    x = net.stem(images.detach().clone().requires_grad_(True))
    inputs, copies = [], []
    for i, block in enumerate(net.blocks):
        u = x.clone()
        out = block.branch(u)
        gamma = decayed.get(i, 1.0)
        inputs.append(x)
        copies.append(u)
        x = x + gamma * out + (1 - gamma) * out.detach()
    loss = F.cross_entropy(net.head(x), labels, reduction="sum")
    grads = torch.autograd.grad(loss, inputs + copies)
    n = len(inputs)
    return [(t.norm().item(), b.norm().item(), (t - b).norm().item())
            for t, b in zip(grads[:n], grads[n:])]


@pytest.fixture
def tanh_net_report() -> tuple[TanhNet, torch.Tensor, torch.Tensor, SGMReport]:
    torch.manual_seed(0)
    net = TanhNet()
    images, labels = torch.rand(3, 3, 6, 6), torch.tensor([1, 4, 7])
    return net, images, labels, inspect_model(net, 0.3, images, labels)


def test_split_matches_an_independent_computation(tanh_net_report):
    net, images, labels, report = tanh_net_report
    assert [(b.name, b.decayed) for b in report.blocks] == [
        ("blocks.0", False), ("blocks.1", True), ("blocks.2", True)]
    for mode, decayed in (("plain", {}), ("sgm", {1: 0.3, 2: 0.3})):
        want = independent_split(net, images, labels, decayed)
        for block, (total, branch, skip) in zip(report.blocks, want):
            got = getattr(block, mode)
            assert got.total_norm == pytest.approx(total, rel=1e-5)
            assert got.branch_norm == pytest.approx(branch, rel=1e-5)
            assert got.skip_norm == pytest.approx(skip, rel=1e-5)
            assert got.branch_share == pytest.approx(branch / (branch + skip), rel=1e-5)


def test_sgm_scales_the_last_branch_by_gamma(tanh_net_report):
    # Nothing after the last block is decayed, so its upstream gradient is the same in both runs:
    # the branch part is exactly gamma times the plain one, the skip part unchanged.
    _, _, _, report = tanh_net_report
    last = report.blocks[-1]
    assert last.sgm.branch_norm == pytest.approx(0.3 * last.plain.branch_norm, rel=1e-5)
    assert last.sgm.skip_norm == pytest.approx(last.plain.skip_norm, rel=1e-5)
    assert last.sgm.branch_share < last.plain.branch_share


def test_summary_and_table(tanh_net_report):
    _, images, labels, report = tanh_net_report
    assert report.model == "TanhNet" and report.gamma == 0.3 and report.n_decayed == 2
    assert report.mean_branch_share(sgm=True) < report.mean_branch_share(sgm=False)
    assert 0 < report.input_grad_cosine < 1 and report.input_grad_norm_sgm > 0
    assert report.loss == pytest.approx(
        F.cross_entropy(tanh_net_report[0](images), labels, reduction="sum").item(), rel=1e-6)
    table = format_report(report)
    for name in ("blocks.0", "blocks.1", "blocks.2", "3 found, 2 decayed", "cosine"):
        assert name in table


def test_model_is_left_as_found(tanh_net_report):
    net, images, labels, _ = tanh_net_report
    net.train()
    inspect_model(net, 0.5, images, labels)
    assert all(m.training for m in net.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("factory,size", [
    (lambda: torchvision.models.resnet18(num_classes=10), 32),
    (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                               num_classes=10), 32),
    (lambda: torchvision.models.densenet121(num_classes=10), 32),
    (lambda: timm.create_model("inception_resnet_v2", num_classes=10), 75),
], ids=["tv-resnet18", "timm-vit", "tv-densenet121", "timm-inception_resnet_v2"])
def test_real_models_shift_the_gradient_to_the_skips(factory, size):
    torch.manual_seed(0)
    model = randomise_batchnorm(factory())
    report = inspect_model(model, 0.2, torch.rand(2, 3, size, size), torch.tensor([0, 1]))
    expected = skipgrad.skip_gradient(model, 0.2).blocks
    assert [(b.name, b.decayed) for b in report.blocks] == [(b.name, b.decayed) for b in expected]
    for block in report.blocks:
        for split in (block.plain, block.sgm):
            assert 0 <= split.branch_share <= 1 and math.isfinite(split.total_norm)
    assert report.mean_branch_share(sgm=True) < report.mean_branch_share(sgm=False)


@pytest.mark.parametrize("factory,name", [
    (lambda: torchvision.models.vgg11(num_classes=10), "VGG"),
    (lambda: torchvision.models.inception_v3(num_classes=10, aux_logits=False,
                                             init_weights=False), "Inception3"),
    (lambda: timm.create_model("vgg11", num_classes=10), "VGG"),
    (lambda: timm.create_model("inception_v3", num_classes=10), "InceptionV3"),
], ids=["tv-vgg11", "tv-inception_v3", "timm-vgg11", "timm-inception_v3"])
def test_models_without_residual_blocks_raise_naming_the_model(factory, name):
    with pytest.raises(NoResidualBlockError, match=name):
        inspect_model(factory(), 0.2, torch.rand(1, 3, 75, 75), torch.tensor([0]))


def test_gamma_is_validated(tanh_net_report):
    net, images, labels, _ = tanh_net_report
    with pytest.raises(ValueError, match="gamma"):
        inspect_model(net, 0.0, images, labels)
