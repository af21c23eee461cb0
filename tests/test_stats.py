"""Binomial intervals and paired statistics against known values."""
from __future__ import annotations

import math

import pytest
import torch

from skipgrad.analysis.stats import mcnemar_exact, paired_comparison, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-4) and math.isclose(hi, 0.5962, abs_tol=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and math.isclose(wilson_interval(10, 10)[1], 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_matches_binomial_tail():
    # 2 vs 10 discordant: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * 79 / 4096
    assert math.isclose(mcnemar_exact(2, 10), 2 * 79 / 4096)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_comparison_counts_discordant_images():
    a = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 1, 1, 1], dtype=torch.bool)
    cmp = paired_comparison(a, b)
    assert (cmp.only_a, cmp.only_b, cmp.n) == (1, 3, 6)
    assert math.isclose(cmp.difference, 2 / 6)
    assert cmp.ci95[0] < cmp.difference < cmp.ci95[1]
    with pytest.raises(ValueError):
        paired_comparison(a, b[:3])


def test_benjamini_hochberg_matches_the_step_up_definition():
    from skipgrad.analysis.stats import benjamini_hochberg

    p = [0.01, 0.04, 0.03, 0.20, 0.001]
    q = benjamini_hochberg(p)
    # Sorted p: 0.001, 0.01, 0.03, 0.04, 0.20 -> p*m/rank: 0.005, 0.025, 0.05, 0.05, 0.20, then the
    # running minimum from the top keeps them monotone; results map back to the input order.
    assert q == pytest.approx([0.025, 0.05, 0.05, 0.20, 0.005])
    assert benjamini_hochberg([]) == []
    assert benjamini_hochberg([0.9, 0.9]) == [0.9, 0.9]
