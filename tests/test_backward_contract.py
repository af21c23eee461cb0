"""The context contract (docs/design.md: backward/base.py), checked once for every registered method.

Each method in ``registry.METHODS`` has a case here: a tiny model it applies to and one it must
refuse. A method registered without a case fails ``test_every_registered_method_has_a_case``, so a
new method is held to the contract as soon as it is registered. Backward methods keep forward
values; forward methods (``changes_forward``: Ghost, IAA) change them, and both kinds restore the
model exactly on exit. What is specific to one method (its gradient against an independent
computation, its settings, its conflicts) stays in its own test file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import skipgrad
from skipgrad import NoAttentionError, NothingToChangeError, skip_gradient
from skipgrad.backward.base import BackwardContext
from skipgrad.backward.registry import METHODS, parse_plan
from tests.conftest import TinyResNet, randomise_batchnorm
from tests.tiny_vits import images_for, input_gradient, relative_difference, timm_vit, zoo_vit

Batch = tuple[nn.Module, torch.Tensor, torch.Tensor]


def _resnet() -> Batch:
    torch.manual_seed(0)
    images = (torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1)) * 255).round()
    return randomise_batchnorm(TinyResNet()), images / 255, torch.tensor([0, 3, 5, 9])


def _resnet_with_pool() -> Batch:
    """The tiny ResNet with a 3x3/s2 max-pool after the stem (BPA softens pools and ReLUs)."""
    net, images, labels = _resnet()
    pooled = nn.Sequential(net.stem, nn.MaxPool2d(3, 2, 1), net.layer1, net.layer2, net.head)
    return pooled.eval(), images, labels


def _vit() -> Batch:
    model = timm_vit()
    assert all(block.attn.fused_attn for block in model.blocks)  # timm's default path
    return (model, *images_for(model))


def _plain_resnet() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet()


def _plain_cnn() -> nn.Module:
    """Convolutions and ReLUs without any skip connection."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.LazyLinear(10)).eval()


@dataclass(frozen=True)
class Case:
    """A model the method applies to (with a batch), and one it refuses with ``refusal``."""

    applies: Callable[[], Batch]
    refused: Callable[[], nn.Module]
    refusal: str  # the whole one-line message
    error: type[NothingToChangeError] = NothingToChangeError
    draws: bool = False  # random at every forward (Ghost): inside an attack, per-image streams


CASES: dict[str, Case] = {
    "linbp": Case(_resnet, zoo_vit,
                  "linbp cannot rewire the residual blocks of SmallViT "
                  "(timm.vision_transformer.Block): it needs ResNet-style blocks with one branch "
                  "entry, a registered branch_exit (see skipgrad.register_block) and ReLUs in "
                  "the branch"),
    "bpa": Case(_resnet_with_pool, zoo_vit,
                "bpa found no ReLU from start='vit.blocks.1' on and no max-pool in SmallViT; BPA "
                "changes the backward of ReLUs and max-pools"),
    "pna": Case(_vit, _plain_resnet,
                "pna found no self-attention module in TinyResNet; it applies to vision "
                "transformers (timm Attention, nn.MultiheadAttention)", NoAttentionError),
    "tgr": Case(_vit, _plain_resnet,
                "tgr found no self-attention module in TinyResNet; it applies to vision "
                "transformers (timm Attention, nn.MultiheadAttention)", NoAttentionError),
    "ghost": Case(_resnet, _plain_cnn,
                  "ghost found no residual block with a known skip path in Sequential; Ghost "
                  "networks erode skip connections (register a block type with "
                  "skipgrad.register_block(..., branch_exit=..., skip_path=...)), or pass "
                  "dropout=... for dropout erosion", draws=True),
    "iaa": Case(_resnet, zoo_vit,
                "iaa found no ReLU and no residual branch it can scale in SmallViT; IAA applies to "
                "ReLU networks with residual or dense blocks (ResNets, DenseNets)"),
}
NAMES = METHODS.names()


def _build(name: str, model: nn.Module) -> BackwardContext:
    (context,) = parse_plan(name, METHODS.get(name).kind).build(model)
    return context


def _state(model: nn.Module) -> list[tuple]:
    """What a context may change on a model's modules: hooks, an instance ``forward``, switches."""
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(m._backward_pre_hooks), m.__dict__.get("forward"), getattr(m, "fused_attn", None))
            for m in model.modules()]


def _raise_inside(context: BackwardContext) -> torch.utils.hooks.RemovableHandle:
    """A forward hook that raises in the first leaf module of the first changed module: for an
    attention module that is inside its forward, while the method's machinery is active."""
    changed = context.model.get_submodule(context.changes[0].module)
    leaf = next(m for m in changed.modules() if not list(m.children()))
    return leaf.register_forward_hook(lambda *_: 1 / 0)


@dataclass
class Setup:
    """A method's context built on its model, with what the model was and did before."""

    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    context: BackwardContext
    state: list[tuple]
    logits: torch.Tensor
    plain: torch.Tensor

    def gradient(self, context: BackwardContext | None = None) -> torch.Tensor:
        return input_gradient(self.model, self.images, self.labels, context)[1]


def _setup(name: str) -> Setup:
    model, images, labels = CASES[name].applies()
    state = _state(model)
    logits, plain = input_gradient(model, images, labels)
    return Setup(model, images, labels, _build(name, model), state, logits, plain)


def test_every_registered_method_has_a_case():
    assert sorted(METHODS.names()) == sorted(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_forward_as_declared_gradient_changed_and_restored_on_exit(name):
    s = _setup(name)
    assert s.context.changes
    assert s.context.changes_forward == (METHODS.get(name).kind == "forward")
    logits, grad = input_gradient(s.model, s.images, s.labels, s.context)
    if s.context.changes_forward:
        assert relative_difference(logits, s.logits) > 1e-3
    else:
        assert torch.allclose(logits, s.logits, rtol=0, atol=1e-6)
    assert relative_difference(grad, s.plain) > 1e-3  # never a silent no-op
    assert _state(s.model) == s.state and not s.context._handles
    after_logits, after_grad = input_gradient(s.model, s.images, s.labels)
    assert torch.equal(after_logits, s.logits) and torch.equal(after_grad, s.plain)


@pytest.mark.parametrize("name", NAMES)
def test_restored_when_the_forward_raises_inside_a_changed_module(name):
    s = _setup(name)
    boom = _raise_inside(s.context)
    with pytest.raises(ZeroDivisionError), s.context:
        s.model(s.images)
    boom.remove()
    assert torch._C._len_torch_function_stack() == 0  # no mode left pushed
    assert _state(s.model) == s.state
    assert torch.equal(s.gradient(), s.plain)
    with s.context:  # and the context still works afterwards
        assert relative_difference(s.gradient(), s.plain) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_re_enterable_with_the_same_gradient_but_not_while_active(name):
    s = _setup(name)
    with s.context:
        first = s.gradient()
        with pytest.raises(RuntimeError, match=f"^this {name} context is already active$"):
            s.context.__enter__()
    assert torch.equal(s.gradient(s.context), first)


@pytest.mark.parametrize("name", NAMES)
def test_refusal_is_one_line_naming_the_model(name):
    case = CASES[name]
    model = case.refused()
    before = _state(model)
    with pytest.raises(case.error, match=f"^{re.escape(case.refusal)}$") as error:
        _build(name, model)
    assert isinstance(error.value, NothingToChangeError) and isinstance(error.value, ValueError)
    assert "\n" not in str(error.value)
    assert _state(model) == before


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_skip_gradient_in_either_order(name):
    model, images, labels = CASES[name].applies()
    _, method_only = input_gradient(model, images, labels, _build(name, model))
    _, sgm_only = input_gradient(model, images, labels, skip_gradient(model, 0.5))
    both = []
    for first, second in ((skip_gradient(model, 0.5), _build(name, model)),
                          (_build(name, model), skip_gradient(model, 0.5))):
        with first:
            both.append(input_gradient(model, images, labels, second)[1])
    torch.testing.assert_close(both[0], both[1], rtol=1e-5, atol=1e-7)
    for alone in (method_only, sgm_only):
        assert relative_difference(both[0], alone) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_attack_by_name_equals_the_context_around_it_and_differs_from_plain(name):
    model, images, labels = CASES[name].applies()
    with _build(name, model):
        around = skipgrad.attack(model, images, labels, "mi", steps=3)
    by_name = skipgrad.attack(model, images, labels, "mi", steps=3,
                              **{METHODS.get(name).kind: name})
    plain = skipgrad.attack(model, images, labels, "mi", steps=3)
    assert not torch.equal(by_name, plain) and not torch.equal(around, plain)
    if CASES[name].draws:  # by name, the draws follow the attack's per-image streams instead
        again = skipgrad.attack(model, images, labels, "mi", steps=3,
                                **{METHODS.get(name).kind: name})
        assert torch.equal(by_name, again)
    else:
        assert torch.equal(by_name, around)
