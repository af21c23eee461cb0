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
``robustness`` library's models at 224x224). The step is eps/6, so 10 steps can travel 1.7 eps.
"""
from __future__ import annotations

import math

LINF_UNIT = "pixel levels out of 255"
L2_UNIT = "L2 norm of the whole perturbation in [0, 1] pixel units"
LINF_DEFAULTS = {"eps": 16.0, "step_size": 2.0}
_SMALL_IMAGE_PIXELS = 32 * 32


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


def l2_defaults(pixels: int) -> dict[str, float]:
    """Default L2 eps and step (in [0, 1] units) for images of ``pixels`` = height x width."""
    eps = 1.5 if pixels <= _SMALL_IMAGE_PIXELS else 3.0
    return {"eps": eps, "step_size": eps / 6}


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
