"""Ghost networks (Li et al., AAAI 2020): skip erosion against a hand-written ghost ResNet, the
factors' range, shape and freshness, seeds, per-image streams inside an attack, dropout erosion,
errors and conflicts. The context contract itself is in test_backward_contract.py."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck

import skipgrad
from skipgrad import BackwardConflictError, NothingToChangeError
from skipgrad.attacks.randomness import stream_factory
from tests.backward_toys import residual_model
from tests.conftest import TinyResNet, randomise_batchnorm

EROSION = 0.22
# Hand-written and hooked forwards add the eroded skip in a different order (F + xi*s against
# (F + (xi - 1)*s) + s): equal up to float32 rounding, amplified through 8 to 16 blocks.
CLOSE = dict(rtol=1e-4, atol=1e-5)


def _ghost_resnet_by_hand(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """A torchvision ResNet whose every block adds ``xi * skip`` (TransferAttack's GhostBasicBlock
    and GhostBottleneck placement: after the projection, before the final ReLU), with one (N, C)
    draw per block, in forward order, from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    x = model.maxpool(torch.relu(model.bn1(model.conv1(x))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            out = torch.relu(block.bn1(block.conv1(x)))
            if isinstance(block, Bottleneck):
                out = block.bn3(block.conv3(torch.relu(block.bn2(block.conv2(out)))))
            else:
                out = block.bn2(block.conv2(out))
            skip = x if block.downsample is None else block.downsample(x)
            draws = torch.rand(skip.shape[:2], generator=generator)
            xi = (1 - EROSION + 2 * EROSION * draws)[:, :, None, None]
            x = torch.relu(out + xi * skip)
    return model.fc(torch.flatten(model.avgpool(x), 1))


def _logits_and_gradient(forward, x: torch.Tensor, labels: torch.Tensor):
    x = x.clone().requires_grad_(True)
    logits = forward(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels), x)
    return logits.detach(), grad


@pytest.mark.parametrize("build", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_equals_a_hand_written_ghost_resnet(build):
    torch.manual_seed(0)
    model = randomise_batchnorm(build(num_classes=10))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 7])
    reference = _logits_and_gradient(lambda x: _ghost_resnet_by_hand(model, x, seed=5), images,
                                     labels)
    with skipgrad.ghost(model, erosion=EROSION, seed=5):
        ours = _logits_and_gradient(model, images, labels)
    plain = _logits_and_gradient(model, images, labels)
    torch.testing.assert_close(ours[0], reference[0], **CLOSE)
    torch.testing.assert_close(ours[1], reference[1], **CLOSE)
    assert not torch.allclose(plain[0], reference[0], **CLOSE)  # the erosion did something


def _probe(projection: bool) -> nn.Module:
    """One BasicBlock whose branch outputs 0 and whose skip is the input itself (identity, or a
    1x1 projection with identity weights): for x > 0 its output is ``xi * x``."""
    torch.manual_seed(0)
    down = None
    if projection:
        down = nn.Conv2d(64, 64, 1, bias=False)
        down.weight.data.copy_(torch.eye(64)[:, :, None, None])
    block = BasicBlock(64, 64, downsample=down).eval()
    block.bn2.weight.data.zero_()
    return nn.Sequential(block)


def _factors(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x) / x


@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
def test_factors_per_image_and_channel_in_range_and_fresh_at_every_forward(projection):
    model = _probe(projection)
    x = 0.5 + torch.rand(8, 64, 3, 3, generator=torch.Generator().manual_seed(2))
    with skipgrad.ghost(model, erosion=EROSION, seed=0):
        first, second = _factors(model, x), _factors(model, x)
    per_channel = first[:, :, :1, :1]
    torch.testing.assert_close(first, per_channel.expand_as(first), rtol=1e-6, atol=0)
    assert per_channel.min() >= 1 - EROSION - 1e-6 and per_channel.max() <= 1 + EROSION + 1e-6
    # 512 uniform draws spread over the whole range, centred on 1
    assert per_channel.min() < 1 - EROSION + 0.02 and per_channel.max() > 1 + EROSION - 0.02
    assert abs(per_channel.mean().item() - 1) < 0.03
    assert not torch.allclose(first[0], first[1])  # each image its own factors
    assert not torch.allclose(first, second)  # a new ghost at every forward
    assert torch.equal(_factors(model, x), torch.ones_like(x))  # restored on exit


def test_same_seed_same_draws_and_each_entry_replays_them():
    model, x = _probe(False), torch.ones(2, 64, 2, 2)
    runs = []
    for seed in (3, 3, 4):
        with skipgrad.ghost(model, seed=seed):
            runs.append(torch.stack([_factors(model, x), _factors(model, x)]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    context = skipgrad.ghost(model, seed=3)
    for _ in range(2):
        with context:
            assert torch.equal(torch.stack([_factors(model, x), _factors(model, x)]), runs[0])


def test_draws_never_touch_the_global_random_state():
    model, x = _probe(False), torch.ones(2, 64, 2, 2)
    state = torch.get_rng_state()
    with skipgrad.ghost(model, dropout=0.1):  # no seed: follows torch.initial_seed()
        _factors(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(11)
    with skipgrad.ghost(model):
        unseeded = _factors(model, x)
    with skipgrad.ghost(model, seed=11):
        assert torch.equal(_factors(model, x), unseeded)


def test_inside_an_attack_each_image_draws_from_its_own_stream():
    """An image's factors depend on the seed and its id, not on the batch it sits in; a batch of
    k copies of the images draws k factors per image."""
    model = _probe(False)
    x = torch.ones(3, 64, 2, 2)
    factors = {}
    for ids in ([5, 7, 9], [7]):
        context = skipgrad.ghost(model)
        context.follow_attack(stream_factory(0, ids))
        with context:
            factors[len(ids)] = _factors(model, x[:len(ids)])
    assert torch.equal(factors[1][0], factors[3][1])
    context = skipgrad.ghost(model)
    context.follow_attack(stream_factory(0, [5, 7]))
    with context:
        copies = _factors(model, torch.ones(4, 64, 2, 2))  # [5, 7, 5, 7]
        with pytest.raises(ValueError, match="per image for 2 attacked images, but the model "
                                             "was called on a batch of 3"):
            model(torch.ones(3, 64, 2, 2))
    assert not torch.equal(copies[0], copies[2])
    own_seed = skipgrad.ghost(model, seed=1)
    own_seed.follow_attack(stream_factory(0, [5, 7, 9]))
    with own_seed:
        assert not torch.equal(_factors(model, x), factors[3])  # seed= overrides the run seed


def test_attack_with_ghost_is_reproducible_and_follows_the_seed(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    runs = [skipgrad.attack(tiny_resnet, images, labels, "ifgsm", steps=3, forward="ghost",
                            seed=seed) for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    plain = skipgrad.attack(tiny_resnet, images, labels, "ifgsm", steps=3, seed=0)
    assert not torch.equal(runs[0], plain)


def _dropped_by_hand(model: nn.Sequential, x: torch.Tensor, rate: float, seed: int):
    generator, convs = torch.Generator().manual_seed(seed), 0
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            if convs:
                keep = torch.rand(x.shape, generator=generator) >= rate
                x = x * keep / (1 - rate)
            convs += 1
        x = layer(x)
    return x


def test_dropout_erosion_on_every_convolution_input_but_the_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    images, labels = torch.rand(2, 3, 16, 16), torch.tensor([0, 3])
    model(images)
    with skipgrad.ghost(model, dropout=0.3, seed=2) as context:
        ours = _logits_and_gradient(model, images, labels)
    reference = _logits_and_gradient(lambda x: _dropped_by_hand(model, x, 0.3, seed=2), images,
                                     labels)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert [c.module for c in context.changes] == ["2", "5"]


def test_dropout_and_skip_erosion_together_on_a_resnet(tiny_resnet):
    context = skipgrad.ghost(tiny_resnet, dropout=0.01)
    blocks = [c.module for c in context.changes if c.what.startswith("skip")]
    convs = [c.module for c in context.changes if c.what.startswith("input dropout")]
    assert blocks == [f"layer{s}.{i}" for s in (1, 2) for i in range(3)]
    assert "stem.0" not in convs and "layer2.0.downsample.0" in convs and len(convs) == 13


@pytest.mark.parametrize("make", ["timm:resnet18", "timm:resnetv2_18", "zoo:resnet20",
                                  "zoo:preact-resnet20"])
def test_applies_to_timm_preactivation_and_zoo_resnets(make):
    model, x = residual_model(make)
    blocks = [n for n, _, _ in skipgrad.find_blocks(model)]
    context = skipgrad.ghost(model, seed=0)
    assert [c.module for c in context.changes] == blocks and blocks
    with torch.no_grad():
        plain = model(x)
        with context:
            eroded = model(x)
        assert not torch.allclose(eroded, plain) and torch.equal(model(x), plain)


def test_bad_settings_and_models_it_cannot_change():
    torch.manual_seed(0)
    model = TinyResNet()
    for kwargs, message in [({"erosion": 1.5}, "erosion must be a number in [0, 1], got 1.5"),
                            ({"dropout": 1.0}, "dropout must be a rate in (0, 1) or None"),
                            ({"seed": True}, "seed must be an integer or None, got True")]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            skipgrad.ghost(model, **kwargs)
    with pytest.raises(NothingToChangeError,
                       match="^ghost with erosion=0 and no dropout changes nothing in TinyResNet$"):
        skipgrad.ghost(model, erosion=0)
    from torchvision.models import densenet121  # dense layers have no skip path to erode

    with pytest.raises(NothingToChangeError, match="no residual block with a known skip path in "
                                                   "DenseNet;.*pass dropout=... for dropout"):
        skipgrad.ghost(densenet121())
    assert skipgrad.ghost(densenet121(), erosion=0, dropout=0.01).changes


def test_two_ghosts_on_one_model_conflict_and_ghost_composes_with_iaa(tiny_resnet, tiny_batch):
    images, _ = tiny_batch
    first, second = skipgrad.ghost(tiny_resnet, seed=0), skipgrad.ghost(tiny_resnet, seed=1)
    with first, pytest.raises(BackwardConflictError,
                              match=r"^ghost and ghost would both redefine the forward pass of "
                                    r"layer1\.0 \(BasicBlock\); use one of them for this module$"):
        second.__enter__()
    outputs = []
    for order in ("ghost first", "iaa first"):
        contexts = [skipgrad.ghost(tiny_resnet, seed=0),
                    skipgrad.iaa(tiny_resnet, beta=10, residual_scale=(0.5, 0.25))]
        with contexts[0 if order == "ghost first" else 1], \
                contexts[1 if order == "ghost first" else 0], torch.no_grad():
            outputs.append(tiny_resnet(images))
    with torch.no_grad():  # lambda * F(x) + xi * skip, whichever was entered first
        reference = _tiny_ghost_iaa_by_hand(tiny_resnet, images, seed=0, beta=10,
                                            scales=(0.5, 0.25))
    for output in outputs:
        torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-6)


def _tiny_ghost_iaa_by_hand(model: TinyResNet, x: torch.Tensor, seed: int, beta: float,
                            scales: tuple[float, float]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)

    def softplus(t: torch.Tensor) -> torch.Tensor:
        return F.softplus(t, beta, 20)

    x = softplus(model.stem[1](model.stem[0](x)))
    for layer, scale in zip((model.layer1, model.layer2), scales):
        for block in layer:
            out = scale * block.bn2(block.conv2(softplus(block.bn1(block.conv1(x)))))
            skip = x if block.downsample is None else block.downsample(x)
            xi = 1 - EROSION + 2 * EROSION * torch.rand(skip.shape[:2], generator=generator)
            x = softplus(out + xi[:, :, None, None] * skip)
    return model.head(x)
