"""bpa: gradients against independent computations, release placement, stability, errors,
conflicts with linbp, other attack code (the shared contract: test_backward_contract.py)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import skipgrad
from skipgrad import BackwardConflictError, NothingToChangeError, bpa, linbp, skip_gradient
from skipgrad.models.zoo.architectures import PreActResNet, SmallVGG
from tests.conftest import randomise_batchnorm
from tests.test_linbp import input_grad


# ---- Independent BPA operators: same forward value, gradient of a smooth surrogate -------------

def silu_grad_relu(x: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """relu(x) in value; gradient of x * sigmoid(t x)."""
    smooth = x * torch.sigmoid(t * x)
    return smooth + (torch.relu(x) - smooth).detach()


def soft_max_pool(x: torch.Tensor, pool: nn.MaxPool2d, t: float) -> torch.Tensor:
    """max-pool in value; gradient of sum_j w_j x_j with w = softmax(t * zero-padded window)
    held constant."""
    n, c, h, w = x.shape
    out = pool(x)
    padded = F.pad(x, [pool.padding] * 4)
    k, s = pool.kernel_size, pool.stride
    patches = padded.unfold(2, k, s).unfold(3, k, s)          # (N, C, Ho, Wo, k, k)
    weights = torch.softmax(t * patches.flatten(-2), dim=-1).detach().view_as(patches)
    smooth = (weights * patches).sum((-2, -1))
    return smooth + (out - smooth).detach()


def test_single_window_analytic():
    x = torch.tensor([[[[1.0, 2.0], [0.5, -1.0]]]], requires_grad=True)
    pool = nn.Sequential(nn.MaxPool2d(2))
    with bpa(pool, pool_temperature=3.0):
        (got,) = torch.autograd.grad(pool(x).sum() * 2.0, x)
    torch.testing.assert_close(got, 2.0 * torch.softmax(3.0 * x.detach().flatten(), 0).view(x.shape))


def test_padding_takes_part_in_the_softmax_as_released():
    """3x3/s2/p1 pool on a 2x2 map: one window holding the 4 values and 5 zero paddings."""
    pool = nn.Sequential(nn.MaxPool2d(3, 2, 1))
    x = torch.tensor([[[[0.3, 0.1], [0.2, 0.4]]]], requires_grad=True)
    with bpa(pool) as context:  # release temperature 10 for 3x3 windows
        (got,) = torch.autograd.grad(pool(x).sum(), x)
    assert context.changes[0].what == "max-pool backward: softmax over each window, T=10"
    e = torch.exp(10 * x.detach())
    torch.testing.assert_close(got, e / (e.sum() + 5))


def test_large_activations_give_finite_gradients():
    """The release's exp(T x) overflows to NaN here; the maths is finite (the arg-max limit)."""
    net = nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    x = torch.full((1, 1, 4, 4), 50.0)
    x[0, 0, 0, 0] = 60.0
    x[0, 0, 3, 3] = -1e4
    x.requires_grad_(True)
    with bpa(net, start=0, relu_temperature=5.0):
        (got,) = torch.autograd.grad(net(x).sum(), x)
    assert torch.isfinite(got).all()
    assert got[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-6)  # the top-left window's arg-max
    assert got[0, 0, 3, 3] == 0


def test_silu_derivative_with_temperature_analytic():
    x = torch.linspace(-3, 3, 13).view(1, 1, 1, 13).requires_grad_(True)
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU())
    nn.init.ones_(net[0].weight)
    with bpa(net, relu_temperature=2.0):
        (got,) = torch.autograd.grad(net(x).sum(), x)
    s = torch.sigmoid(2 * x.detach())
    torch.testing.assert_close(got, s + 2 * x.detach() * s * (1 - s))


def test_vgg_gradient_matches_hand_written_bpa():
    torch.manual_seed(0)
    net = randomise_batchnorm(SmallVGG())
    x = torch.rand(2, 1, 28, 28)
    with bpa(net, pool_temperature=2.0) as context:
        got = input_grad(net, x)
    relus = [i for i, m in enumerate(net.features) if isinstance(m, nn.ReLU)]
    assert context.start == f"features.{relus[-2]}"  # the last two trunk ReLUs

    def reference(h: torch.Tensor) -> torch.Tensor:
        h = net.normalize(h)
        for i, m in enumerate(net.features):
            if isinstance(m, nn.MaxPool2d):
                h = soft_max_pool(h, m, 2.0)
            else:
                h = silu_grad_relu(h) if i in relus[-2:] else m(h)
        return net.classifier(h)

    want = input_grad(reference, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert not torch.allclose(got, input_grad(net, x), rtol=1e-2)


def _tv_block(block: nn.Module, x: torch.Tensor, act) -> torch.Tensor:
    identity = x if block.downsample is None else block.downsample(x)
    out = block.bn2(block.conv2(act(block.bn1(block.conv1(x)))))
    return act(out + identity)


def test_resnet_gradient_matches_hand_written_bpa(tiny_resnet, tiny_batch):
    x, _ = tiny_batch
    with bpa(tiny_resnet, relu_temperature=1.5) as context:
        got = input_grad(tiny_resnet, x)
    assert context.start == "layer2.0"
    blocks = [*tiny_resnet.layer1, *tiny_resnet.layer2]

    def reference(h: torch.Tensor) -> torch.Tensor:
        h = tiny_resnet.stem(h)
        for i, block in enumerate(blocks):
            act = (lambda z: silu_grad_relu(z, 1.5)) if i >= 3 else torch.relu
            h = _tv_block(block, h, act)
        return tiny_resnet.head(h)

    torch.testing.assert_close(got, input_grad(reference, x), rtol=1e-5, atol=1e-8)


# ---- Placement on the released models and the other families -----------------------------------

def test_release_placement_on_torchvision_resnet50():
    context = bpa(torchvision.models.resnet50(num_classes=10))
    assert context.start == "layer3.1"
    assert [(c.module, c.what) for c in context.changes] == [
        ("maxpool", "max-pool backward: softmax over each window, T=10"),
        *[(f"layer{s}.{i}.relu", "ReLU backward: SiLU derivative, T=1")
          for s, n in ((3, 6), (4, 3)) for i in range(1 if s == 3 else 0, n)]]


def test_release_placement_on_torchvision_vgg19_bn():
    context = bpa(torchvision.models.vgg19_bn(num_classes=10))
    assert [(c.module, c.what[:8], c.what[-3:]) for c in context.changes] == [
        *[(f"features.{i}", "max-pool", "T=1") for i in (6, 13, 26, 39, 52)],
        ("features.48", "ReLU bac", "T=1"), ("features.51", "ReLU bac", "T=1")]


@pytest.mark.parametrize("build,start,first_relu", [
    (lambda: PreActResNet(2), "layer2.1", "layer2.1.relu"),
    (lambda: timm.create_model("resnet18", num_classes=10), "layer3.0", "layer3.0.act1"),
])
def test_other_families(build, start, first_relu):
    torch.manual_seed(0)
    net = randomise_batchnorm(build())
    x = torch.rand(2, *((1, 28, 28) if isinstance(net, PreActResNet) else (3, 32, 32)))
    context = bpa(net)
    assert context.start == start
    assert [c.module for c in context.changes if "ReLU" in c.what][0] == first_relu
    with context:
        got = input_grad(net, x)
    assert torch.isfinite(got).all() and not torch.allclose(got, input_grad(net, x), rtol=1e-2)


# ---- Errors (the contract: test_backward_contract.py) ------------------------------------------

def test_nothing_to_change_and_bad_arguments(tiny_resnet):
    with pytest.raises(NothingToChangeError, match="bpa found no ReLU from start=None on and no "
                                                   "max-pool in Sequential"):
        bpa(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    with pytest.raises(ValueError, match="start='layer9' is not one of the residual blocks of "
                                         "TinyResNet; valid: layer1.0, layer1.1, layer1.2, "
                                         "layer2.0, layer2.1, layer2.2"):
        bpa(tiny_resnet, start="layer9")
    with pytest.raises(ValueError, match="relu_temperature must be a finite number > 0, got 0"):
        bpa(tiny_resnet, relu_temperature=0)
    with pytest.raises(ValueError, match="ceil_mode"):
        bpa(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)))


def test_conflicts_with_linbp_on_the_same_relu_in_either_order(tiny_resnet):
    for first, second in ((linbp, bpa), (bpa, linbp)):
        with first(tiny_resnet):
            with pytest.raises(BackwardConflictError, match=r"would both redefine the backward "
                                                            r"pass of layer2\.0\.relu \(ReLU\)"):
                second(tiny_resnet).__enter__()
    with bpa(tiny_resnet), skip_gradient(tiny_resnet, 0.5):  # nothing left claimed
        pass


def test_inside_skipgrad_attack_and_torchattacks(tiny_resnet, tiny_batch):
    torchattacks = pytest.importorskip("torchattacks")
    images, labels = tiny_batch
    mi = torchattacks.MIFGSM(tiny_resnet, eps=16 / 255, alpha=2 / 255, steps=5)
    plain, theirs_plain = skipgrad.attack(tiny_resnet, images, labels, "mi", steps=5), \
        mi(images, labels)
    with bpa(tiny_resnet, start=0):
        ours = skipgrad.attack(tiny_resnet, images, labels, "mi", steps=5)
        theirs = mi(images, labels)
    assert not torch.equal(plain, ours)
    assert not torch.equal((theirs * 255).round(), (theirs_plain * 255).round())
    assert ((theirs * 255).round() == ours * 255).float().mean().item() > 0.99
