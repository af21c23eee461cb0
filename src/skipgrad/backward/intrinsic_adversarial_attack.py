"""``iaa``: the Intrinsic Adversarial Attack's smooth, less residual source as a context.

Zhu, Sun, Li, "Rethinking Adversarial Transferability from a Data Distribution
Perspective", ICLR 2022 (OpenReview gVRhIEajG1k). IAA makes the source's gradient better aligned
with the data distribution by changing the source itself, forward and backward:

* every ``nn.ReLU`` becomes ``Softplus(beta)`` (``log(1 + exp(beta x)) / beta``, linear above
  ``beta x > 20`` as ``nn.Softplus``);
* every residual branch is scaled by its stage's ``lambda``: ``out = lambda * F(x) + x`` before the
  block's post-addition activation, the first block of each stage included. In a DenseNet the new
  features of each dense layer are scaled by the ``lambda`` of its dense block.

A *stage* is the run of blocks that share a parent container
(:func:`skipgrad.backward.sgm.stage_of`: torchvision/timm ``layer1`` .. ``layer4``, a DenseNet's
``denseblock1`` .. ``denseblock4``); stages are numbered in module (forward) order. Blocks are
found by the block registry: the branch output is the kind's ``branch_exit``, or the whole block
for dense layers (whose input feeds only their new features). Functional ReLUs (``F.relu`` in a model's ``forward``, e.g. after torchvision DenseNet's
last norm) are not modules and stay ReLUs, as in TransferAttack's port.

Published settings (TransferAttack ``model_related/iaa.py``, from the paper): beta 20 and lambda
(0.98, 0.87, 0.73, 0.19) for ResNet-18/34/50; beta 32 and (0.89, 0.88, 0.70, 0.20) for ResNet-152;
beta 35 and (0.8, 0.8, 0.8, 0.44) for DenseNet-121/201. docs/forward.md lists what differs from the
public code.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skipgrad.backward.base import (Attacher, BackwardContext, Change, ForwardSwap,
                                    NothingToChangeError, model_label)
from skipgrad.backward.blocks import BLOCKS
from skipgrad.backward.sgm import find_blocks, stage_of
from skipgrad.errors import InputError

SOFTPLUS_THRESHOLD = 20.0  # nn.Softplus's default, which the public implementation uses

# (block name, module whose output is the residual branch) per stage, stages in forward order.
Stages = list[tuple[str, list[tuple[str, nn.Module]]]]


def branch_output(block: nn.Module) -> nn.Module | None:
    """The module whose output is ``block``'s residual branch: the kind's ``branch_exit``, or the
    block itself when its whole input feeds only the branch (a dense layer); else None."""
    kind = BLOCKS.lookup(block)
    if kind.branch_exit is not None and kind.branch_exit(block) is not None:
        return kind.branch_exit(block)
    entries = list(kind.branch_entries(block))
    return block if len(entries) == 1 and entries[0] is block else None


def residual_stages(model: nn.Module) -> Stages:
    """The stages of ``model`` whose residual branches IAA can scale, in forward order."""
    stages: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, block, _ in find_blocks(model):
        output = branch_output(block)
        if output is not None:
            stages.setdefault(stage_of(name), []).append((name, output))
    return list(stages.items())


def check_beta(value: float) -> float:
    """Softplus sharpness: a positive, finite number (larger is closer to ReLU)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise InputError(f"beta must be a positive number, got {value!r}")
    return float(value)


def per_stage_scales(value: float | Sequence[float], stages: Stages,
                     model: nn.Module) -> tuple[float, ...]:
    """One positive ``lambda`` per stage: a single number for all, or one per stage in order."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v <= 0:
            raise InputError(f"residual_scale must be a positive number or one per stage, "
                             f"got {value!r}")
    if not isinstance(value, (list, tuple)):
        return (float(value),) * len(stages)
    if len(values) != len(stages):
        names = ", ".join(name or "(root)" for name, _ in stages) or "none"
        raise InputError(f"iaa: residual_scale has {len(values)} values but {model_label(model)} "
                         f"has {len(stages)} stages of residual blocks ({names}); give one value "
                         f"per stage in forward order, or one number for all")
    return tuple(float(v) for v in values)


class iaa(BackwardContext):  # noqa: N801 - a context manager named like torch.no_grad
    """IAA's source model: ReLUs made Softplus(beta), residual branches scaled per stage.

    Use as a context around the attack (or any forward and backward pass)::

        with skipgrad.iaa(resnet50, beta=20, residual_scale=(0.98, 0.87, 0.73, 0.19)):
            adv = skipgrad.attack(resnet50, x, y, "mi")

    Args:
        model: a ReLU network; its residual branches (torchvision/timm ResNets, pre-activation
            ResNets, the zoo's ResNets, DenseNets' dense layers) are found by the block registry.
        beta: Softplus sharpness (20 for ResNet-18/34/50, 32 for ResNet-152, 35 for DenseNets).
        residual_scale: ``lambda``: one number for every residual branch, or one per stage in
            forward order (4 for torchvision ResNets and DenseNets); 1 leaves branches unscaled.

    Raises:
        NothingToChangeError: no ReLU and no residual branch to scale (a ``ValueError``).
        ValueError: ``beta`` or a ``residual_scale`` value not positive, a per-stage list whose
            length is not the number of stages, or a scale other than 1 on a model whose residual
            branches IAA cannot find.
    """

    method = "iaa"
    changes_forward = True

    def __init__(self, model: nn.Module, *, beta: float = 20.0,
                 residual_scale: float | Sequence[float] = 1.0) -> None:
        super().__init__(model)
        self.beta = check_beta(beta)
        stages = residual_stages(model)
        self.residual_scale = per_stage_scales(residual_scale, stages, model)
        self.stages = [name for name, _ in stages]
        relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
        scaled = [(block, output, scale, i + 1)
                  for i, ((_, blocks), scale) in enumerate(zip(stages, self.residual_scale))
                  if scale != 1.0 for block, output in blocks]
        self._check_applies(relus, stages, residual_scale)
        self._set_plan([*map(self._relu_attacher, (m for _, m in relus)),
                        *(self._scale_attacher(output, scale) for _, output, scale, _ in scaled)],
                       self._changes(relus, scaled),
                       [*relus, *((block, output) for block, output, _, _ in scaled)])

    def _check_applies(self, relus: list, stages: Stages, residual_scale: object) -> None:
        label = model_label(self.model)
        if not relus and not stages:
            raise NothingToChangeError(
                f"iaa found no ReLU and no residual branch it can scale in {label}; IAA applies "
                f"to ReLU networks with residual or dense blocks (ResNets, DenseNets)")
        if not stages and any(scale != 1.0 for scale in self.residual_scale or [residual_scale]):
            raise InputError(f"iaa: residual_scale={residual_scale!r} scales residual branches, "
                             f"but {label} has none that iaa can find; leave residual_scale=1")

    def _changes(self, relus: list, scaled: list) -> list[Change]:
        return [Change(n, f"ReLU -> Softplus(beta={self.beta:g}) in forward and backward")
                for n, _ in relus] + \
               [Change(block, f"residual branch x {scale:g} (stage {stage})")
                for block, _, scale, stage in scaled]

    def _relu_attacher(self, relu: nn.Module) -> Attacher:
        beta = self.beta
        return lambda: ForwardSwap(relu, lambda x: F.softplus(x, beta, SOFTPLUS_THRESHOLD))

    def _scale_attacher(self, output_module: nn.Module, scale: float) -> Attacher:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            return output * scale if isinstance(output, torch.Tensor) else None

        # Prepended: the branch output is scaled before any other hook on the module reads it
        # (Ghost's erosion adds the skip's change after it, whichever context was entered first).
        return lambda: output_module.register_forward_hook(hook, prepend=True)

    def __repr__(self) -> str:
        scales = "/".join(f"{s:g}" for s in self.residual_scale) or "-"
        return (f"iaa({model_label(self.model)}, beta={self.beta:g}, residual_scale={scales}: "
                f"{len(self.changes)} changed)")
