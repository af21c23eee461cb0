"""Statistics for transfer experiments: binomial intervals and paired comparisons.

Two attacks run on the *same* images give paired outcomes, so their difference is judged with paired
statistics (McNemar's exact test on the discordant images, Newcombe's interval for the difference),
which are far tighter than comparing two independent intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from skipgrad.binomial import binomial_test

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
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

    ``both`` counts the images fooled by both attacks, ``only_a``/``only_b`` the discordant images
    (fooled by one attack only); ``p_value`` is the exact two-sided McNemar test and ``ci95`` the
    Newcombe interval of the difference (:func:`newcombe_paired_interval`).
    """

    n: int
    rate_a: float
    rate_b: float
    both: int
    only_a: int
    only_b: int
    difference: float
    p_value: float

    @property
    def neither(self) -> int:
        """Images fooled by neither attack."""
        return self.n - self.both - self.only_a - self.only_b

    @property
    def ci95(self) -> tuple[float, float]:
        """95% interval of ``difference``: Newcombe's hybrid score interval for paired data."""
        return newcombe_paired_interval(self.both, self.only_a, self.only_b, self.neither)


def paired_comparison(success_a: torch.Tensor, success_b: torch.Tensor) -> PairedComparison:
    """Compare two per-image boolean success vectors from the same images."""
    a, b = success_a.bool().flatten(), success_b.bool().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError("paired comparison needs two non-empty outcome vectors of equal length")
    n = a.numel()
    both, only_a, only_b = int((a & b).sum()), int((a & ~b).sum()), int((b & ~a).sum())
    return PairedComparison(n, (both + only_a) / n, (both + only_b) / n, both, only_a, only_b,
                            (only_b - only_a) / n, mcnemar_exact(only_a, only_b))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: a binomial test of the discordant pairs at p = 1/2
    (:func:`skipgrad.binomial.binomial_test`, right for any number of pairs)."""
    return binomial_test(only_a, only_a + only_b)


def newcombe_paired_interval(both: int, only_a: int, only_b: int, neither: int,
                             z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for ``rate_b - rate_a`` from paired binary outcomes.

    Method 10 of R. G. Newcombe, "Improved confidence intervals for the difference between
    binomial proportions based on paired data", Statistics in Medicine 17:2635-2650 (1998): the
    Wilson intervals of the two success rates, combined by "square and add" with the correlation
    of the pairs (its numerator ``both * neither - only_a * only_b`` reduced by n/2 when positive).
    Unlike the normal (Wald) interval it stays inside [-1, 1], does not collapse to a point when no
    image is discordant, and is asymmetric near the bounds.

    It is an approximation and McNemar's exact test is conservative, so the two can disagree just
    above p = 0.05: over the grid in tests/test_stats.py (n from 10 to 1000, 0-40 images fooled by
    one attack only on each side, three concordant splits; 24711 tables) "interval excludes 0" and
    "exact McNemar p < 0.05" disagree on 744 tables (3.0%; the normal interval this replaces: 1002,
    4.1%), every one an interval that excludes 0 at p >= 0.05, 730 of them at p < 0.1. Read
    significance from the test.
    """
    counts = (both, only_a, only_b, neither)
    if any(c < 0 for c in counts):
        raise ValueError(f"paired counts must be >= 0, got {counts}")
    n = sum(counts)
    if n == 0:
        return (-1.0, 1.0)
    # Newcombe's e, f, g, h, with his theta = (f - g) / n our rate_b - rate_a.
    e, f, g, h = both, only_b, only_a, neither
    rate_b, rate_a = (e + f) / n, (e + g) / n
    low_b, high_b = wilson_interval(e + f, n, z)
    low_a, high_a = wilson_interval(e + g, n, z)
    phi = _paired_correlation(e, f, g, h)
    diff = rate_b - rate_a
    below = _square_and_add(rate_b - low_b, high_a - rate_a, phi)
    above = _square_and_add(high_b - rate_b, rate_a - low_a, phi)
    return (max(-1.0, diff - below), min(1.0, diff + above))


def _paired_correlation(e: int, f: int, g: int, h: int) -> float:
    """Newcombe's phi for method 10: the phi coefficient of the 2x2 table, its numerator
    ``eh - fg`` replaced by ``max(eh - fg - n/2, 0)`` when positive; 0 when a margin is empty."""
    margins = (e + f) * (g + h) * (e + g) * (f + h)
    if margins == 0:
        return 0.0
    numerator = e * h - f * g
    if numerator > 0:
        numerator = max(numerator - (e + f + g + h) / 2, 0.0)
    return numerator / math.sqrt(margins)


def _square_and_add(d1: float, d2: float, phi: float) -> float:
    return math.sqrt(max(0.0, d1 * d1 - 2.0 * phi * d1 * d2 + d2 * d2))


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
