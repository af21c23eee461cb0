"""Which modules are residual or dense blocks, and where each block's residual branch begins.

SGM needs one fact per block: the modules whose *input* feeds only the residual branch (never the
skip path). Scaling the gradient that flows back into those inputs by gamma decays the branch while
the skip path keeps scale 1. Block types are matched with ``isinstance`` (through the class's MRO),
never by module name, so wrapped models, timm and torchvision all work the same way.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import nn

BranchEntries = Callable[[nn.Module], Sequence[nn.Module]]
BranchExit = Callable[[nn.Module], Optional[nn.Module]]
SkipPath = Callable[[nn.Module], Optional[nn.Module]]


@dataclass(frozen=True)
class BlockKind:
    """How SGM treats one registered block type.

    Attributes:
        name: short label shown in reports, e.g. ``"torchvision.BasicBlock"``.
        branch_entries: returns the modules whose input feeds only the residual branch of a block
            instance; an empty sequence means "this instance has no identity-style skip".
        decay_first_in_stage: ``False`` leaves the first block of each stage undecayed, as the
            authors' release does for ResNets; dense layers set it to ``True``.
        branch_exit: returns the module whose *output* is the residual branch's output (the
            tensor added to the skip path), or ``None``; methods that need the gradient arriving
            at the branch (LinBP's norm matching) support only kinds that give it.
        skip_path: returns the module whose output is the skip path added to the branch output
            (a projection shortcut), or ``None`` when the skip is the block's input itself (an
            identity skip). ``None`` here (undeclared) means the skip is not known; methods that
            change the skip (Ghost networks' erosion) support only kinds that declare it.
    """

    name: str
    branch_entries: BranchEntries
    decay_first_in_stage: bool = False
    branch_exit: BranchExit | None = None
    skip_path: SkipPath | None = None


class BlockRegistry:
    """Maps block classes to :class:`BlockKind`. Refuses duplicates rather than overwriting them.

    Classes of optional packages (timm, torchvision) are registered by dotted path and resolved only
    once their module has been imported by someone else: a model can only contain a timm block if
    timm is already imported, so skipgrad never imports timm just to look.
    """

    def __init__(self) -> None:
        self._kinds: dict[type, BlockKind] = {}
        self._lazy: dict[str, BlockKind] = {}

    def register(self, block_type: type[nn.Module] | str, kind: BlockKind) -> None:
        """Register a class (or a ``"package.module:ClassName"`` path resolved lazily)."""
        if block_type in self._kinds or block_type in self._lazy:
            raise ValueError(f"block type {block_type!r} is already registered with skipgrad")
        if isinstance(block_type, str):
            self._lazy[block_type] = kind
        elif isinstance(block_type, type) and issubclass(block_type, nn.Module):
            self._kinds[block_type] = kind
        else:
            raise TypeError(f"block_type must be an nn.Module subclass, got {block_type!r}")

    def lookup(self, module: nn.Module) -> BlockKind | None:
        """The kind of ``module``, by its class or the nearest registered base class."""
        self._resolve_imported()
        for cls in type(module).__mro__:
            kind = self._kinds.get(cls)
            if kind is not None:
                return kind
        return None

    def _resolve_imported(self) -> None:
        for path in [p for p in self._lazy if p.split(":")[0] in sys.modules]:
            module_name, class_name = path.split(":")
            cls = getattr(importlib.import_module(module_name), class_name, None)
            kind = self._lazy.pop(path)
            if cls is not None:
                self._kinds.setdefault(cls, kind)


BLOCKS = BlockRegistry()


def register_block(
    block_type: type[nn.Module] | str,
    branch_entries: BranchEntries,
    *,
    decay_first_in_stage: bool = False,
    name: str | None = None,
    branch_exit: BranchExit | None = None,
    skip_path: SkipPath | None = None,
) -> None:
    """Teach :func:`skipgrad.skip_gradient` a new residual block type.

    Args:
        block_type: the block class (subclasses match too), or ``"module.path:ClassName"``.
        branch_entries: ``block -> [modules]`` whose *input* feeds only the residual branch.
            Return ``[]`` for instances without a skip connection (they are then ignored).
        decay_first_in_stage: also decay the first block of each stage (its parent container).
        name: label used in reports; defaults to the class name.
        branch_exit: ``block -> module`` whose *output* is the branch output added to the skip
            (``None`` if the block has none). Needed by :func:`skipgrad.linbp`; the branch is
            then the computation from the (single) entry's input to this module's output.
        skip_path: ``block -> module`` whose output is the skip path (a projection shortcut), or
            ``None`` for an identity skip (the block's input is added). Needed by
            :func:`skipgrad.ghost`, which erodes the skip path.

    Example::

        class MyBlock(nn.Module):             # y = x + body(x)
            def forward(self, x):
                return x + self.body(x)

        skipgrad.register_block(MyBlock, lambda block: [block.body],
                                branch_exit=lambda block: block.body,
                                skip_path=lambda block: None)      # identity skip
    """
    label = name or (block_type if isinstance(block_type, str) else block_type.__name__)
    BLOCKS.register(block_type, BlockKind(label, branch_entries, decay_first_in_stage,
                                          branch_exit, skip_path))


def _first_conv(block: nn.Module) -> Sequence[nn.Module]:
    # torchvision and timm ResNet blocks compute the branch as conv1(x) -> ...; x also feeds the skip.
    return [block.conv1]


def last_present(*names: str) -> BranchExit:
    """The exit is the last of ``names`` the block has (optional SE / drop-path modules follow
    the last norm inside the branch, and are ``None`` when switched off)."""

    def exit_module(block: nn.Module) -> nn.Module | None:
        found = [getattr(block, n, None) for n in names]
        return next((m for m in reversed(found) if isinstance(m, nn.Module)), None)

    return exit_module


def _whole_layer(block: nn.Module) -> Sequence[nn.Module]:
    # A dense layer's input (the concatenated features) feeds only its new features; the
    # concatenation that forms the skip path happens outside the layer, in its dense block.
    return [block]


def _register_builtin_families() -> None:
    # The branch ends at the last norm (torchvision), or after timm's optional SE and drop-path.
    exits = {"torchvision.models.resnet:BasicBlock": last_present("bn2"),
             "torchvision.models.resnet:Bottleneck": last_present("bn3"),
             "timm.models.resnet:BasicBlock": last_present("bn2", "se", "drop_path"),
             "timm.models.resnet:Bottleneck": last_present("bn3", "se", "drop_path")}
    for path, branch_exit in exits.items():
        label = path.split(".")[0] + "." + path.split(":")[1]
        register_block(path, _first_conv, name=label, decay_first_in_stage=False,
                       branch_exit=branch_exit, skip_path=last_present("downsample"))
    for path in ("torchvision.models.densenet:_DenseLayer", "timm.models.densenet:DenseLayer"):
        label = path.split(".")[0] + ".DenseLayer"
        register_block(path, _whole_layer, decay_first_in_stage=True, name=label)


_register_builtin_families()
