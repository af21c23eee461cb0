"""Paired effects: what a change to an attack (SGM, a backward-pass method) does on one target,
measured on the same images as the attack without it (:func:`skipgrad.analysis.stats.paired_comparison`).

Outcomes are keyed ``(source, attack, gamma, backward, target)`` -> per-image success (bool tensor),
as transfer, sweep and the demo collect them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from skipgrad.analysis.stats import PairedComparison, benjamini_hochberg, paired_comparison


@dataclass(frozen=True)
class SGMEffect:
    """SGM at ``gamma`` vs the same attack without SGM, on one target, same images; both with the
    same backward-pass methods ``backward`` (a label, or None)."""

    source: str
    attack: str
    gamma: float
    target: str
    comparison: PairedComparison
    backward: str | None = None

    def to_json(self) -> dict:
        c = self.comparison
        return {"source": self.source, "attack": self.attack, "sgm": self.gamma,
                "backward": self.backward, "target": self.target, "n": c.n,
                "baseline": c.rate_a, "with_sgm": c.rate_b,
                "difference": c.difference, "ci95": list(c.ci95), "only_baseline": c.only_a,
                "only_sgm": c.only_b, "mcnemar_p": c.p_value}

    @property
    def variant(self) -> str:
        """The attack both cells share, e.g. ``mi`` or ``mi+linbp``."""
        return self.attack if self.backward is None else f"{self.attack}+{self.backward}"

    @property
    def change(self) -> str:
        """What the compared cell adds: ``SGM (γ=0.5)``."""
        return f"SGM (γ={self.gamma:g})"


@dataclass(frozen=True)
class BackwardEffect:
    """A backward-pass method vs the same attack without it (same SGM gamma or none), on one
    target, same images."""

    source: str
    attack: str
    gamma: float | None
    method: str
    target: str
    comparison: PairedComparison

    @property
    def variant(self) -> str:
        """The attack both cells share, e.g. ``mi`` or ``mi+sgm 0.5``."""
        return self.attack if self.gamma is None else f"{self.attack}+sgm {self.gamma:g}"

    @property
    def change(self) -> str:
        """What the compared cell adds: the method's label."""
        return self.method

    def to_json(self) -> dict:
        c = self.comparison
        return {"source": self.source, "attack": self.attack, "sgm": self.gamma,
                "backward": self.method, "target": self.target, "n": c.n,
                "without_method": c.rate_a, "with_method": c.rate_b,
                "difference": c.difference, "ci95": list(c.ci95), "only_without": c.only_a,
                "only_with": c.only_b, "mcnemar_p": c.p_value}


def sgm_effects(outcomes: dict[tuple, torch.Tensor]) -> list[SGMEffect]:
    """Pair every SGM cell with the no-SGM cell of the same source, attack, backward-pass
    methods and target (outcome keys: ``(source, attack, gamma, backward, target)``)."""
    effects = []
    for (source, attack, gamma, backward, target), success in outcomes.items():
        baseline = outcomes.get((source, attack, None, backward, target))
        if gamma is None or baseline is None:
            continue
        effects.append(SGMEffect(source, attack, gamma, target,
                                 paired_comparison(baseline, success), backward))
    return effects


def backward_effects(outcomes: dict[tuple, torch.Tensor]) -> list[BackwardEffect]:
    """Pair every cell with a backward-pass method with the cell without it (same source,
    attack, gamma and target)."""
    effects = []
    for (source, attack, gamma, backward, target), success in outcomes.items():
        baseline = outcomes.get((source, attack, gamma, None, target))
        if backward is None or baseline is None:
            continue
        effects.append(BackwardEffect(source, attack, gamma, backward, target,
                                      paired_comparison(baseline, success)))
    return effects


def transfer_q_values(effects: Sequence[SGMEffect]) -> dict[int, float]:
    """Benjamini-Hochberg q-values of the transfer effects (white-box cells, where the target is
    the source, are left out of the family), keyed by ``id(effect)``."""
    transfer = [e for e in effects if e.target != e.source]
    return dict(zip(map(id, transfer), benjamini_hochberg([e.comparison.p_value for e in transfer])))
