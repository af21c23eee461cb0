"""Are an attack folder's PNGs the ones the attack wrote, within the attack's bound?

``attack`` records each PNG's SHA-256 in manifest.csv as it writes the file. Before scoring,
``evaluate`` (and ``transfer``, ``sweep`` and ``demo``, which evaluate the folders they made) checks
every file: its bytes are hashed as they are read for decoding -- one read, no separate pass -- and
compared with the manifest, and its 8-bit levels are compared with the clean image's under the
run's eps (:func:`bound_violation`: L-inf, at most ``floor(eps)`` levels per pixel; L2, a
level-difference norm of at most ``eps*255`` levels for an ``eps`` in [0, 1] units). Any mismatch
is one :class:`VerificationError` naming the first files and the count.
``evaluate --no-verify`` skips all of this for folders one vouches for by other means (e.g. made
by a skipgrad older than the hashes, which cannot be verified).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from skipgrad import units
from skipgrad.errors import UserError

SHA_COLUMN = "sha256"
# How many offending files a one-line error names before it only counts the rest.
_NAMED = 3


class VerificationError(UserError):
    """Adversarial files differ from what the attack wrote, or cannot be checked."""


@dataclass(frozen=True)
class Mismatch:
    """One file that failed verification, and why."""

    file: str
    reason: str


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of bytes (the manifest's ``sha256`` column)."""
    return hashlib.sha256(data).hexdigest()


def bound_violation(adv: np.ndarray, clean: np.ndarray, eps: float, norm: str) -> str | None:
    """Why 8-bit ``adv`` breaks the ``norm`` ball of radius ``eps`` around 8-bit ``clean``, or None
    when it does not. ``eps`` is in [0, 1] pixel units, the unit of :class:`~skipgrad.AttackSpec`
    for both norms (``evaluate`` converts run.json's command-line units with
    :func:`skipgrad.units.to_library`).

    The one definition of the bound: the attack checks it before saving and ``evaluate`` checks
    it again on the saved files. It is exactly what the attack's rounding
    (:func:`skipgrad.attacks.updates.quantise_in_ball`) guarantees, with no tolerance either way:
    L-inf, every level difference at most :func:`skipgrad.units.linf_levels` ``(eps)``; L2, the
    exact integer sum of squared level differences at most
    :func:`skipgrad.units.l2_radius_squared` ``(eps)``.
    """
    diff = adv.astype(np.int64) - clean.astype(np.int64)
    if norm == "linf":
        limit = units.linf_levels(eps)
        worst = int(np.abs(diff).max()) if diff.size else 0
        return None if worst <= limit else f"L-inf {worst} levels > {limit}"
    squares = int((diff * diff).sum())
    if squares <= units.l2_radius_squared(eps):
        return None
    return (f"L2 {math.sqrt(squares) / 255:.7g} > eps {eps:g} in [0, 1] units "
            f"({math.sqrt(squares):.7g} levels > {eps * 255:.7g})")


def perturbation_norms(adv: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """``(l2, linf)`` of the perturbation between 8-bit ``adv`` and 8-bit ``clean`` (same layout,
    any), in [0, 1] pixel units: level differences / 255, L2 over every channel and pixel, L-inf
    the largest absolute difference. The one definition: the attack records it per image in
    manifest.csv, ``evaluate`` recomputes it from the saved files (so older folders get it too)."""
    diff = adv.astype(np.int64) - clean.astype(np.int64)
    if not diff.size:
        return 0.0, 0.0
    return math.sqrt(int((diff * diff).sum())) / 255, int(np.abs(diff).max()) / 255


def levels(images: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] on 8-bit levels -> their uint8 levels (any layout)."""
    return images.detach().cpu().mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def unverifiable(folder: object, files: list[str]) -> VerificationError:
    """The error for manifest rows that carry no hash (written by an older skipgrad)."""
    return VerificationError(
        f"{folder}: {len(files)} of its adversarial files ({_named(files)}) have no SHA-256 in "
        f"manifest.csv (written by an older skipgrad), so they cannot be verified; re-run the "
        f"attack into a new folder, or pass `evaluate --no-verify` to score them unverified")


def mismatch_error(folder: object, mismatches: list[Mismatch]) -> VerificationError:
    """One line naming the first offending files, their reasons and how many there are."""
    shown = [f"{m.file} ({m.reason})" for m in mismatches[:_NAMED]]
    more = f" and {len(mismatches) - _NAMED} more" if len(mismatches) > _NAMED else ""
    return VerificationError(
        f"{folder}: {len(mismatches)} adversarial file(s) are not what the attack wrote: "
        f"{', '.join(shown)}{more}; re-run the attack to rewrite them (delete them first), or "
        f"pass `evaluate --no-verify` to score them anyway")


def _named(files: list[str]) -> str:
    more = f" and {len(files) - _NAMED} more" if len(files) > _NAMED else ""
    return ", ".join(files[:_NAMED]) + more
