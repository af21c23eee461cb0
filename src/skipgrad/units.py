"""Units of perturbation sizes on the command line and in plans, and the L2 defaults.

The library (``skipgrad.attack``, :class:`skipgrad.AttackSpec`) takes every size in [0, 1] pixel
units. The command line and the TOML plans follow the literature of each norm:

- L-inf (``--norm linf``, the default): pixel levels out of 255, as in the SGM paper and the
  authors' CLI: ``--eps 16 --step-size 2``. A fraction such as ``16/255`` is read in [0, 1] units.
- L2 (``--norm l2``): the L2 norm of the whole perturbation in [0, 1] pixel units, as L2 radii are
  stated in the literature: ``--eps 1.5``.

L2 defaults depend on the image size, because the norm grows with the number of pixels: images of
at most 32x32 pixels (Fashion-MNIST, MNIST) take eps 1.5 (the MNIST L2 radius of Schott et al.,
ICLR 2019), larger ones eps 3.0 (the ImageNet L2 radius of Salman et al., NeurIPS 2020, and of the
``robustness`` library's models at 224x224).

The default L2 step is eps/4 of the eps in use, given or default (``--eps 3`` alone steps 0.75), so
the default 10 steps can travel 2.5 eps; it does not depend on ``--steps``. (The L-inf default is
the paper's fixed 2 levels, eps/8 at its eps of 16 levels: 10 steps travel 1.25 eps.) L2 needs
the longer walk because its steps do not add up to their length: after each projection onto the
ball the [0, 1] box clips the perturbation (on black backgrounds, half of it points below 0).
On 64 Fashion-MNIST test images from the zoo ResNet-20 (I-FGSM, 10 steps, eps 1.5), eps/6 left
the saved perturbations at 0.72 eps on average and eps/4 at 0.91 eps (at eps 3: 0.58 and 0.78).

Level checks (one home: the command line, :class:`~skipgrad.AttackSpec`, the attack's rounding
and the verifier all call these): saved images are 8-bit, so a radius under one level, or a walk
of ``steps x step_size`` under half a level, cannot change a saved pixel under either norm
(:func:`no_op_size`); a radius beyond the [0, 1] box's :func:`diameter` is larger than any
perturbation can be. :func:`linf_levels` and :func:`l2_radius_squared` are the radii in levels
that the rounding guarantees and the verifier checks.
"""
from __future__ import annotations

import math

LINF_UNIT = "pixel levels out of 255"
L2_UNIT = "L2 norm of the whole perturbation in [0, 1] pixel units"
LINF_DEFAULTS = {"eps": 16.0, "step_size": 2.0}
_SMALL_IMAGE_PIXELS = 32 * 32
_L2_STEPS_PER_EPS = 4
# One 8-bit level in [0, 1] units, and the tolerance (in levels) that lets 16/255 count as 16
# levels although 16/255*255 is 15.999999999999998 in floating point.
ONE_LEVEL = 1 / 255
_LEVEL_TOLERANCE = 1e-6


class Fraction(float):
    """A size typed as a fraction (``16/255``): its value is in levels, ``literal`` in [0, 1]."""

    literal: float

    def __new__(cls, literal: float) -> Fraction:
        value = super().__new__(cls, literal * 255)
        value.literal = literal
        return value


def unit_of(norm: str) -> str:
    """The command-line unit of ``--eps``/``--step-size`` under ``norm``."""
    return LINF_UNIT if norm == "linf" else L2_UNIT


def l2_defaults(pixels: int, eps: float | None = None) -> dict[str, float]:
    """Default L2 eps (for images of ``pixels`` = height x width) and step (eps/4 of ``eps`` when
    given, else of the default eps), in [0, 1] units."""
    if eps is None:
        eps = 1.5 if pixels <= _SMALL_IMAGE_PIXELS else 3.0
    return {"eps": eps, "step_size": eps / _L2_STEPS_PER_EPS}


def to_library(value: float, norm: str) -> float:
    """A command-line size in the library's [0, 1] units."""
    if norm == "linf":
        return value / 255
    return value.literal if isinstance(value, Fraction) else float(value)


def to_command_line(value: float, norm: str) -> float:
    """A library size in command-line units; rounded so that 16/255 comes back as 16.0."""
    return round(value * 255, 9) if norm == "linf" else value


def nearest_levels(value: float) -> int:
    """The level count a [0, 1]-unit value probably meant (``0.03`` -> 8), at least 1."""
    return max(1, round(value * 255)) if math.isfinite(value) else 1


def linf_levels(eps: float) -> int:
    """The L-inf radius ``eps`` ([0, 1] units) in whole levels: ``floor(eps*255)``, tolerant of
    the float error in ``16/255``. The attack rounds within it and the verifier checks it."""
    return math.floor(eps * 255 + _LEVEL_TOLERANCE)


def l2_radius_squared(eps: float) -> float:
    """The squared L2 radius ``eps`` ([0, 1] units) in squared levels, ``(eps*255)**2`` in float64.
    The attack's rounding keeps the exact integer sum of squared level differences at most this
    number and the verifier compares the same exact sum with the same number, so the two agree
    to the last bit (no tolerance in either direction)."""
    return (float(eps) * 255) ** 2


def no_op_size(eps: float, step_size: float, steps: object) -> str | None:
    """``"eps"`` or ``"step_size"`` when that size ([0, 1] units) cannot change any saved 8-bit
    pixel, under either norm; else None (``steps`` not a positive integer: the walk is not
    checked here, the AttackSpec refuses it).

    - eps under one level: L-inf rounds within ``floor(eps*255) = 0`` levels; for L2 every
      non-zero level perturbation has a norm of at least one level.
    - ``steps x step_size`` under half a level: no pixel moves far enough to round to another
      level (an L2 step of norm s moves no single pixel by more than s).
    """
    if eps * 255 < 1 - _LEVEL_TOLERANCE:
        return "eps"
    walks = isinstance(steps, int) and not isinstance(steps, bool) and steps > 0
    if walks and steps * step_size * 255 < 0.5 - _LEVEL_TOLERANCE:
        return "step_size"
    return None


def diameter(norm: str, values: int) -> float:
    """The largest ``norm`` distance between two images of ``values`` = C x H x W numbers in the
    [0, 1] box ([0, 1] units): 1 for L-inf, ``sqrt(values)`` for L2. A larger radius is never
    reached: it only says that the size was typed in another unit."""
    return 1.0 if norm == "linf" else math.sqrt(values)


def l2_text(value: float | None, missing: str = "–") -> str:
    """A (mean) L2 perturbation in [0, 1] pixel units as every table shows it: three significant
    digits, trailing zeros kept (an L-inf 16/255 attack on 28x28 Fashion-MNIST images: about
    1-2.5; ``2.00``, ``0.487``, ``24.3``)."""
    return missing if value is None else f"{value:#.3g}".rstrip(".")
