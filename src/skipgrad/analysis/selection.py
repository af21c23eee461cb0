"""Selection rules: which SGM gamma a curve of success rates recommends, and the grid it is chosen
from (sweeps and ``--sgm auto`` share both)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from skipgrad.gamma import check_gamma

# The gamma grid of sweeps and of --sgm auto: 0.1, ..., 1.0 (1.0 is the plain gradient).
DEFAULT_GAMMAS = tuple(round(0.1 * k, 1) for k in range(1, 11))


# Two success rates closer than this are a tie (they are ratios of counts, so ties are exact).
_TIE = 1e-12


def best_gamma(curve: Mapping[float, float]) -> float:
    """The gamma with the highest score; ties go to the largest gamma (the smallest change to the
    plain gradient), so the choice is deterministic and never more aggressive than the data says."""
    if not curve:
        raise ValueError("best_gamma needs at least one (gamma, score) pair")
    top = max(curve.values())
    return max(g for g, score in curve.items() if score >= top - _TIE)


def sweep_gammas(gammas: Sequence[float]) -> tuple[float, ...]:
    """Sorted, unique gammas in (0, 1], with 1.0 (no SGM) always included."""
    return tuple(sorted({check_gamma(g) for g in gammas} | {1.0}))
