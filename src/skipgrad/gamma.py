"""The SGM decay factor gamma as users give it: the one check and the one parser, without torch
(the command line's value types use them before any model is loaded)."""
from __future__ import annotations

from skipgrad.errors import InputError

# How a user writes "no SGM" where a gamma is expected (a matrix column, one of several sources).
NO_SGM = ("none", "off", "no")


def check_gamma(gamma: object) -> float:
    """The one check of an SGM decay factor: a real number in (0, 1]; an InputError otherwise."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) \
            or not 0.0 < float(gamma) <= 1.0:  # also refuses NaN
        raise InputError(f"SGM gamma must be a number in (0, 1], got {gamma!r}")
    return float(gamma)


def parse_gamma(value: object) -> float | None:
    """A gamma as the command line and the plans write it: a number or its text (``"0.2"``), or
    None for ``none``/``off``/``no`` (and None itself): no SGM. Anything else is an InputError."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in NO_SGM:
            return None
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{value!r} is not an SGM gamma in (0, 1] (or \"none\")") from None
    return check_gamma(value)
