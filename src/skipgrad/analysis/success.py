"""The success rule: when an adversarial image counts as fooling a model.

Success rate = 1 - the target's top-1 accuracy on the adversarial images, all images counted (the
paper's protocol). Untargeted: the prediction is a class other than the true label. Targeted: the
prediction is the target class. A smoothed target that abstains (:data:`ABSTAIN`, no class wins
its vote) predicted no class at all: that image was *not* fooled, in both settings
(docs/defenses.md). Every success count in skipgrad (evaluate, transfer, sweep, compare,
``--sgm auto``, the white-box line of ``attack``) comes from :func:`succeeded`.
"""
from __future__ import annotations

import torch

from skipgrad.models.defenses import ABSTAIN


def succeeded(predictions: torch.Tensor, labels: torch.Tensor,
              targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image success (bool) of an attack whose images the model classified as
    ``predictions``: untargeted (``targets`` None) the true ``labels`` were left, targeted the
    ``targets`` were reached; an abstention is never a success."""
    if targets is not None:
        return predictions == targets
    return (predictions != labels) & (predictions != ABSTAIN)
