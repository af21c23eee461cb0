"""Binomial tests, intervals and paired statistics against known values, exact rational
arithmetic, scipy, and the published tables of Newcombe (1998)."""
from __future__ import annotations

import ast
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from scipy import stats as scipy_stats

import skipgrad.binomial
from skipgrad.analysis.stats import (mcnemar_exact, newcombe_paired_interval, paired_comparison,
                                     wilson_interval)
from skipgrad.binomial import binomial_tail, binomial_test


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
    assert (cmp.both, cmp.only_a, cmp.only_b, cmp.neither, cmp.n) == (2, 1, 3, 0, 6)
    assert (cmp.rate_a, cmp.rate_b) == (float(a.double().mean()), float(b.double().mean()))
    assert math.isclose(cmp.difference, 2 / 6)
    assert cmp.ci95 == newcombe_paired_interval(2, 1, 3, 0)
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


# ---------------------------------------------------------------- the exact binomial test

def _exact_lower_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Bin(n, 1/2) in rational arithmetic, rounded once to a float."""
    return float(Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n))


def test_mcnemar_exact_survives_a_thousand_discordant_pairs():
    # 1100 discordant pairs: the old sum(comb) / 2.0**n raised OverflowError (2.0**1100).
    expected = scipy_stats.binomtest(500, 1100, 0.5).pvalue
    assert math.isclose(mcnemar_exact(600, 500), expected, rel_tol=1e-12)
    assert mcnemar_exact(600, 500) == mcnemar_exact(500, 600)
    assert mcnemar_exact(10_000, 10_000) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_mcnemar_exact_is_bitwise_the_rational_value_for_small_counts():
    # Up to 1000 pairs the tail is one rounding of the exact fraction, as the old sum of comb
    # was: p-values (and the docs tables printed from them) do not move. 6 / 1 is exactly 0.125.
    for n in range(0, 80):
        for k in range(n + 1):
            exact = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n)
            assert mcnemar_exact(k, n - k) == exact, (k, n)
    assert mcnemar_exact(6, 1) == 0.125 and f"{mcnemar_exact(6, 1):.2g}" == "0.12"
    assert mcnemar_exact(480, 520) == float(Fraction(2 * sum(math.comb(1000, i)
                                                          for i in range(481)), 2**1000))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 15, 16, 31, 100, 1023, 1024, 1100, 5000, 20000])
def test_binomial_test_matches_scipy(n):
    ks = {0, 1, n // 3, n // 2 - 40, n // 2 - 3, n // 2, n // 2 + 1, n - 1, n} & set(range(n + 1))
    for k in sorted(ks):
        for alternative in ("two-sided", "greater", "less"):
            ours = binomial_test(k, n, alternative)
            ref = scipy_stats.binomtest(k, n, 0.5, alternative=alternative).pvalue
            if ref > 1e-300:  # below that scipy's own value flushes to 0 (next test)
                assert math.isclose(ours, ref, rel_tol=1e-11), (k, n, alternative, ours, ref)
            else:
                assert ours < 1e-290


@pytest.mark.parametrize(("k", "n"), [(2, 12), (31, 1100), (64, 1100), (350, 1100), (520, 1100),
                                      (550, 1100), (0, 1024), (1, 2000)])
def test_binomial_tail_matches_exact_rational_arithmetic(k, n):
    # (31, 1100) is ~1.2e-271: representable, and scipy.stats.binom.cdf returns 0.0 there.
    assert math.isclose(binomial_tail(k, n, upper=False), _exact_lower_tail(k, n), rel_tol=1e-12)
    assert math.isclose(binomial_tail(n - k, n, upper=True), _exact_lower_tail(k, n), rel_tol=1e-12)


def test_binomial_tail_at_other_probabilities_matches_scipy():
    for n in (9, 400, 5000):
        for p in (0.01, 0.3, 0.7, 0.999):
            for k in {0, 1, int(n * p) - 1, int(n * p), int(n * p) + 2, n - 1, n}:
                pairs = ((binomial_tail(k, n, p, upper=True), scipy_stats.binom.sf(k - 1, n, p)),
                         (binomial_tail(k, n, p, upper=False), scipy_stats.binom.cdf(k, n, p)))
                for ours, ref in pairs:
                    if ref > 1e-300:
                        assert math.isclose(ours, ref, rel_tol=1e-11), (k, n, p, ours, ref)


def test_binomial_test_is_exact_at_the_edges_and_underflows_only_below_the_smallest_float():
    assert binomial_test(3, 3) == 0.25 and binomial_test(0, 11) == 2.0**-10  # 2 * 2**-n exactly
    assert binomial_test(0, 1074) == 2.0**-1073 and binomial_test(0, 1075) == 2.0**-1074
    assert binomial_test(0, 1076) == 0.0  # 2**-1075 is below the smallest subnormal float
    assert binomial_test(5, 10) == 1.0 and binomial_test(0, 0) == 1.0
    # One-sided at the far end of a long support: 2**-20000 underflows, P(X >= 1) does not.
    assert binomial_test(20000, 20000, "greater") == 0.0
    assert binomial_test(1, 20000, "greater") == 1.0


def test_binomial_test_names_bad_input():
    with pytest.raises(ValueError, match=r"successes \(6\) cannot exceed trials \(5\)"):
        binomial_test(6, 5)
    with pytest.raises(ValueError, match="successes must be >= 0, got -1"):
        binomial_test(-1, 5)
    with pytest.raises(TypeError, match="trials must be an integer, got 5.0"):
        binomial_test(2, 5.0)
    with pytest.raises(ValueError, match="alternative must be one of two-sided, greater, less"):
        binomial_test(2, 5, "two_sided")
    with pytest.raises(ValueError, match=r"success probability must lie in \(0, 1\), got 1.0"):
        binomial_tail(2, 5, 1.0)
    assert binomial_test(torch.tensor(3), torch.tensor(3)) == 0.25  # integer tensors are counts


def test_binomial_module_imports_nothing_from_skipgrad():
    # The core layer (the smoothing defense) imports it: it must sit below every skipgrad layer.
    tree = ast.parse(Path(skipgrad.binomial.__file__).read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [name for name in imported if name.split(".")[0] == "skipgrad"]


# ---------------------------------------------------------------- Newcombe's paired interval

# Newcombe RG (1998). Improved confidence intervals for the difference between binomial
# proportions based on paired data. Statistics in Medicine 17:2635-2650, Table III, method 10
# (95%), printed to 4 decimals. Newcombe's cells: e = both positive, f = first only, g = second
# only, h = neither; theta = (f - g) / n, i.e. our rate_b - rate_a with only_b = f, only_a = g.
NEWCOMBE_TABLE_III = [
    ((36, 12, 2, 0), (0.0569, 0.3404)),
    ((20, 12, 2, 16), (0.0562, 0.3292)),
    ((18, 12, 2, 18), (0.0562, 0.3290)),
    ((36, 14, 0, 0), (0.1528, 0.4167)),
    ((35, 14, 0, 1), (0.1461, 0.4175)),
    ((18, 14, 0, 18), (0.1441, 0.3963)),
    ((2, 97, 1, 0), (0.8721, 0.9854)),
    ((1, 97, 1, 1), (None, 0.9850)),  # lower: see the test below
    ((0, 29, 1, 0), (0.6666, 0.9882)),
    ((2, 98, 0, 0), (0.9178, 0.9945)),
    ((1, 98, 0, 1), (0.9171, 0.9916)),
    ((0, 30, 0, 0), (0.8395, 1.0)),
    ((54, 0, 0, 0), (-0.0664, 0.0664)),
    ((53, 0, 0, 1), (-0.0729, 0.0729)),
    ((30, 0, 0, 24), (-0.0358, 0.0358)),
    ((29, 0, 0, 25), (-0.0354, 0.0354)),
    ((28, 0, 0, 26), (-0.0352, 0.0352)),
    ((27, 0, 0, 27), (-0.0351, 0.0351)),
]


@pytest.mark.parametrize(("cells", "printed"), NEWCOMBE_TABLE_III)
def test_newcombe_interval_reproduces_table_iii_of_the_paper(cells, printed):
    e, f, g, h = cells
    lo, hi = newcombe_paired_interval(both=e, only_a=g, only_b=f, neither=h)
    half_unit = 0.5e-4 + 1e-12  # the table's rounding
    if printed[0] is not None:
        assert abs(lo - printed[0]) <= half_unit, (cells, lo)
    assert abs(hi - printed[1]) <= half_unit, (cells, hi)


def test_newcombe_table_iii_row_whose_lower_limit_is_printed_one_unit_off():
    # e 1 f 97 g 1 h 1: eh < fg, so methods 8 and 10 are the same formula here (method 10 only
    # changes phi when eh > fg); the paper prints 0.8737 for method 8 and 0.8736 for method 10.
    lo, _ = newcombe_paired_interval(both=1, only_a=1, only_b=97, neither=1)
    assert round(lo, 4) == 0.8737


def test_paired_interval_without_discordant_images_is_not_a_point():
    # The normal interval collapsed to [0, 0] here; Newcombe's row e 54 f 0 g 0 h 0.
    same = torch.ones(54, dtype=torch.bool)
    cmp = paired_comparison(same, same)
    assert (cmp.difference, cmp.p_value) == (0.0, 1.0)
    lo, hi = cmp.ci95
    assert abs(lo + 0.0664) <= 0.5e-4 and abs(hi - 0.0664) <= 0.5e-4
    # 0 / 3 discordant images out of 1000 (p = 0.25) printed as +0.3 [-0.0, +0.6], which read as
    # an interval touching 0 from above; the interval now covers 0 plainly.
    lo, hi = newcombe_paired_interval(both=500, only_a=0, only_b=3, neither=497)
    assert lo < -0.0005 and hi > 0.0065 and mcnemar_exact(0, 3) == 0.25


def test_newcombe_interval_bounds_and_errors():
    assert newcombe_paired_interval(0, 0, 0, 0) == (-1.0, 1.0)
    assert newcombe_paired_interval(0, 0, 30, 0)[1] == 1.0  # never past the range of a difference
    assert newcombe_paired_interval(0, 30, 0, 0) == tuple(-x for x in reversed(
        newcombe_paired_interval(0, 0, 30, 0)))  # swapping A and B mirrors the interval
    with pytest.raises(ValueError, match=r"paired counts must be >= 0, got \(1, -1, 0, 0\)"):
        newcombe_paired_interval(1, -1, 0, 0)


def _wald_interval(both: int, only_a: int, only_b: int, neither: int) -> tuple[float, float]:
    """The normal interval that ``ci95`` was before: difference +- 1.96 standard errors of the
    per-image differences (sample variance)."""
    n = both + only_a + only_b + neither
    d = (only_b - only_a) / n
    se = math.sqrt((only_a + only_b - n * d * d) / (n - 1) / n)
    return d - 1.96 * se, d + 1.96 * se


def test_interval_and_exact_test_disagree_rarely_and_only_just_above_p_005():
    """The numbers in the docstring of ``newcombe_paired_interval``."""
    tables = disagree = disagree_wald = near = 0
    for n in (10, 20, 50, 100, 200, 500, 1000):
        for only_a in range(41):
            for only_b in range(41):
                if only_a + only_b > n:
                    continue
                p = mcnemar_exact(only_a, only_b)
                concordant = n - only_a - only_b
                for share_both in (0.1, 0.5, 0.9):
                    both = round(share_both * concordant)
                    cells = (both, only_a, only_b, concordant - both)
                    lo, hi = newcombe_paired_interval(*cells)
                    tables += 1
                    if (lo > 0 or hi < 0) != (p < 0.05):
                        assert p >= 0.05  # never the other way: an interval covering 0 at p < 0.05
                        disagree += 1
                        near += p < 0.1
                    lo, hi = _wald_interval(*cells)
                    disagree_wald += (lo > 0 or hi < 0) != (p < 0.05)
    assert (tables, disagree, near, disagree_wald) == (24711, 744, 730, 1002)
