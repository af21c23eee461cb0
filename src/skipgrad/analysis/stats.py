"""Statistics for transfer experiments: binomial intervals and paired comparisons.

Two attacks run on the *same* images give paired outcomes, so their difference is judged with paired
statistics (McNemar's test on the discordant images), which are far tighter than comparing two
independent intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n == 0."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class PairedComparison:
    """Success of attack B minus success of attack A on the same images.

    ``only_a``/``only_b`` count the discordant images (fooled by one attack only); ``p_value`` is the
    exact two-sided McNemar test; ``se`` the standard error of the paired difference.
    """

    n: int
    rate_a: float
    rate_b: float
    only_a: int
    only_b: int
    difference: float
    se: float
    p_value: float

    @property
    def ci95(self) -> tuple[float, float]:
        """Normal-approximation 95% interval of the paired difference."""
        return (self.difference - 1.96 * self.se, self.difference + 1.96 * self.se)


def paired_comparison(success_a: torch.Tensor, success_b: torch.Tensor) -> PairedComparison:
    """Compare two per-image boolean success vectors from the same images."""
    a, b = success_a.bool().flatten(), success_b.bool().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError("paired comparison needs two non-empty outcome vectors of equal length")
    n = a.numel()
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    diff = b.double() - a.double()
    se = float(diff.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return PairedComparison(n, float(a.double().mean()), float(b.double().mean()), only_a, only_b,
                            float(diff.mean()), se, mcnemar_exact(only_a, only_b))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: a binomial test of the discordant pairs at p = 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2 * tail)


def benjamini_hochberg(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order.

    A study compares hundreds of (source, attack, gamma, target) cells; at p < 0.05 one in twenty
    true nulls would look significant. Calling a cell significant when its q-value is below alpha
    controls the expected share of false discoveries among those called at alpha.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 1.0
    for rank in range(m, 0, -1):  # from the largest p down, keeping the adjusted values monotone
        i = order[rank - 1]
        running = min(running, p_values[i] * m / rank)
        adjusted[i] = min(1.0, running)
    return adjusted
