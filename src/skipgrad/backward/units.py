"""Where along a network a backward-pass method starts: residual blocks or trunk ReLUs.

LinBP and BPA act "from a layer on". Both find the candidate units by structure, in module order
(which is forward order for sequentially built networks such as torchvision's and timm's): the
residual blocks of :func:`~skipgrad.backward.sgm.find_blocks` when a model has them, else the ReLUs
of its convolutional trunk. ``start`` then names one unit (or indexes the list).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from skipgrad.backward.base import model_label
from skipgrad.errors import InputError

def trunk_relus(model: nn.Module) -> list[tuple[str, nn.ReLU]]:
    """The ``nn.ReLU`` modules of the convolutional trunk, in module order.

    The trunk ends at the classifier head: the first ``nn.Linear`` after the last convolution.
    Both releases leave the head's ReLUs alone (VGG's two in ``classifier``), so we do too.
    """
    modules = list(model.named_modules())
    convs = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.modules.conv._ConvNd)]
    last_conv = convs[-1] if convs else -1
    head = next((i for i, (_, m) in enumerate(modules)
                 if i > last_conv and isinstance(m, nn.Linear)), len(modules))
    return [(name, m) for i, (name, m) in enumerate(modules[:head]) if isinstance(m, nn.ReLU)]


def resolve_start(method: str, model: nn.Module, units: Sequence[str], start: str | int | None,
                  default: int, what: str) -> int:
    """Index of the unit ``start`` names in ``units`` (``default`` when ``start`` is ``None``).

    ``start`` is a unit's module name (as in ``model.named_modules()``) or an index into the
    units (negative counts from the end). Anything else is a ``ValueError`` listing the valid names.
    """
    if start is None:
        return default
    if isinstance(start, int) and not isinstance(start, bool):
        if -len(units) <= start < len(units):
            return start % len(units)
        raise InputError(f"{method}: start={start} is out of range: {model_label(model)} has "
                         f"{len(units)} {what}")
    if isinstance(start, str) and start in units:
        return list(units).index(start)
    raise InputError(f"{method}: start={start!r} is not one of the {what} of "
                     f"{model_label(model)}; valid: {', '.join(units)}")
