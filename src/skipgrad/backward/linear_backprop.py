"""``linbp``: Linear Backpropagation as a context around any gradient computation.

Guo, Li, Chen, "Backpropagating Linearly Improves Transferability of Adversarial Examples",
NeurIPS 2020. From a residual block ``start`` on, the ReLUs *inside* each residual branch are
identities in the backward pass (forward values unchanged), and the branch gradient that reaches
each block's input is rescaled, per sample, to the L2 norm of the true (ReLU-masked) branch
gradient, times ``branch_scale`` (the release's ``sgm_lambda``). The skip path and the ReLU after
the addition keep their true gradient, as in the release (qizhangli/linbp-attack,
``attack/imagenet/utils.py``). On a network without residual blocks (VGG, the paper's CIFAR-10
experiments) the trunk ReLUs from ``start`` on are linear and nothing is rescaled.

How one block call is rewired (all from hooks, found by the block registry):

* the branch entry's input passes through a node that, in backward, rescales the linear branch
  gradient to the recorded true norm;
* ReLU modules of the block that run between the branch entry and the branch exit (those inside
  the branch; torchvision blocks call the same ``relu`` module again after the addition, and that
  call stays a true ReLU) return ``relu(x)`` with an identity gradient;
* the branch exit's output passes through a node whose backward first takes the *true* branch
  gradient with a re-entrant ``autograd.grad`` over the branch (the ReLU nodes apply their masks
  during that pass) and records its per-sample norm, then lets the linear gradient continue.

That is one extra backward over each branch (input gradients only), as the release computes.
Parameter gradients inside the changed branches follow the linear backward; they are not rescaled.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from skipgrad.backward.base import (Attacher, BackwardContext, Change, ForwardSwap,
                                    NothingToChangeError, Removable, model_label)
from skipgrad.backward.blocks import BLOCKS
from skipgrad.backward.sgm import find_blocks
from skipgrad.backward.units import resolve_start, trunk_relus
from skipgrad.errors import InputError


class _Call:
    """What the nodes of one block call share: whether the true-gradient pass is running, and
    the per-sample norm of the true branch gradient once it has been taken."""

    __slots__ = ("true_pass", "true_norm")

    def __init__(self) -> None:
        self.true_pass = False
        self.true_norm: Optional[torch.Tensor] = None


# Plain networks: linear ReLUs without a norm to match; the true pass never runs.
_PLAIN = _Call()


class _LinearReLU(torch.autograd.Function):
    """``relu(x)`` forward; identity gradient, or the ReLU mask during its block's true pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, call: _Call) -> torch.Tensor:
        ctx.call = call
        ctx.mask = None if call is _PLAIN else x > 0
        return torch.relu(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad * ctx.mask if ctx.call.true_pass else grad), None


class _BranchEntry(torch.autograd.Function):
    """Identity forward (a copy); backward rescales the branch gradient to the true norm."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, call: _Call, scale: float) -> torch.Tensor:
        ctx.call, ctx.scale = call, scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return match_norm(grad, ctx.call.true_norm, ctx.scale), None, None


class _BranchExit(torch.autograd.Function):
    """Identity forward (a copy, so the block's in-place addition is safe); backward records the
    norm of the true branch gradient before passing the incoming gradient on unchanged."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, branch_input: torch.Tensor,
                call: _Call) -> torch.Tensor:
        # branch_input is an input only so that backward can differentiate the branch up to it.
        ctx.save_for_backward(out, branch_input)
        ctx.call = call
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        out, branch_input = ctx.saved_tensors
        ctx.call.true_pass = True
        try:
            (true_grad,) = torch.autograd.grad(out, branch_input, grad, retain_graph=True)
        finally:
            ctx.call.true_pass = False
        ctx.call.true_norm = sample_norms(true_grad)
        return grad, None, None


def sample_norms(grad: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norms (dimension 0 is the batch), in float32 at least."""
    return grad.flatten(1).to(torch.promote_types(grad.dtype, torch.float32)).norm(dim=1)


def match_norm(grad: torch.Tensor, target: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``grad`` rescaled per sample to norm ``scale * target`` (zero where ``grad`` is zero)."""
    if target is None:  # no gradient came through the branch exit: nothing to match
        return grad * scale
    norm = sample_norms(grad)
    factor = torch.where(norm > 0, scale * target / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                         torch.zeros_like(norm))
    return grad * factor.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))


def check_branch_scale(value: float) -> float:
    """A positive, finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise InputError(f"branch_scale must be a positive number, got {value!r}")
    return float(value)


def linbp_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks of ``model`` whose branch LinBP can rewire, in module order: blocks
    with one branch entry, a registered branch exit (see :func:`skipgrad.register_block`) and a
    ``nn.ReLU`` to linearise (MobileNetV2's branches have ReLU6 only: nothing to change there)."""
    found = []
    for name, block, _ in find_blocks(model):
        kind = BLOCKS.lookup(block)
        if kind.branch_exit is not None and kind.branch_exit(block) is not None \
                and len(kind.branch_entries(block)) == 1 \
                and any(isinstance(m, nn.ReLU) for m in block.modules()):
            found.append((name, block))
    return found


class linbp(BackwardContext):  # noqa: N801 - a context manager named like torch.no_grad
    """Linear backpropagation (LinBP) from block ``start`` on, with per-block norm matching.

    Use as a context around the forward *and* backward pass::

        with skipgrad.linbp(model):                       # from the block at half depth
            loss = F.cross_entropy(model(x), y)
            loss.backward()

    Args:
        model: a network with ResNet-style residual blocks (torchvision/timm Basic and Bottleneck
            blocks, pre-activation blocks, anything registered with a ``branch_exit``), or a plain
            ReLU CNN such as VGG.
        start: where linearisation begins: a residual block's module name (e.g. ``"layer3.1"``;
            ``"1.layer3.1"`` inside ``nn.Sequential(normalizer, net)``) or an index into the blocks
            in forward order. Default: the block at half depth (``len(blocks) // 2``), which for
            torchvision ResNet-50 is ``layer3.1``, the authors' default. For a plain CNN, the name
            or index of a ReLU of the convolutional trunk (default: the one at half depth).
        branch_scale: factor on each rescaled branch gradient (the release's ``sgm_lambda``,
            which combines LinBP with SGM on the same blocks); 1 gives LinBP alone.

    Raises:
        NothingToChangeError: no rewirable residual block and no trunk ReLU (a ``ValueError``).
        ValueError: ``start`` names no block (the message lists the valid ones), or
            ``branch_scale`` is not positive.
    """

    method = "linbp"

    def __init__(self, model: nn.Module, *, start: str | int | None = None,
                 branch_scale: float = 1.0) -> None:
        super().__init__(model)
        self.branch_scale = check_branch_scale(branch_scale)
        self._open: dict[int, tuple[_Call, torch.Tensor]] = {}
        blocks = linbp_blocks(model)
        if blocks:
            index = resolve_start(self.method, model, [n for n, _ in blocks], start,
                                  len(blocks) // 2, "residual blocks")
            self.start = blocks[index][0]
            self._plan_blocks(blocks[index:])
        else:
            relus = self._plain_relus()
            index = resolve_start(self.method, model, [n for n, _ in relus], start,
                                  len(relus) // 2, "trunk ReLUs")
            self.start = relus[index][0]
            self._plan_plain(relus[index:])

    # ---------------------------------------------------------------- planning

    def _plain_relus(self) -> list[tuple[str, nn.Module]]:
        if find_blocks(self.model):
            kinds = sorted({BLOCKS.lookup(b).name for _, b, _ in find_blocks(self.model)})
            raise NothingToChangeError(
                f"linbp cannot rewire the residual blocks of {model_label(self.model)} "
                f"({', '.join(kinds)}): it needs ResNet-style blocks with one branch entry, a "
                "registered branch_exit (see skipgrad.register_block) and ReLUs in the branch")
        relus = trunk_relus(self.model)
        if not relus:
            raise NothingToChangeError(
                f"linbp found neither a residual block nor a ReLU in the convolutional trunk of "
                f"{model_label(self.model)}; LinBP linearises ReLUs")
        return relus

    def _plan_blocks(self, blocks: list[tuple[str, nn.Module]]) -> None:
        attachers: list[Attacher] = []
        claims: list[tuple[str, nn.Module]] = []
        for name, block in blocks:
            kind = BLOCKS.lookup(block)
            relus = [(f"{name}.{n}", m) for n, m in block.named_modules() if isinstance(m, nn.ReLU)]
            attachers.append(self._entry_attacher(block, kind.branch_entries(block)[0]))
            attachers.append(self._exit_attacher(block, kind.branch_exit(block)))
            attachers += [self._relu_attacher(relu, block) for _, relu in relus]
            claims += relus
        changes = [Change(name, "ReLUs in the residual branch linear in backward; branch "
                                f"gradient at the true gradient's norm x {self.branch_scale:g}")
                   for name, _ in blocks]
        self._set_plan(attachers, changes, claims)

    def _plan_plain(self, relus: list[tuple[str, nn.Module]]) -> None:
        attachers = [self._relu_attacher(relu, None) for _, relu in relus]
        self._set_plan(attachers, [Change(n, "ReLU linear in backward") for n, _ in relus], relus)

    # ---------------------------------------------------------------- hooks

    def _entry_attacher(self, block: nn.Module, entry: nn.Module) -> Attacher:
        def hook(_module: nn.Module, args: tuple) -> Optional[tuple]:
            x = args[0] if args else None
            if not (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()):
                return None  # nothing to differentiate: leave this call's branch untouched
            call = _Call()
            branch_input = _BranchEntry.apply(x, call, self.branch_scale)
            self._open[id(block)] = (call, branch_input)
            return (branch_input, *args[1:])

        return lambda: entry.register_forward_pre_hook(hook)

    def _exit_attacher(self, block: nn.Module, exit_module: nn.Module) -> Attacher:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            window = self._open.pop(id(block), None)
            if window is None or not isinstance(output, torch.Tensor):
                return None
            call, branch_input = window
            return _BranchExit.apply(output, branch_input, call)

        return lambda: exit_module.register_forward_hook(hook)

    def _relu_attacher(self, relu: nn.Module, block: Optional[nn.Module]) -> Attacher:
        def attach() -> Removable:
            true_forward: Callable[[torch.Tensor], torch.Tensor] = relu.forward

            def forward(x: torch.Tensor) -> torch.Tensor:
                if block is None:
                    return _LinearReLU.apply(x, _PLAIN)
                window = self._open.get(id(block))
                # Outside the branch window (the post-addition call of a shared module): true ReLU.
                return true_forward(x) if window is None else _LinearReLU.apply(x, window[0])

            return ForwardSwap(relu, forward)

        return attach

    def _remove(self) -> None:
        super()._remove()
        self._open.clear()  # windows left open by a forward that raised

    def __repr__(self) -> str:
        return (f"linbp({model_label(self.model)}, start={self.start!r}, "
                f"branch_scale={self.branch_scale:g}: {len(self.changes)} changed)")
