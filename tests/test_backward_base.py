"""The shared context contract of the backward-pass methods (skipgrad.backward.base)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import skipgrad
from skipgrad.backward.base import BackwardConflictError, BackwardContext, Change, HandleGroup


class _HalveReLU(BackwardContext):
    """A toy method that claims every ReLU and halves the gradient through it."""

    method = "halve"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
        hook = lambda _m, grad_in, _grad_out: (grad_in[0] * 0.5,)  # noqa: E731
        attachers = [lambda m=m: HandleGroup([m.register_full_backward_hook(hook)])
                     for _, m in relus]
        self._set_plan(attachers, [Change(n, "gradient x 0.5") for n, _ in relus], relus)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def _grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    model(x).sum().backward()
    return x.grad


def test_two_contexts_claiming_one_module_conflict_and_release_their_claims():
    model, x = _net(), torch.randn(2, 3)
    first, second = _HalveReLU(model), _HalveReLU(model)
    with first:
        with pytest.raises(BackwardConflictError, match="halve and halve would both redefine "
                                                         "the backward pass of 1 \\(ReLU\\)"):
            second.__enter__()
        assert not second.active
    with second:  # the first one's claims are gone with it
        assert torch.allclose(_grad(model, x), 0.5 * _grad(_unhooked(model), x))


def _unhooked(model: nn.Module) -> nn.Module:
    clone = _net()
    clone.load_state_dict(model.state_dict())
    return clone


def test_failed_enter_leaves_nothing_attached():
    model, x = _net(), torch.randn(2, 3)
    plain = _grad(model, x)
    blocker = _HalveReLU(model)
    with blocker, pytest.raises(BackwardConflictError):
        _HalveReLU(model).__enter__()
    assert torch.equal(_grad(model, x), plain)


def test_conflict_error_is_a_value_error_and_exported():
    assert issubclass(skipgrad.BackwardConflictError, ValueError)
    assert issubclass(skipgrad.NoResidualBlockError, skipgrad.NothingToChangeError)
    assert issubclass(skipgrad.NothingToChangeError, ValueError)


def test_sgm_lists_what_it_changes():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18()
    context = skipgrad.skip_gradient(model, 0.2)
    names = [c.module for c in context.changes]
    assert names == [b.name for b in context.blocks if b.decayed]
    assert "layer1.1" in names and "layer1.0" not in names
