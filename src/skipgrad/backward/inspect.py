"""What SGM does to a model: its blocks, and how the gradient splits between skip and branch paths.

For every block found by :func:`skipgrad.find_blocks`, the gradient of the attack loss is taken at
the block's *split points* — the tensors that feed both a residual branch and the skip path, i.e.
the inputs of the block's branch entries (the block input for most blocks; for transformer blocks
also the sum after the attention branch). At each split point the total gradient is
``branch + skip``: ``branch`` is what arrives back through the entry modules (captured by a tap on
their input) and ``skip`` is the rest (``total - branch``: the identity or projection shortcut, and
for a dense layer every later consumer of the features). Norms are over all split points of the
block and the whole batch.
Comparing the shares without and with SGM shows the mechanism of Wu et al. (ICLR 2020): SGM shifts
the input gradient towards the skip paths, i.e. towards the low-level features that transfer.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from skipgrad.backward.base import evaluation_mode
from skipgrad.backward.blocks import BLOCKS
from skipgrad.backward.sgm import find_blocks, skip_gradient
from skipgrad.errors import InputError


@dataclass(frozen=True)
class GradientSplit:
    """Norms of the gradient at a block's split points, divided into residual branch and skip."""

    total_norm: float
    branch_norm: float
    skip_norm: float

    @property
    def branch_share(self) -> float:
        """``|branch| / (|branch| + |skip|)`` in [0, 1]; NaN if no gradient reached the block."""
        denominator = self.branch_norm + self.skip_norm
        return self.branch_norm / denominator if denominator > 0 else math.nan

    @property
    def skip_share(self) -> float:
        """``1 - branch_share``: the part of the gradient that bypasses the residual branch."""
        return 1.0 - self.branch_share


@dataclass(frozen=True)
class BlockGradient:
    """One block: its name and kind, whether SGM decays it, and the split without and with SGM."""

    name: str
    kind: str
    decayed: bool
    plain: GradientSplit
    sgm: GradientSplit


@dataclass(frozen=True)
class SGMReport:
    """Structural and gradient analysis of SGM on one model and batch (see :func:`inspect_model`).

    Attributes:
        model: the model's class name.
        gamma: the decay factor analysed.
        blocks: one entry per block, in module order.
        loss: the summed cross-entropy on the batch (identical with and without SGM).
        input_grad_norm_plain / input_grad_norm_sgm: norm of the gradient at the images.
        input_grad_cosine: mean per-image cosine between the plain and the SGM input gradient.
    """

    model: str
    gamma: float
    blocks: tuple[BlockGradient, ...]
    loss: float
    input_grad_norm_plain: float
    input_grad_norm_sgm: float
    input_grad_cosine: float

    @property
    def n_decayed(self) -> int:
        """How many blocks SGM decays."""
        return sum(block.decayed for block in self.blocks)

    def mean_branch_share(self, sgm: bool, decayed_only: bool = True) -> float:
        """Average branch share over the (decayed) blocks, without or with SGM."""
        chosen = [b for b in self.blocks if b.decayed or not decayed_only]
        shares = [(b.sgm if sgm else b.plain).branch_share for b in chosen]
        shares = [s for s in shares if not math.isnan(s)]
        return sum(shares) / len(shares) if shares else math.nan


class _Tap(torch.autograd.Function):
    """Identity forward (a copy, so in-place ops downstream are safe); records the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sink: list) -> torch.Tensor:
        ctx.sink = sink
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.sink.append(grad)
        return grad, None


class _SplitPoint:
    """Gradients seen at one split tensor: through the branch entries, and in total."""

    def __init__(self) -> None:
        self.branch: list[torch.Tensor] = []
        self.total: list[torch.Tensor] = []

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.total:
            return None
        total = sum(self.total).flatten().double()
        branch = sum(self.branch).flatten().double() if self.branch else torch.zeros_like(total)
        return total, branch


def _tap(value: Any, points: dict[int, _SplitPoint]) -> Any:
    """Route each grad-requiring tensor in ``value`` through a tap keyed by the tensor's id."""
    if isinstance(value, torch.Tensor):
        if not value.requires_grad:
            return value
        point = points.get(id(value))
        if point is None:
            # Several entries may read the same tensor (Inception-ResNet branches): one total.
            point = points[id(value)] = _SplitPoint()
            value.register_hook(lambda grad, p=point: p.total.append(grad))
        return _Tap.apply(value, point.branch)
    if isinstance(value, (list, tuple)):
        return type(value)(_tap(v, points) for v in value)
    if isinstance(value, dict):
        return {k: _tap(v, points) for k, v in value.items()}
    return value


def _split(points: dict[int, _SplitPoint]) -> GradientSplit:
    pairs = [p.vectors() for p in points.values()]
    pairs = [pair for pair in pairs if pair is not None]
    if not pairs:
        return GradientSplit(0.0, 0.0, 0.0)
    total = torch.cat([t for t, _ in pairs])
    branch = torch.cat([b for _, b in pairs])
    return GradientSplit(total.norm().item(), branch.norm().item(), (total - branch).norm().item())


@contextlib.contextmanager
def _taps(found: list, points: dict[str, dict[int, _SplitPoint]]) -> Iterator[None]:
    """Pre-hooks on every branch entry, prepended so they see the input before SGM scales it."""
    handles = []

    def hook_for(block_points: dict[int, _SplitPoint]) -> Any:
        return lambda _m, args, kwargs: (_tap(args, block_points), _tap(kwargs, block_points))

    try:
        for name, block, _info in found:
            for entry in BLOCKS.lookup(block).branch_entries(block):
                handles.append(entry.register_forward_pre_hook(
                    hook_for(points[name]), with_kwargs=True, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _measure(model: nn.Module, found: list, images: torch.Tensor, labels: torch.Tensor,
             sgm: skip_gradient | None) -> tuple[torch.Tensor, float, dict[str, GradientSplit]]:
    """Input gradient, loss and per-block split of one pass, with SGM active if ``sgm`` is given."""
    points: dict[str, dict[int, _SplitPoint]] = {name: {} for name, _, _ in found}
    x = images.detach().clone().requires_grad_(True)
    with _taps(found, points), (sgm if sgm is not None else contextlib.nullcontext()):
        # Summed, not averaged: each image's gradient does not depend on the batch size.
        loss = F.cross_entropy(model(x), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad, loss.item(), {name: _split(p) for name, p in points.items()}


def inspect_model(model: nn.Module, gamma: float, images: torch.Tensor,
                  labels: torch.Tensor) -> SGMReport:
    """Which blocks SGM finds and decays, and how it moves the gradient from branches to skips.

    Args:
        model: any module with registered residual or dense blocks (evaluated in eval mode; the
            modes are restored afterwards).
        gamma: SGM decay factor in (0, 1].
        images: a batch (N, C, H, W) as the model takes it.
        labels: true class indices (N,); the loss is the summed cross-entropy, as in an attack.

    Raises:
        NoResidualBlockError: the model has no block SGM can decay (e.g. VGG, Inception-v3).
        ValueError: gamma outside (0, 1].
    """
    sgm = skip_gradient(model, gamma)  # validates gamma and raises for models without blocks
    found = find_blocks(model)
    with evaluation_mode([model]):  # analysis must not update BN statistics or draw dropout
        plain_grad, loss, plain = _measure(model, found, images, labels, None)
        sgm_grad, _, decayed = _measure(model, found, images, labels, sgm)
    blocks = tuple(BlockGradient(info.name, info.kind, info.decayed, plain[name], decayed[name])
                   for name, _, info in found)
    cosine = F.cosine_similarity(plain_grad.flatten(1).double(), sgm_grad.flatten(1).double(),
                                 dim=1)
    return SGMReport(type(model).__name__, sgm.gamma, blocks, loss, plain_grad.norm().item(),
                     sgm_grad.norm().item(), cosine.mean().item())


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:5.1f}%"


def format_report(report: SGMReport) -> str:
    """A terminal table: one row per block, then a whole-model summary."""
    width = max([len("block")] + [len(b.name) for b in report.blocks])
    kind_width = max([len("kind")] + [len(b.kind) for b in report.blocks])
    header = (f"{'block':<{width}}  {'kind':<{kind_width}}  decayed  branch share: plain    SGM"
              "   |grad| plain       SGM")
    lines = [f"SGM analysis of {report.model}, gamma={report.gamma:g}", header, "-" * len(header)]
    for b in report.blocks:
        lines.append(
            f"{b.name:<{width}}  {b.kind:<{kind_width}}  {'yes' if b.decayed else 'no':<7}"
            f"  {_percent(b.plain.branch_share):>19}  {_percent(b.sgm.branch_share):>6}"
            f"  {b.plain.total_norm:>12.4g}  {b.sgm.total_norm:>9.4g}")
    lines += ["-" * len(header), *_summary_lines(report)]
    return "\n".join(lines)


def _summary_lines(report: SGMReport) -> list[str]:
    return [
        f"blocks: {len(report.blocks)} found, {report.n_decayed} decayed, "
        f"{len(report.blocks) - report.n_decayed} left undecayed",
        f"mean branch share over decayed blocks: {_percent(report.mean_branch_share(False))} plain"
        f" -> {_percent(report.mean_branch_share(True))} with SGM",
        f"input gradient: |g| {report.input_grad_norm_plain:.4g} plain, "
        f"{report.input_grad_norm_sgm:.4g} with SGM; cosine(plain, SGM) "
        f"{report.input_grad_cosine:.4f}",
    ]


def report_json(report: SGMReport) -> dict:
    """The report as plain JSON data (``skipgrad inspect --json``): shares next to raw norms."""
    def split(s: GradientSplit) -> dict:
        share = None if math.isnan(s.branch_share) else s.branch_share
        return {"total_norm": s.total_norm, "branch_norm": s.branch_norm,
                "skip_norm": s.skip_norm, "branch_share": share}

    def mean(sgm: bool) -> float | None:
        value = report.mean_branch_share(sgm)
        return None if math.isnan(value) else value

    return {"model": report.model, "gamma": report.gamma, "loss": report.loss,
            "blocks": [{"name": b.name, "kind": b.kind, "decayed": b.decayed,
                        "plain": split(b.plain), "sgm": split(b.sgm)} for b in report.blocks],
            "n_blocks": len(report.blocks), "n_decayed": report.n_decayed,
            "mean_branch_share_plain": mean(False), "mean_branch_share_sgm": mean(True),
            "input_grad_norm_plain": report.input_grad_norm_plain,
            "input_grad_norm_sgm": report.input_grad_norm_sgm,
            "input_grad_cosine": report.input_grad_cosine}


# ---------------------------------------------------------------- the other backward-pass methods

@dataclass(frozen=True)
class MethodChanges:
    """What one backward-pass method would change in a model, or why it does not apply."""

    label: str
    summary: str
    settings: dict
    changes: tuple  # of skipgrad.backward.base.Change
    reason: str | None = None

    @property
    def applies(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict:
        return {"method": self.label, "summary": self.summary, "settings": self.settings,
                "applies": self.applies, "reason": self.reason,
                "changes": [{"module": c.module, "what": c.what} for c in self.changes]}


def method_changes(model: nn.Module, choices: list | None = None,
                   kind: str = "backward") -> list[MethodChanges]:
    """Build each method (``MethodChoice``; default: every registered one of ``kind`` with its
    defaults) on ``model`` without entering it, and list what it would change or why it does not
    apply."""
    from skipgrad.backward.registry import choose, known_methods, resolved_settings

    if choices is None:
        choices = [choose(info.name) for info in known_methods(kind)
                   if all(key in info.defaults for key in info.settings)]
    found = []
    for choice in choices:
        try:
            context = choice.build(model)
        except InputError as exc:  # the method does not apply here: say why, list the others
            found.append(MethodChanges(choice.label, choice.info.summary, dict(choice.settings),
                                       (), " ".join(str(exc).split())))
            continue
        found.append(MethodChanges(choice.label, choice.info.summary,
                                   resolved_settings(choice, context), tuple(context.changes)))
    return found


def format_method_changes(found: list[MethodChanges], model: str, kind: str = "backward") -> str:
    """A terminal listing: per method, its settings and every module it changes (and how); the
    heading names the ``kind`` (forward methods change the source's predictions too)."""
    lines = [f"backward-pass methods on {model} (--backward METHOD[:key=value,...]):"
             if kind == "backward" else
             f"forward methods on {model} (--forward METHOD[:key=value,...]; they change the "
             f"source's forward values, so its predictions, too):"]
    for entry in found:
        settings = ", ".join(f"{k}={_setting(v)}" for k, v in entry.settings.items())
        lines.append(f"{entry.label}: {entry.summary}")
        if not entry.applies:
            lines.append(f"  does not apply: {entry.reason}")
            continue
        lines.append(f"  settings: {settings or '(none)'}; {len(entry.changes)} module(s) changed")
        width = max(len(c.module) for c in entry.changes) if entry.changes else 0
        lines += [f"  {c.module:<{width}}  {c.what}" for c in entry.changes]
    return "\n".join(lines)


def _setting(value: object) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)
