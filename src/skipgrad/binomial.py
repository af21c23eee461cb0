"""Exact binomial tail probabilities and the exact binomial test of a fair coin, for any n.

A base module: it imports nothing from skipgrad, so that both the core layer (the vote of
randomized smoothing in :mod:`skipgrad.models.defenses`) and the statistics (McNemar's test in
:mod:`skipgrad.stats`) use this one test.

Summing ``comb(n, i) / 2**n`` overflows a float at n = 1024 (``2.0**1024``), and log-gamma
differences lose digits as n grows (``lgamma(n + 1)`` is ~n log n). Here a tail is one probability
from Loader's saddle-point form of the binomial density (C. Loader, "Fast and accurate computation
of binomial probabilities", 2000: Stirling-formula errors and a deviance term, each small and
computed without cancellation) times a sum of ratios from the recurrence
``P(i + 1) / P(i) = (n - i) p / ((i + 1) (1 - p))``, summed from the tail's end nearest the mean
outwards until the rest cannot change the sum. The result keeps ~1e-12 relative precision and is 0
only where the true value is below the smallest float (~5e-324). A fair coin's tails up to
:data:`EXACT_FAIR_COIN_MAX_N` trials are summed in integers instead, and rounded once.
"""
from __future__ import annotations

import math
import operator
import sys

_LOG_2PI = math.log(2 * math.pi)
_EPS = 2.0**-53
ALTERNATIVES = ("two-sided", "greater", "less")
# Up to here a fair coin's tail is summed in integers and rounded once, so that exact values
# stay exact: 2 * 8/128 is 0.125, not 0.12500000000000003 (which prints "0.13" at two digits),
# and an alpha such as 2**-10 compares as it should. At 1000 trials that takes ~0.3 ms.
EXACT_FAIR_COIN_MAX_N = 1000


def binomial_tail(k: int, n: int, p: float = 0.5, *, upper: bool = True) -> float:
    """``P(X >= k)`` (``upper``) or ``P(X <= k)`` for ``X ~ Binomial(n, p)``, to ~1e-12 relative
    for any ``n``; ``k`` may lie outside ``[0, n]`` (the tail is then 0 or 1)."""
    k, n = _count(k, "k"), _count(n, "n", minimum=0)
    if not 0.0 < p < 1.0:
        raise ValueError(f"the success probability must lie in (0, 1), got {p!r}")
    return _tail(k, n, p, upper)


def binomial_test(successes: int, trials: int, alternative: str = "two-sided") -> float:
    """Exact p-value of ``successes`` in ``trials`` under H0: success probability 1/2.

    ``two-sided`` is ``min(1, 2 * P(X <= min(successes, trials - successes)))``: at 1/2 the
    distribution is symmetric, so this equals the "as likely or less likely" p-value of
    ``scipy.stats.binomtest`` and R's ``binom.test``. ``greater`` is ``P(X >= successes)``,
    ``less`` is ``P(X <= successes)``. No trials: 1.0.
    """
    successes, trials = _count(successes, "successes", 0), _count(trials, "trials", 0)
    if successes > trials:
        raise ValueError(f"successes ({successes}) cannot exceed trials ({trials})")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(ALTERNATIVES)}, "
                         f"got {alternative!r}")
    if alternative == "greater":
        return binomial_tail(successes, trials, upper=True)
    if alternative == "less":
        return binomial_tail(successes, trials, upper=False)
    smaller = min(successes, trials - successes)
    return min(1.0, _tail(smaller, trials, 0.5, upper=False, scale=2))


def _tail(k: int, n: int, p: float, upper: bool, scale: int = 1) -> float:
    """``scale`` times the tail; the two-sided test doubles inside, so that a doubled tail
    below the smallest normal float is not rounded to 0 first."""
    if p == 0.5 and n <= EXACT_FAIR_COIN_MAX_N and 0 <= k <= n:
        return _fair_coin_tail(k, n, upper, scale)
    if upper:
        if k <= 0:
            return float(scale)
        if k > n:
            return 0.0
        # Sum outwards from the end nearest the mean, where the terms only fall; the other tail
        # is then at least ~1/2, so its complement loses nothing that matters.
        if k >= n * p:
            return _outer_sum(k, n, p, +1, scale)
        return scale * (1.0 - _outer_sum(k - 1, n, p, -1))
    if k >= n:
        return float(scale)
    if k < 0:
        return 0.0
    if k <= n * p:
        return _outer_sum(k, n, p, -1, scale)
    return scale * (1.0 - _outer_sum(k + 1, n, p, +1))


def _fair_coin_tail(k: int, n: int, upper: bool, scale: int) -> float:
    """``scale * P(X >= k)`` or ``scale * P(X <= k)`` at p = 1/2 as one correctly rounded
    division of integers (the shorter sum, the other side by complement)."""
    if upper:
        k = n - k  # P(X >= k) = P(X <= n - k) by symmetry
    # P(X <= k) = 1 - P(X <= n - k - 1): sum the shorter side.
    count = _comb_sum(k, n) if 2 * k <= n else 2**n - _comb_sum(n - k - 1, n)
    return scale * count / 2**n


def _comb_sum(k: int, n: int) -> int:
    """``comb(n, 0) + ... + comb(n, k)``, each term from the last (0 when ``k < 0``)."""
    count = term = int(k >= 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)
        count += term
    return count


def _count(value: int, name: str, minimum: int | None = None) -> int:
    try:
        count = operator.index(value)  # ints, numpy and 0-d torch integers; never a float
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {count}")
    return count


def _outer_sum(k: int, n: int, p: float, step: int, scale: int = 1) -> float:
    """``scale * (P(X = k) + P(X = k + step) + ...)`` to the end of the support, for ``k`` on the
    side of the mean that ``step`` moves away from (so every ratio of neighbours is below 1)."""
    if k in (0, n):  # then the only term (0 lies below the mean, n above): a power, exact at 1/2
        power = (1.0 - p) ** n if k == 0 else p**n
        if power >= sys.float_info.min:
            return scale * power
        log_power = n * (math.log1p(-p) if k == 0 else math.log(p))
        return math.exp(math.log(scale) + log_power)
    odds = p / (1.0 - p)
    total = term = 1.0  # in units of P(X = k)
    i = k
    while 0 <= i + step <= n:
        ratio = (n - i) * odds / (i + 1) if step > 0 else i / ((n - i + 1) * odds)
        term *= ratio
        total += term
        i += step
        # The ratios keep falling away from the mean, so the rest is below a geometric series.
        if term * ratio < (1.0 - ratio) * total * _EPS:
            break
    return math.exp(math.log(scale) + _log_pmf(k, n, p) + math.log(total))


def _log_pmf(k: int, n: int, p: float) -> float:
    """``log P(X = k)`` for ``0 < k < n``, without the cancellation of ``lgamma(n + 1) - ...``."""
    log_c = (_stirling_error(n) - _stirling_error(k) - _stirling_error(n - k)
             - _deviance(k, n * p) - _deviance(n - k, n * (1.0 - p)))
    return log_c - 0.5 * (_LOG_2PI + math.log(k) + math.log1p(-k / n))


def _stirling_error(x: int) -> float:
    """``log(x!) - ((x + 1/2) log x - x + log sqrt(2 pi))`` for ``x >= 1``."""
    if x <= 15:  # small: the direct difference has an absolute error ~1e-14
        return math.lgamma(x + 1.0) - (x + 0.5) * math.log(x) + x - 0.5 * _LOG_2PI
    inv2 = 1.0 / (x * x)
    # Asymptotic series; the next term, 691 / (360360 x^11), is below 1e-16 for x > 15.
    return (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 * (1 / 1680 - inv2 / 1188)))) / x


def _deviance(x: float, mean: float) -> float:
    """``x log(x / mean) + mean - x``, by its series in ``v = (x - mean) / (x + mean)`` near the
    mean, where the direct form would cancel."""
    if abs(x - mean) >= 0.1 * (x + mean):
        return x * math.log(x / mean) + mean - x
    v = (x - mean) / (x + mean)
    total, odd_power, v2, j = (x - mean) * v, 2.0 * x * v, v * v, 1
    while True:  # 2x (v^3/3 + v^5/5 + ...): |v| < 0.1, so each term is < 1% of the last
        odd_power *= v2
        updated = total + odd_power / (2 * j + 1)
        if updated == total:
            return total
        total, j = updated, j + 1
