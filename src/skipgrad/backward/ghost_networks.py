"""``ghost``: Ghost networks -- a new randomly eroded copy of the source at every forward pass.

Li, Bai, Zhou, Xie, Zhang, Yuille, "Learning Transferable Adversarial Examples via Ghost
Networks", AAAI 2020 (arXiv:1812.03413). Perturbing the source anew at each forward pass turns an
iterative attack into a "longitudinal ensemble" of ghost networks at no extra cost:

* **skip-connection erosion** (residual networks): every residual block computes
  ``F(x) + xi * s(x)`` instead of ``F(x) + s(x)``, where ``s(x)`` is its skip path (the block's
  input, or its projection shortcut's output) and ``xi`` has one factor per channel drawn from
  ``U[1 - erosion, 1 + erosion]``; the block's post-addition activation, if any, follows. The
  authors' release (LiYingwei/ghost-network, ``lib_resnet_v2_*.py``) multiplies the shortcut after
  its projection by ``tf.random_uniform((depth,), 1 - r, 1 + r)``; 0.22 is their value for
  ResNet-v2-50 (the paper's Lambda).
* **dropout erosion** (``dropout``, for networks without skips, or in addition): dropout with rate
  ``dropout`` on the input of every convolution except the first (which reads the image), active in
  eval mode, kept values scaled by ``1 / (1 - dropout)``. This is the paper's per-layer form
  ``x_{l+1} = f_l(r_l * x_l / Lambda)`` with ``r_l ~ Bernoulli(Lambda)``, the layers taken to be
  the convolutions; the authors' best keep probability for Inception-v3 is 0.994
  (``dropout=0.006``).
  TransferAttack's port drops after each top-level module of Inception-v3 instead, a coarser
  placement; docs/forward.md compares them.

Each forward pass draws new factors. Inside :func:`skipgrad.attack` the draws come from the
attack's per-image streams (stream ``"ghost"`` of the run seed, or of ``seed`` when given), so an
image's ghosts depend on its id and the seed only, never on its batch; on its own the context draws
from one CPU generator seeded with ``seed`` (default: ``torch.initial_seed()``, read, never
advanced). Torch's global random state is never used. Entering the context starts its draws afresh,
so each ``with`` block sees the same sequence of ghost networks.

Blocks are found by the block registry (:mod:`skipgrad.backward.blocks`): a kind must declare its
``branch_exit`` and its ``skip_path``. docs/forward.md lists what differs from the public code.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from skipgrad.backward.base import (Attacher, BackwardContext, Change, HandleGroup,
                                    NothingToChangeError, RandomStreams, Removable, StreamFactory,
                                    model_label)
from skipgrad.backward.blocks import BLOCKS
from skipgrad.backward.sgm import find_blocks
from skipgrad.errors import InputError

STREAM = "ghost"  # the name of Ghost's per-image streams inside an attack


class _OneGenerator:
    """Draws for a context used on its own: one CPU generator for the whole batch."""

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def uniform(self, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand((n, *shape), generator=self._generator)


class _PerImage:
    """Draws inside an attack: image i of the batch draws from its own stream. A batch of ``k``
    copies of the images (``[all images, all images, ...]``) draws ``k`` values per image."""

    def __init__(self, streams: RandomStreams) -> None:
        self._streams = streams

    def uniform(self, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        count = len(self._streams)
        if n % count:
            raise InputError(f"ghost draws per image for {count} attacked images, but the model "
                             f"was called on a batch of {n}")
        draws = self._streams.uniform((n // count, *shape))  # (images, copies, *shape)
        return draws.transpose(0, 1).reshape(n, *shape)


def check_erosion(value: float) -> float:
    """The half-width of the factors' range: a number in [0, 1] (0: no skip erosion)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value <= 1:
        raise InputError(f"erosion must be a number in [0, 1], got {value!r}")
    return float(value)


def check_dropout(value: Optional[float]) -> Optional[float]:
    """A dropout rate in (0, 1), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 < value < 1:
        raise InputError(f"dropout must be a rate in (0, 1) or None, got {value!r}")
    return float(value)


def erodible_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks of ``model`` whose skip path Ghost can erode, in module order: those
    whose kind declares a ``branch_exit`` and a ``skip_path`` (:func:`skipgrad.register_block`)."""
    found = []
    for name, block, _ in find_blocks(model):
        kind = BLOCKS.lookup(block)
        if kind.skip_path is not None and kind.branch_exit is not None \
                and kind.branch_exit(block) is not None:
            found.append((name, block))
    return found


def _per_channel(draws: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, C) draws shaped to broadcast over ``like`` (N, C, ...), on its device and dtype."""
    shape = (*draws.shape, *([1] * (like.dim() - 2)))
    return draws.reshape(shape).to(device=like.device, dtype=like.dtype)


class ghost(BackwardContext):  # noqa: N801 - a context manager named like torch.no_grad
    """Ghost networks: skip connections (and optionally every convolution's input) randomly eroded
    at every forward pass.

    Use as a context around the attack (or any forward and backward pass)::

        with skipgrad.ghost(model, seed=0):
            adv = skipgrad.attack(model, x, y, "mi")    # each step attacks a new ghost

        adv = skipgrad.attack(model, x, y, "mi", forward="ghost")   # per-image draws

    Args:
        model: a network with residual blocks whose skip path the block registry knows
            (torchvision and timm ResNets, timm SE-ResNets and pre-activation ResNetV2, the zoo's
            ResNets), or any CNN when ``dropout`` is given.
        erosion: half-width of the per-channel factors' range ``[1 - erosion, 1 + erosion]`` on
            each skip path; 0.22 in the paper (ResNet-v2-50); 0 erodes no skip.
        dropout: if given, dropout with this rate on the input of every convolution but the first
            (the paper's dropout erosion; 0.006 is its best value for Inception-v3).
        seed: seed of the draws. ``None``: the attack's seed inside :func:`skipgrad.attack`, else
            ``torch.initial_seed()``.

    Raises:
        NothingToChangeError: no erodible residual block (or ``erosion=0``) and no ``dropout``
            (a ``ValueError``).
        ValueError: ``erosion`` outside [0, 1], ``dropout`` outside (0, 1), ``seed`` not an int.
    """

    method = "ghost"
    changes_forward = True

    def __init__(self, model: nn.Module, *, erosion: float = 0.22,
                 dropout: Optional[float] = None, seed: Optional[int] = None) -> None:
        super().__init__(model)
        self.erosion = check_erosion(erosion)
        self.dropout = check_dropout(dropout)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InputError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        self._streams: StreamFactory | None = None
        self._draws: _OneGenerator | _PerImage | None = None
        self._skips: dict[int, torch.Tensor] = {}  # block -> its input, during its call
        blocks = erodible_blocks(model) if self.erosion > 0 else []
        convs = self._dropped_convs() if self.dropout is not None else []
        if not blocks and not convs:
            raise NothingToChangeError(self._nothing_message())
        self._set_plan([*map(self._block_attacher, (b for _, b in blocks)),
                        *(self._conv_attacher(c) for _, c in convs)],
                       self._changes(blocks, convs), [*blocks, *convs])

    # ---------------------------------------------------------------- planning

    def _dropped_convs(self) -> list[tuple[str, nn.Module]]:
        convs = [(n, m) for n, m in self.model.named_modules()
                 if isinstance(m, nn.modules.conv._ConvNd)]
        return convs[1:]  # the first convolution reads the image: pixels are not a layer's output

    def _nothing_message(self) -> str:
        label = model_label(self.model)
        if self.erosion == 0:
            return f"ghost with erosion=0 and no dropout changes nothing in {label}"
        if self.dropout is not None:
            return f"ghost found no residual block and no convolution after the first in {label}"
        return (f"ghost found no residual block with a known skip path in {label}; Ghost networks "
                f"erode skip connections (register a block type with skipgrad.register_block(..., "
                f"branch_exit=..., skip_path=...)), or pass dropout=... for dropout erosion")

    def _changes(self, blocks: list, convs: list) -> list[Change]:
        low, high = 1 - self.erosion, 1 + self.erosion
        return [Change(n, f"skip path x U[{low:g}, {high:g}] per channel, drawn at every forward")
                for n, _ in blocks] + \
               [Change(n, f"input dropout, rate {self.dropout:g}, drawn at every forward")
                for n, _ in convs]

    # ---------------------------------------------------------------- draws

    def follow_attack(self, streams: StreamFactory) -> None:
        """Draw from the attack's per-image streams (see :class:`BackwardContext`)."""
        self._streams = streams

    def __enter__(self) -> "ghost":
        super().__enter__()
        if self._streams is not None:
            self._draws = _PerImage(self._streams(self.seed, STREAM))
        else:
            self._draws = _OneGenerator(torch.initial_seed() if self.seed is None else self.seed)
        return self

    def _factors(self, like: torch.Tensor) -> torch.Tensor:
        """Per-image, per-channel factors in [1 - erosion, 1 + erosion] for a skip like ``like``."""
        u = self._draws.uniform(like.shape[0], (like.shape[1],))
        return _per_channel(1 - self.erosion + 2 * self.erosion * u, like)

    # ---------------------------------------------------------------- hooks

    def _block_attacher(self, block: nn.Module) -> Attacher:
        kind = BLOCKS.lookup(block)
        exit_module, projection = kind.branch_exit(block), kind.skip_path(block)

        def remember_input(_module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self._skips[id(block)] = args[0]

        def erode_identity(_module: nn.Module, _args: tuple, output: Any) -> Any:
            # F(x) + xi*x == (F(x) + (xi - 1)*x) + x: the block then adds x itself.
            x = self._skips.pop(id(block), None)
            if x is None or not isinstance(output, torch.Tensor):
                return None
            if x.shape != output.shape:
                raise InputError(f"ghost: the identity skip of a {type(block).__name__} has shape "
                                 f"{tuple(x.shape)} but its branch output {tuple(output.shape)}")
            return output + (self._factors(x) - 1) * x

        def erode_projection(_module: nn.Module, _args: tuple, output: Any) -> Any:
            return output * self._factors(output) if isinstance(output, torch.Tensor) else None

        def attach() -> Removable:
            if projection is not None:
                return HandleGroup([projection.register_forward_hook(erode_projection)])
            # Appended after other forward hooks on the exit (IAA's scale is prepended), so the
            # erosion reads the final branch output whichever context was entered first.
            return HandleGroup([block.register_forward_pre_hook(remember_input),
                                exit_module.register_forward_hook(erode_identity)])

        return attach

    def _conv_attacher(self, conv: nn.Module) -> Attacher:
        keep = 1 - self.dropout

        def drop(_module: nn.Module, args: tuple) -> Optional[tuple]:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return None
            u = self._draws.uniform(x.shape[0], tuple(x.shape[1:])).to(x.device)
            return ((x * (u >= self.dropout).to(x.dtype)) / keep, *args[1:])

        return lambda: conv.register_forward_pre_hook(drop)

    def _remove(self) -> None:
        super()._remove()
        self._skips.clear()  # inputs of blocks whose forward raised

    def __repr__(self) -> str:
        dropout = "" if self.dropout is None else f", dropout={self.dropout:g}"
        return (f"ghost({model_label(self.model)}, erosion={self.erosion:g}{dropout}: "
                f"{len(self.changes)} changed)")
