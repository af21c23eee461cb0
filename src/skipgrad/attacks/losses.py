"""Per-sample attack objectives, written so that the attack always *ascends* them."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attack_objective(logits: torch.Tensor, labels: torch.Tensor, loss: str,
                     targeted: bool) -> torch.Tensor:
    """Per-sample objective to maximise.

    ``"ce"``: cross-entropy of the true label (untargeted) or its negative for the target label.
    ``"margin"``: the Carlini-Wagner logit margin (Carlini & Wagner, S&P 2017), unclamped so the
    attack keeps pushing past the decision boundary, which helps transfer: ``max_{j!=y} z_j - z_y``
    untargeted, ``z_t - max_{j!=t} z_j`` targeted.
    """
    logits = logits.float()
    if loss == "ce":
        ce = F.cross_entropy(logits, labels, reduction="none")
        return -ce if targeted else ce
    label_logit = logits.gather(1, labels[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    best_other = others.max(dim=1).values
    return label_logit - best_other if targeted else best_other - label_logit
