"""IAA (Zhu et al., ICLR 2022): logits and input gradients against hand-written IAA ResNet-18,
ResNet-50 and DenseNet-121 with the published settings, stages, settings from the registry,
errors and conflicts. The context contract itself is in test_backward_contract.py."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import densenet121, resnet18, resnet50
from torchvision.models.resnet import Bottleneck

import skipgrad
from tests.backward_toys import residual_model
from skipgrad import BackwardConflictError, NothingToChangeError
from skipgrad.backward.registry import known_methods, parse_backward, parse_forward
from tests.conftest import TinyResNet, randomise_batchnorm
from tests.tiny_vits import zoo_vit

# The published settings (TransferAttack model_related/iaa.py, from the paper).
RESNET = dict(beta=20.0, residual_scale=(0.98, 0.87, 0.73, 0.19))
DENSENET = dict(beta=35.0, residual_scale=(0.8, 0.8, 0.8, 0.44))


def _softplus(beta: float):
    return lambda t: F.softplus(t, beta, 20)  # nn.Softplus(beta), as the public implementation


def _iaa_resnet_by_hand(model: nn.Module, x: torch.Tensor, beta: float,
                        residual_scale: tuple[float, ...]) -> torch.Tensor:
    """A torchvision ResNet with Softplus for ReLU and ``lambda * branch + skip`` in every block
    (TransferAttack's forward hook on each block's last BN, ``bn2`` or ``bn3``)."""
    act = _softplus(beta)
    x = model.maxpool(act(model.bn1(model.conv1(x))))
    for layer, scale in zip((model.layer1, model.layer2, model.layer3, model.layer4),
                            residual_scale):
        for block in layer:
            out = act(block.bn1(block.conv1(x)))
            if isinstance(block, Bottleneck):
                out = block.bn3(block.conv3(act(block.bn2(block.conv2(out)))))
            else:
                out = block.bn2(block.conv2(out))
            skip = x if block.downsample is None else block.downsample(x)
            x = act(scale * out + skip)
    return model.fc(torch.flatten(model.avgpool(x), 1))


def _iaa_densenet_by_hand(model: nn.Module, x: torch.Tensor, beta: float,
                          residual_scale: tuple[float, ...]) -> torch.Tensor:
    """A torchvision DenseNet with Softplus for every ReLU module and each dense layer's new
    features times its dense block's lambda; the functional ReLU after ``norm5`` stays a ReLU."""
    act, f = _softplus(beta), model.features
    x = f.pool0(act(f.norm0(f.conv0(x))))
    for i, scale in enumerate(residual_scale, start=1):
        features = [x]
        for layer in getattr(f, f"denseblock{i}").values():
            h = layer.conv1(act(layer.norm1(torch.cat(features, 1))))
            features.append(scale * layer.conv2(act(layer.norm2(h))))
        x = torch.cat(features, 1)
        if i < len(residual_scale):
            t = getattr(f, f"transition{i}")
            x = t.pool(t.conv(act(t.norm(x))))
    x = F.adaptive_avg_pool2d(F.relu(f.norm5(x)), 1)
    return model.classifier(torch.flatten(x, 1))


def _logits_and_gradient(forward, x: torch.Tensor, labels: torch.Tensor):
    x = x.clone().requires_grad_(True)
    logits = forward(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), x)
    return logits.detach(), grad


@pytest.mark.parametrize("build, by_hand, settings", [
    (resnet18, _iaa_resnet_by_hand, RESNET),
    (resnet50, _iaa_resnet_by_hand, RESNET),
    (densenet121, _iaa_densenet_by_hand, DENSENET),
], ids=["resnet18", "resnet50", "densenet121"])
def test_equals_a_hand_written_iaa_network(build, by_hand, settings):
    torch.manual_seed(0)
    model = randomise_batchnorm(build(num_classes=10))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 7])
    reference = _logits_and_gradient(lambda x: by_hand(model, x, **settings), images, labels)
    with skipgrad.iaa(model, **settings) as context:
        ours = _logits_and_gradient(model, images, labels)
    assert len(context.stages) == 4
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    plain = _logits_and_gradient(model, images, labels)
    assert not torch.allclose(plain[1], reference[1], rtol=1e-3, atol=1e-6)
    # Softplus alone is not the whole method: the per-stage scales matter too.
    with skipgrad.iaa(model, beta=settings["beta"]):
        softplus_only = _logits_and_gradient(model, images, labels)
    assert not torch.allclose(softplus_only[1], reference[1], rtol=1e-3, atol=1e-6)


def test_stages_are_parent_containers_in_forward_order_and_first_blocks_are_scaled(tiny_resnet):
    context = skipgrad.iaa(tiny_resnet, residual_scale=(0.5, 0.25))
    assert context.stages == ["layer1", "layer2"]
    scaled = [(c.module, c.what) for c in context.changes if c.what.startswith("residual")]
    assert scaled == [(f"layer1.{i}", "residual branch x 0.5 (stage 1)") for i in range(3)] + \
        [(f"layer2.{i}", "residual branch x 0.25 (stage 2)") for i in range(3)]
    relus = [c.module for c in context.changes if c.what.startswith("ReLU")]
    assert relus == ["stem.2", *(f"layer{s}.{i}.relu" for s in (1, 2) for i in range(3))]
    wrapped = nn.Sequential(nn.Identity(), tiny_resnet)
    assert skipgrad.iaa(wrapped, residual_scale=0.5).stages == ["1.layer1", "1.layer2"]
    # 1 (the default) leaves the branches alone: only the ReLUs change
    assert all(c.what.startswith("ReLU") for c in skipgrad.iaa(tiny_resnet).changes)


def test_one_scale_for_all_stages_equals_the_same_scale_per_stage(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    with skipgrad.iaa(tiny_resnet, residual_scale=0.7):
        one = _logits_and_gradient(tiny_resnet, images, labels)
    with skipgrad.iaa(tiny_resnet, residual_scale=[0.7, 0.7]):
        each = _logits_and_gradient(tiny_resnet, images, labels)
    assert torch.equal(one[0], each[0]) and torch.equal(one[1], each[1])


@pytest.mark.parametrize("make", ["timm:resnet18", "timm:resnetv2_18", "zoo:preact-resnet20",
                                  "zoo:densenet"])
def test_finds_the_stages_of_timm_preactivation_and_zoo_networks(make):
    source, _ = make.split(":")
    model, x = residual_model(make)
    stages = {"timm": 4, "zoo": 3}[source]
    context = skipgrad.iaa(model, residual_scale=(0.5,) * stages)
    assert len(context.stages) == stages
    blocks = [n for n, _, _ in skipgrad.find_blocks(model)]
    assert [c.module for c in context.changes if c.what.startswith("residual")] == blocks
    with torch.no_grad():
        plain = model(x)
        with context:
            changed = model(x)
    assert not torch.allclose(changed, plain) and torch.equal(model(x), plain)


def test_settings_through_the_registry_and_the_forward_notation():
    plan = parse_forward("iaa:beta=32,residual_scale=0.89/0.88/0.7/0.2")
    assert plan.label == "iaa:beta=32,residual_scale=0.89/0.88/0.7/0.2"
    assert parse_forward(plan.label) == plan
    assert dict(plan.methods[0].settings)["residual_scale"] == (0.89, 0.88, 0.7, 0.2)
    assert plan.methods[0].to_json() == {"method": "iaa", "settings": {
        "beta": 32.0, "residual_scale": (0.89, 0.88, 0.7, 0.2)}}
    model = resnet18()
    (context,) = plan.build(model)
    assert context.residual_scale == (0.89, 0.88, 0.7, 0.2) and context.beta == 32
    with pytest.raises(ValueError, match=re.escape(
            "iaa:residual_scale: '0.9/x' is not float|float/float/...")):
        parse_forward("iaa:residual_scale=0.9/x")
    with pytest.raises(ValueError, match=re.escape(
            "iaa is a forward method (--forward iaa, attack(..., forward=...)), not a backward "
            "method (known: bpa, linbp, pna, tgr)")):
        parse_backward("iaa")
    with pytest.raises(ValueError, match="linbp is a backward method"):
        parse_forward("linbp")
    assert [m.name for m in known_methods()] == ["linbp", "bpa", "pna", "tgr"]
    assert [m.name for m in known_methods("forward")] == ["ghost", "iaa"]


def test_bad_settings_name_the_value_and_the_model():
    model = resnet18()
    with pytest.raises(ValueError, match=re.escape(
            "iaa: residual_scale has 3 values but ResNet has 4 stages of residual blocks "
            "(layer1, layer2, layer3, layer4); give one value per stage in forward order, or one "
            "number for all")):
        skipgrad.iaa(model, residual_scale=(0.9, 0.8, 0.7))
    with pytest.raises(ValueError, match="^beta must be a positive number, got 0$"):
        skipgrad.iaa(model, beta=0)
    with pytest.raises(ValueError, match="residual_scale must be a positive number or one per "
                                         "stage, got"):
        skipgrad.iaa(model, residual_scale=(0.9, -1, 0.7, 0.1))
    vgg = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    assert len(skipgrad.iaa(vgg).changes) == 1  # a plain ReLU network: Softplus only
    with pytest.raises(ValueError, match=re.escape(
            "iaa: residual_scale=0.5 scales residual branches, but Sequential has none that iaa "
            "can find; leave residual_scale=1")):
        skipgrad.iaa(vgg, residual_scale=0.5)
    with pytest.raises(NothingToChangeError, match="^iaa found no ReLU and no residual branch"):
        skipgrad.iaa(zoo_vit())


def test_conflicts_with_methods_that_claim_relus_and_composes_with_sgm(tiny_resnet, tiny_batch):
    for other in (skipgrad.bpa(tiny_resnet), skipgrad.linbp(tiny_resnet)):
        with skipgrad.iaa(tiny_resnet), pytest.raises(
                BackwardConflictError, match=rf"^{other.method} and iaa would both redefine the "
                                             rf"backward pass of "):
            other.__enter__()
    images, labels = tiny_batch
    with skipgrad.iaa(tiny_resnet, residual_scale=0.5):
        iaa_only = _logits_and_gradient(tiny_resnet, images, labels)
        with skipgrad.skip_gradient(tiny_resnet, 0.5):
            both = _logits_and_gradient(tiny_resnet, images, labels)
    assert torch.equal(both[0], iaa_only[0]) and not torch.allclose(both[1], iaa_only[1])
    with pytest.raises(BackwardConflictError, match="^iaa and iaa would both redefine the "
                                                    "forward pass of stem.2 "):
        with skipgrad.iaa(tiny_resnet), skipgrad.iaa(tiny_resnet, beta=5):
            pass


def test_tiny_resnet_by_hand_with_a_float64_model():
    """Softplus and the scale keep the model's dtype (no float32 draws or constants leak in)."""
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyResNet()).double()
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    with skipgrad.iaa(model, beta=10, residual_scale=(0.5, 0.3)), torch.no_grad():
        ours = model(x)
    act = _softplus(10)
    with torch.no_grad():
        h = act(model.stem[1](model.stem[0](x)))
        for layer, scale in ((model.layer1, 0.5), (model.layer2, 0.3)):
            for block in layer:
                out = block.bn2(block.conv2(act(block.bn1(block.conv1(h)))))
                skip = h if block.downsample is None else block.downsample(h)
                h = act(scale * out + skip)
        reference = model.head(h)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def _mobilenet_by_hand(net: nn.Module, x: torch.Tensor, branch: float, skip: torch.Tensor | float
                       ) -> torch.Tensor:
    """torchvision MobileNetV2's forward, written out: each residual block returns
    ``branch * conv(x) + skip * x`` (IAA: ``branch`` = lambda, ``skip`` = 1; Ghost: ``branch`` = 1,
    ``skip`` = its per-channel factor), every other block as it is."""
    for block in net.features:
        if getattr(block, "use_res_connect", False):
            x = branch * block.conv(x) + skip * x
        else:
            x = block(x)
    return net.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_mobilenetv2_residual_branches_are_scaled_and_eroded_as_written_out():
    """MobileNetV2's inverted residuals (identity skip, ReLU6 branches) declare their branch exit:
    IAA scales the branch, Ghost erodes the skip; LinBP, with no ReLU to linearise there,
    still refuses them."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    net = randomise_batchnorm(mobilenet_v2(num_classes=10, width_mult=0.25)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = _mobilenet_by_hand(net, x, 0.4, 1.0)
        with skipgrad.iaa(net, residual_scale=0.4) as context:
            torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)
    assert context.stages == ["features"]
    with pytest.raises(NothingToChangeError, match="ReLUs in the branch"):
        skipgrad.linbp(net)
    # Ghost erodes every residual block's identity skip (its factors are checked in
    # tests/test_ghost.py); the eroded network differs from the plain one.
    with torch.no_grad(), skipgrad.ghost(net, erosion=0.3, seed=1) as ghost:
        assert len(ghost.changes) == sum(getattr(b, "use_res_connect", False) for b in net.features)
        eroded = net(x)
    with torch.no_grad():
        assert not torch.allclose(eroded, net(x))
