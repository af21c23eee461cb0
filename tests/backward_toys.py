"""Toy backward-pass methods for testing the plumbing (registry, attack loop, command line)
independently of the real methods: one that applies to every ReLU network, one that applies only
to attention layers (and so refuses CNNs, as PNA does)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from skipgrad.backward import registry
from skipgrad.backward.sgm import scale_gradient
from skipgrad.backward.base import (BackwardContext, Change, HandleGroup, NothingToChangeError,
                                    model_label)


class ScaleReLU(BackwardContext):
    """Multiplies the gradient into every ReLU at or after module ``start`` by ``scale``
    (claims those ReLUs); ``skip`` leaves out the first ``skip`` of them."""

    method = "scalerelu"

    def __init__(self, model: nn.Module, *, scale: float = 0.5, start: str | None = None,
                 skip: int = 0) -> None:
        super().__init__(model)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        names = [n for n, _ in model.named_modules()]
        if start is not None and start not in names:
            raise ValueError(f"scalerelu: no module {start!r} in {model_label(model)}")
        after = names[names.index(start):] if start is not None else names
        modules = dict(model.named_modules())
        relus = [(n, modules[n]) for n in after if isinstance(modules[n], nn.ReLU)][skip:]
        if not relus:
            raise NothingToChangeError(f"scalerelu found no ReLU in {model_label(model)}")

        def hook(_m, args):
            return scale_gradient(args, scale)

        attachers = [lambda m=m: HandleGroup([m.register_forward_pre_hook(hook)])
                     for _, m in relus]
        self._set_plan(attachers, [Change(n, f"ReLU gradient x {scale:g}") for n, _ in relus],
                       relus)


class AttentionOnly(BackwardContext):
    """Halves the gradient out of every nn.MultiheadAttention; refuses models without one."""

    method = "attnonly"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        if not found:
            raise NothingToChangeError(f"attnonly found no attention layer in "
                                       f"{model_label(model)}; it applies to transformers")
        self._set_plan([], [Change(n, "attention") for n, _ in found], found)


def halve_by_hand(model: nn.Module, scale: float = 0.5) -> list:
    """What ScaleReLU(model, scale=scale) does, written independently: every ReLU's input is
    replaced by ``x0 + scale * (x - x0)`` with ``x0 = x.detach()`` (same value, gradient x scale)."""
    def hook(_m, args):
        x = args[0]
        return (x.detach() + scale * (x - x.detach()),)

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]


@pytest.fixture
def toy_methods(monkeypatch):
    """The registry with the two toys added, restored after the test."""
    fresh = registry.MethodRegistry()
    for info in registry.known_methods(None):
        fresh.register(info)
    monkeypatch.setattr(registry, "METHODS", fresh)
    registry.register_method("scalerelu", ScaleReLU, summary="ReLU gradients x scale",
                             settings={"scale": float, "start": (str, None), "skip": int})
    registry.register_method("attnonly", AttentionOnly, summary="attention layers only")
    return fresh



def residual_model(make: str) -> tuple[nn.Module, torch.Tensor]:
    """``timm:NAME`` (10 classes, 2x3x32x32 input) or ``zoo:NAME`` (the zoo architecture,
    2x1x28x28 input) with random weights seeded 0, in eval mode, and a random input batch."""
    source, name = make.split(":")
    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(name, num_classes=10).eval(), torch.rand(2, 3, 32, 32)
    from skipgrad.models.zoo import build_model

    return build_model(name).eval(), torch.rand(2, 1, 28, 28)
