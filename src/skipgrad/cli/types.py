"""Value types of the command line: each turns one argument's text into a value or raises
``argparse.ArgumentTypeError`` with a one-line reason (argparse names the flag)."""
from __future__ import annotations

import argparse
import math

from skipgrad.gamma import parse_gamma
from skipgrad.errors import InputError


def levels(text: str) -> float:
    """A perturbation size: ``16``, ``2.5`` (pixel levels out of 255 for L-inf, [0, 1] units for
    L2, see :mod:`skipgrad.units`), or a fraction such as ``16/255``, always read in [0, 1] pixel
    units. Never ``eval``."""
    from skipgrad.units import Fraction

    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value: float = Fraction(float(num) / float(den))
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def gamma(text: str) -> float | None:
    """An SGM gamma in (0, 1]; ``none`` means no SGM (for transfer matrices)."""
    try:
        return parse_gamma(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _integer(text: str, minimum: int, meaning: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be {meaning}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0, "0 or a positive integer")


def positive_int(text: str) -> int:
    """A strictly positive integer."""
    return _integer(text, 1, "a positive integer")


def channels(text: str) -> int | None:
    """``auto`` (decide from the files), ``1`` (grayscale) or ``3`` (RGB)."""
    if text not in ("auto", "1", "3"):
        raise argparse.ArgumentTypeError("channels must be auto, 1 or 3")
    return None if text == "auto" else int(text)


def backward_method(text: str) -> str | None:
    """``--backward METHOD[:key=value,...]`` (methods joined with ``+``), checked against the
    registered methods and returned in canonical form; ``none`` -> None."""
    from skipgrad.backward.registry import BackwardSpecError, parse_backward

    try:
        plan = parse_backward(text)
    except BackwardSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return None if plan is None else plan.label


def forward_method(text: str) -> str | None:
    """``--forward METHOD[:key=value,...]`` (Ghost networks, IAA; joined with ``+``), checked
    against the registered forward methods and returned in canonical form; ``none`` -> None."""
    from skipgrad.backward.registry import BackwardSpecError, parse_forward

    try:
        plan = parse_forward(text)
    except BackwardSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return None if plan is None else plan.label


def gamma_list(text: str) -> tuple[float, ...]:
    """Comma-separated gammas in (0, 1], e.g. ``0.1,0.2,0.5,1``; in the order given, no repeats."""
    values: list[float] = []
    for part in text.split(","):
        value = gamma(part.strip()) if part.strip() else None
        if value is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of gammas "
                                             f"in (0, 1]")
        if value not in values:
            values.append(value)
    return tuple(values)


def sgm_choice(text: str) -> float | str | None:
    """``--sgm`` of ``attack``: a gamma in (0, 1], or ``auto`` (calibrated, see autogamma)."""
    return "auto" if text.strip().lower() == "auto" else gamma(text)
