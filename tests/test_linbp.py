"""linbp: gradients against an independent computation, placement, errors, other attack code."""
from __future__ import annotations

from typing import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

import skipgrad
from skipgrad import NothingToChangeError, linbp
from skipgrad.models.zoo.architectures import CifarResNet, PreActResNet, SmallVGG
from tests.conftest import randomise_batchnorm

Act = Callable[[torch.Tensor], torch.Tensor]


def input_grad(model: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Gradient of a fixed random linear functional of the logits w.r.t. the input."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * weights).sum(), x)[0]


def linear_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x) in value, identity in gradient."""
    return x + (torch.relu(x) - x).detach()


# ---- An independent LinBP: each block split by hand into pre / branch / skip / post, and the
# backward swept block by block with explicit autograd.grad calls on separate graphs. -----------

class BlockSpec:
    """``y = post(branch(s) + skip(s))`` with ``s = pre(x)``; ``branch(s, act)`` takes the ReLU."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def skip(self, s: torch.Tensor) -> torch.Tensor:
        down = getattr(self.block, "downsample", None)
        return s if down is None else down(s)


class TorchvisionSpec(BlockSpec):
    def branch(self, s: torch.Tensor, act: Act) -> torch.Tensor:
        b = self.block
        out = act(b.bn1(b.conv1(s)))
        if isinstance(b, Bottleneck):
            return b.bn3(b.conv3(act(b.bn2(b.conv2(out)))))
        return b.bn2(b.conv2(out))

    def post(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z)


class TimmSpec(BlockSpec):
    def branch(self, s: torch.Tensor, act: Act) -> torch.Tensor:
        b = self.block
        out = act(b.bn1(b.conv1(s)))
        if hasattr(b, "conv3"):
            return b.bn3(b.conv3(act(b.bn2(b.conv2(out)))))
        return b.bn2(b.conv2(out))

    def post(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z)


class PreActSpec(BlockSpec):
    """The zoo block: with a projection the split is after relu(bn1(x)), else at x itself."""

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        return x if b.shortcut is None else torch.relu(b.bn1(x))

    def branch(self, s: torch.Tensor, act: Act) -> torch.Tensor:
        b = self.block
        pre = act(b.bn1(s)) if b.shortcut is None else s
        return b.conv2(act(b.bn2(b.conv1(pre))))

    def skip(self, s: torch.Tensor) -> torch.Tensor:
        return s if self.block.shortcut is None else self.block.shortcut(s)

    def post(self, z: torch.Tensor) -> torch.Tensor:
        return z


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def reference_linbp(segments: list, x: torch.Tensor, start: int, scale: float,
                    seed: int = 0) -> torch.Tensor:
    """``segments``: callables and BlockSpecs in forward order; BlockSpecs from the ``start``-th
    one on get LinBP (plain segments after them form the head). Returns the input gradient of the
    same functional as :func:`input_grad`."""
    x = _leaf(x)
    h, first, records, seen = x, None, [], 0
    for seg in segments:
        if isinstance(seg, BlockSpec) and seen >= start:
            first = h if first is None else first
            inp = _leaf(h)
            s = seg.pre(inp)
            s_branch = _leaf(s)
            lin, true = seg.branch(s_branch, linear_relu), seg.branch(s_branch, torch.relu)
            out_b = _leaf(lin)
            h = seg.post(out_b + seg.skip(s))
            records.append((inp, s, s_branch, lin, true, out_b, h))
        elif isinstance(seg, BlockSpec):
            s = seg.pre(h)
            h = seg.post(seg.branch(s, torch.relu) + seg.skip(s))
        else:
            h = seg(h)
        seen += isinstance(seg, BlockSpec)
    weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed))
    grad = torch.autograd.grad((h * weights).sum(), records[-1][-1])[0]
    for inp, s, s_branch, lin, true, out_b, y in reversed(records):
        g_out, g_s = torch.autograd.grad(y, (out_b, s), grad, retain_graph=True)
        m = torch.autograd.grad(lin, s_branch, g_out)[0]
        t = torch.autograd.grad(true, s_branch, g_out)[0]
        alpha = t.flatten(1).norm(dim=1) / m.flatten(1).norm(dim=1)
        g_s = g_s + scale * alpha.view(-1, *([1] * (m.dim() - 1))) * m
        grad = g_s if s is inp else torch.autograd.grad(s, inp, g_s)[0]
    return torch.autograd.grad(first, x, grad)[0]


def tiny_segments(model) -> list:
    return [model.stem, *map(TorchvisionSpec, [*model.layer1, *model.layer2]), model.head]


# ---- Gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_gradient_matches_hand_written_linbp_on_basic_blocks(tiny_resnet, tiny_batch, scale):
    x, _ = tiny_batch
    with linbp(tiny_resnet, branch_scale=scale) as context:
        got = input_grad(tiny_resnet, x)
    assert context.start == "layer2.0"  # 6 blocks: index 3
    want = reference_linbp(tiny_segments(tiny_resnet), x, start=3, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, input_grad(tiny_resnet, x), rtol=1e-2)


@pytest.mark.parametrize("start,index", [("layer1.1", 1), (0, 0), (-1, 5)])
def test_start_by_name_or_index(tiny_resnet, tiny_batch, start, index):
    x, _ = tiny_batch
    with linbp(tiny_resnet, start=start):
        got = input_grad(tiny_resnet, x)
    torch.testing.assert_close(got, reference_linbp(tiny_segments(tiny_resnet), x, index, 1.0),
                               rtol=1e-5, atol=1e-7)


def test_bottleneck_blocks_of_torchvision_resnet50():
    torch.manual_seed(0)
    net = randomise_batchnorm(torchvision.models.resnet50(num_classes=10))
    x = torch.rand(2, 3, 32, 32)
    context = linbp(net)
    assert context.start == "layer3.1"  # the authors' default '3_1'
    assert linbp(nn.Sequential(nn.Identity(), net)).start == "1.layer3.1"
    with context:
        got = input_grad(net, x)
    stem = lambda h: net.maxpool(net.relu(net.bn1(net.conv1(h))))  # noqa: E731
    blocks = [TorchvisionSpec(b) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
              for b in layer]
    head = lambda h: net.fc(torch.flatten(net.avgpool(h), 1))  # noqa: E731
    want = reference_linbp([stem, *blocks, head], x, start=8, scale=1.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("arch", ["resnet18", "resnet26"])
def test_timm_basic_and_bottleneck_blocks(arch):
    torch.manual_seed(0)
    net = randomise_batchnorm(timm.create_model(arch, num_classes=10))
    x = torch.rand(2, 3, 32, 32)
    with linbp(net, branch_scale=0.7) as context:
        got = input_grad(net, x)
    stem = lambda h: net.maxpool(net.act1(net.bn1(net.conv1(h))))  # noqa: E731
    blocks = [TimmSpec(b) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
              for b in layer]
    index = [n for n, _, _ in skipgrad.find_blocks(net)].index(context.start)
    want = reference_linbp([stem, *blocks, net.forward_head], x, start=index, scale=0.7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_zoo_preactivation_blocks_identity_and_projection():
    torch.manual_seed(0)
    net = randomise_batchnorm(PreActResNet(2))
    x = torch.rand(3, 1, 28, 28)
    with linbp(net, start=1):  # layer1.1 (identity) ... layer3.0 (projection) ...
        got = input_grad(net, x)
    blocks = [PreActSpec(b) for layer in (net.layer1, net.layer2, net.layer3) for b in layer]
    assert blocks[2].block.shortcut is not None
    want = reference_linbp([lambda h: net.stem(net.normalize(h)), *blocks,
                            lambda h: net.head(net.final(h))], x, start=1, scale=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_zoo_resnet20():
    torch.manual_seed(0)
    net = randomise_batchnorm(CifarResNet(3))
    x = torch.rand(2, 1, 28, 28)
    with linbp(net) as context:
        got = input_grad(net, x)
    assert context.start == "layer2.1"  # 9 blocks: index 4
    blocks = [TorchvisionSpec(b) for layer in (net.layer1, net.layer2, net.layer3) for b in layer]
    want = reference_linbp([lambda h: net.stem(net.normalize(h)), *blocks, net.head], x, 4, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_single_block_analytic_norm_matching():
    """One block y = x + W2 relu(W1 x): the branch gradient is W1^T W2^T g, rescaled to the norm
    of W1^T diag(W1 x > 0) W2^T g."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.relu, self.fc2 = nn.Linear(6, 8, bias=False), nn.ReLU(), \
                nn.Linear(8, 6, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(self.relu(self.fc1(x)))

    skipgrad.register_block(Block, lambda b: [b.fc1], branch_exit=lambda b: b.fc2)
    torch.manual_seed(0)
    block, x, g = Block(), torch.randn(3, 6, requires_grad=True), torch.randn(3, 6)
    with linbp(block, branch_scale=0.5):
        (got,) = torch.autograd.grad(block(x), x, g)
    w1, w2 = block.fc1.weight.detach(), block.fc2.weight.detach()
    lin = g @ w2 @ w1
    true = ((g @ w2) * (x.detach() @ w1.T > 0)) @ w1
    want = g + 0.5 * lin * (true.norm(dim=1) / lin.norm(dim=1)).unsqueeze(1)
    torch.testing.assert_close(got, want)


def test_plain_vgg_linear_relus_from_start():
    torch.manual_seed(0)
    net = randomise_batchnorm(SmallVGG())
    x = torch.rand(2, 1, 28, 28)
    with linbp(net) as context:
        got = input_grad(net, x)
    relus = [i for i, m in enumerate(net.features) if isinstance(m, nn.ReLU)]
    assert context.start == f"features.{relus[3]}"  # 6 trunk ReLUs: index 3
    assert [c.module for c in context.changes] == [f"features.{i}" for i in relus[3:]]

    def reference(h: torch.Tensor) -> torch.Tensor:
        h = net.normalize(h)
        for i, m in enumerate(net.features):
            h = linear_relu(h) if i in relus[3:] else m(h)
        return net.classifier(h)

    torch.testing.assert_close(got, input_grad(reference, x))


def test_forward_values_are_identical(tiny_resnet, tiny_batch):
    x, _ = tiny_batch
    plain = tiny_resnet(x.clone().requires_grad_(True))
    with torch.no_grad():  # compared in the same grad mode: torch may pick kernels by it
        plain_no_grad = tiny_resnet(x)
    with linbp(tiny_resnet, start=0):
        assert torch.equal(tiny_resnet(x.clone().requires_grad_(True)), plain)
        with torch.no_grad():
            assert torch.equal(tiny_resnet(x), plain_no_grad)


# ---- Errors (cleanup and re-entry: test_backward_contract.py) -----------------------------------

def test_nothing_to_change_errors_name_the_model():
    with pytest.raises(NothingToChangeError, match="neither a residual block nor a ReLU .* of "
                                                   "Sequential"):
        linbp(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))  # (a ViT: test_backward_contract.py)


def test_bad_start_lists_the_valid_blocks(tiny_resnet):
    with pytest.raises(ValueError, match="start='layer3.0' is not one of the residual blocks of "
                                         "TinyResNet; valid: layer1.0, layer1.1, layer1.2, "
                                         "layer2.0, layer2.1, layer2.2"):
        linbp(tiny_resnet, start="layer3.0")
    with pytest.raises(ValueError, match="start=6 is out of range: TinyResNet has 6 residual"):
        linbp(tiny_resnet, start=6)
    with pytest.raises(ValueError, match="branch_scale must be a positive number, got 0"):
        linbp(tiny_resnet, branch_scale=0)


def test_changes_and_claims(tiny_resnet):
    context = linbp(tiny_resnet, start="layer2.1")
    assert [c.module for c in context.changes] == ["layer2.1", "layer2.2"]
    assert [name for name, _ in context._claimed] == ["layer2.1.relu", "layer2.2.relu"]


# ---- Composition and other attack code ----------------------------------------------------------

def test_inside_skipgrad_attack_and_torchattacks(tiny_resnet, tiny_batch):
    torchattacks = pytest.importorskip("torchattacks")
    images, labels = tiny_batch
    plain = skipgrad.attack(tiny_resnet, images, labels, "mi", steps=5)
    with linbp(tiny_resnet, start=0):
        ours = skipgrad.attack(tiny_resnet, images, labels, "mi", steps=5)
        theirs = torchattacks.MIFGSM(tiny_resnet, eps=16 / 255, alpha=2 / 255, steps=5)(images,
                                                                                        labels)
    theirs_plain = torchattacks.MIFGSM(tiny_resnet, eps=16 / 255, alpha=2 / 255, steps=5)(images,
                                                                                          labels)
    assert not torch.equal(plain, ours)
    assert not torch.equal((theirs * 255).round(), (theirs_plain * 255).round())
    agree = ((theirs * 255).round() == ours * 255).float().mean().item()
    assert agree > 0.99  # the same MI algorithm with the same LinBP gradient
