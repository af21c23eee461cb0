"""``skip_gradient``: the Skip Gradient Method as a context around any gradient computation.

Wu et al., "Skip Connections Matter: On the Transferability of Adversarial Examples Generated with
ResNets", ICLR 2020 (arXiv:2002.05990). For a block ``y = s(x) + f(x)`` the backward pass uses
``dy/dx = ds/dx + gamma * df/dx``; forward values are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from skipgrad.backward.base import (Attacher, BackwardContext, Change, HandleGroup,
                                    NothingToChangeError, Removable, model_label)
from skipgrad.backward.blocks import BLOCKS
from skipgrad.backward.official import official_attachers
from skipgrad.gamma import check_gamma, parse_gamma  # noqa: F401 (re-exported)


class NoResidualBlockError(NothingToChangeError):
    """The model holds no block that skip_gradient knows how to decay."""


class NoDecayedBlockError(NoResidualBlockError):
    """The model holds residual blocks, but SGM's rule decays none of them: every one is the first
    block of its stage (e.g. timm ``resnet10t``, one block per stage), which the authors' rule
    leaves undecayed. Refused rather than run as the plain gradient under an SGM label."""


@dataclass(frozen=True)
class BlockInfo:
    """One residual or dense block found in a model, and whether SGM decays it."""

    name: str
    kind: str
    decayed: bool


class _ScaleGradient(torch.autograd.Function):
    """Identity forward (a copy, so later in-place ops are safe); gradient times ``gamma``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gamma: float) -> torch.Tensor:
        ctx.gamma = gamma
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.gamma, None


def scale_gradient(value: Any, gamma: float) -> Any:
    """Apply the gradient scaling to every tensor in a (nested) list/tuple/dict of inputs."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad and torch.is_grad_enabled():
            return _ScaleGradient.apply(value, gamma)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(scale_gradient(v, gamma) for v in value)
    if isinstance(value, dict):
        return {k: scale_gradient(v, gamma) for k, v in value.items()}
    return value


def stage_of(block_name: str) -> str:
    """The stage a block belongs to: its parent container (``layer2`` for ``layer2.3``, a
    DenseNet's ``features.denseblock1`` for its dense layers, timm's ``stages.1.blocks``). The
    blocks of one stage are those that share it, in module (forward) order."""
    return block_name.rpartition(".")[0]


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, BlockInfo]]:
    """Every registered block in ``model`` that has a skip path, with the SGM default decision.

    The default follows the authors' choice: the first block of each stage (:func:`stage_of`, the
    first block found in each parent container) keeps its full gradient unless its kind says
    otherwise.
    """
    modules = dict(model.named_modules())
    seen_parents: set[str] = set()
    found = []
    for name, module in modules.items():
        kind = BLOCKS.lookup(module)
        if kind is None or not kind.branch_entries(module):
            continue
        parent = stage_of(name)
        first_in_stage = parent not in seen_parents
        seen_parents.add(parent)
        decayed = kind.decay_first_in_stage or not first_in_stage
        found.append((name, module, BlockInfo(name, kind.name, decayed)))
    return found


def sgm_blocks(model: nn.Module, *, official: bool = False) -> list[BlockInfo]:
    """The blocks :func:`skip_gradient` would find in ``model`` (with whether each is decayed),
    or the reason it cannot change the model's gradient at all.

    The one "can SGM work on this model" check: the command line, ``--sgm auto``, the demo and
    ``inspect`` all call it before any work, and it applies exactly the rules ``skip_gradient``
    applies (it builds one; nothing is attached).

    Raises:
        NoResidualBlockError: no residual or dense block at all.
        NoDecayedBlockError: blocks, but none that the rule decays (a subclass of the above).
        UnsupportedOfficialModelError: ``official=True`` on a model the release does not cover.
    """
    return skip_gradient(model, 1.0, official=official).blocks


class skip_gradient(BackwardContext):  # noqa: N801 - a context manager named like torch.no_grad
    """Decay the gradient through the residual branches of ``model`` by ``gamma`` (SGM).

    Use as a context around the forward *and* backward pass::

        with skip_gradient(model, gamma=0.2):
            loss = F.cross_entropy(model(x), y)
            loss.backward()

    Args:
        model: any module containing registered residual or dense blocks, at any depth.
        gamma: decay factor in (0, 1]; 1 gives the plain gradient.
        official: reproduce the hook placement of the authors' release (torchvision ResNet and
            DenseNet only), quirks included; see :mod:`skipgrad.backward.official`.

    Raises:
        ValueError: gamma outside (0, 1].
        NoResidualBlockError: the model holds no residual or dense block (a ``ValueError``), or
            (:class:`NoDecayedBlockError`) holds only blocks the rule leaves undecayed.
        UnsupportedOfficialModelError: ``official=True`` on a model the release does not cover.

    Forward values are identical with and without the context. Every hook is removed on exit,
    also when the body raises. The context may be entered again after it exits.
    """

    method = "sgm"

    def __init__(self, model: nn.Module, gamma: float, *, official: bool = False) -> None:
        super().__init__(model)
        self.gamma = check_gamma(gamma)
        self.official = official
        self._found = find_blocks(model)
        self.blocks = [info for _, _, info in self._found]
        self._set_plan(self._plan(), self._changes())

    def _plan(self) -> list[Attacher]:
        if self.official:

            return official_attachers(self.model, self.gamma)
        if not self.blocks:
            raise NoResidualBlockError(
                f"skip_gradient found no residual or dense block in {model_label(self.model)}; "
                "SGM needs skip connections (register new block types with "
                "skipgrad.register_block)")
        if not any(info.decayed for info in self.blocks):
            raise NoDecayedBlockError(
                f"skip_gradient would decay none of the {len(self.blocks)} residual blocks of "
                f"{model_label(self.model)}: each is the first block of its stage, which SGM "
                f"leaves undecayed as the authors' release does, so the gradient would be the "
                f"plain one; use a source with several blocks per stage (or official=True / "
                f"--sgm-official on a torchvision ResNet or DenseNet)")
        return [self._decay_branch_of(module) for _, module, info in self._found if info.decayed]

    def _changes(self) -> list[Change]:
        if self.official:
            return [Change("", f"ReLU hooks of the authors' release, gamma {self.gamma:g}")]
        return [Change(info.name, f"residual-branch gradient x {self.gamma:g}")
                for info in self.blocks if info.decayed]

    def _decay_branch_of(self, block: nn.Module) -> Attacher:
        entries = list(BLOCKS.lookup(block).branch_entries(block))
        gamma = self.gamma

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return scale_gradient(args, gamma), scale_gradient(kwargs, gamma)

        def attach() -> Removable:
            return HandleGroup(m.register_forward_pre_hook(hook, with_kwargs=True) for m in entries)

        return attach

    def __repr__(self) -> str:
        decayed = sum(info.decayed for info in self.blocks)
        mode = ", official=True" if self.official else ""
        return (f"skip_gradient({model_label(self.model)}, gamma={self.gamma}{mode}: "
                f"{decayed}/{len(self.blocks)} blocks decayed)")
