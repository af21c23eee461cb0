"""The hook placement of the authors' release, reproduced hook for hook.

The release (csdongxian/skip-connections-matter, ``utils_sgm.py``) attaches old-style module
backward hooks, which act on the ``grad_fn`` node of a module's output and rewrite that node's
gradient-with-respect-to-inputs. We register the same node hooks from forward hooks, in the same
order, so gradients match the release exactly, including its quirks:

* ResNet: every ReLU module whose name (relative to the ResNet) contains ``"relu"`` but not
  ``"0.relu"`` multiplies the gradient by gamma on every call -- once inside the branch and once after
  the addition (a global scale) for BasicBlocks, and by ``sqrt(gamma)`` three times for Bottlenecks.
  The stem ReLU is hooked too. ``"0.relu"`` excludes the first block of each stage and, by a substring
  accident, ``layer3.10/.20/.30`` of ResNet-101/152.
* ResNet: each block's output node divides the gradient by its standard deviation (over the whole
  batch tensor); a scale that changes no direction but keeps 150-layer gradients finite.
* DenseNet: every ReLU outside the transition layers multiplies by ``sqrt(gamma)`` (two per dense
  layer, plus the stem's); no normalisation.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from skipgrad.errors import InputError

NodeHook = Callable[[tuple, tuple], tuple]



class UnsupportedOfficialModelError(InputError):
    """``official=True`` was asked for a model the authors' release does not cover."""


def _scale_node_inputs(factor: float) -> NodeHook:
    def hook(grad_inputs: tuple, _grad_outputs: tuple) -> tuple:
        return tuple(None if g is None else g * factor for g in grad_inputs)

    return hook


def _normalise_node_inputs(grad_inputs: tuple, _grad_outputs: tuple) -> tuple:
    return tuple(None if g is None else g / torch.std(g) for g in grad_inputs)


def _on_output_node(module: nn.Module, node_hook: NodeHook) -> Callable[[], object]:
    """Attach ``node_hook`` to the grad_fn of every output ``module`` produces while attached."""

    def forward_hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            output.grad_fn.register_hook(node_hook)

    return lambda: module.register_forward_hook(forward_hook)


def _find(model: nn.Module, classes: tuple[type, ...]) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, classes)), None)


def _resnet_attachers(net: nn.Module, gamma: float) -> list[Callable[[], object]]:
    from torchvision.models.resnet import Bottleneck

    bottleneck = any(isinstance(m, Bottleneck) for m in net.modules())
    relu_hook = _scale_node_inputs(math.sqrt(gamma) if bottleneck else gamma)
    attachers = []
    for name, module in net.named_modules():
        if "relu" in name and "0.relu" not in name:
            attachers.append(_on_output_node(module, relu_hook))
        parts = name.split(".")
        if len(parts) >= 2 and "layer" in parts[-2]:
            attachers.append(_on_output_node(module, _normalise_node_inputs))
    return attachers


def _densenet_attachers(net: nn.Module, gamma: float) -> list[Callable[[], object]]:
    relu_hook = _scale_node_inputs(math.sqrt(gamma))
    return [_on_output_node(module, relu_hook) for name, module in net.named_modules()
            if "relu" in name and "transition" not in name]


def official_attachers(model: nn.Module, gamma: float) -> list[Callable[[], object]]:
    """Hook attachers reproducing the release on the torchvision ResNet/DenseNet inside ``model``."""
    try:
        from torchvision.models import DenseNet, ResNet
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency
        raise UnsupportedOfficialModelError("official=True needs torchvision") from exc
    net = _find(model, (ResNet, DenseNet))
    if net is None:
        raise UnsupportedOfficialModelError(
            f"official=True reproduces the authors' release, which supports only torchvision "
            f"ResNet and DenseNet models; none found in {type(model).__name__} "
            "(use the default official=False, which finds residual blocks structurally)")
    if isinstance(net, ResNet):
        return _resnet_attachers(net, gamma)
    return _densenet_attachers(net, gamma)
