"""Evaluation-time input-transformation defenses, written as suffixes of a target spec.

``zoo:fmnist-vgg+jpeg:75+bits:5`` is the VGG behind two defenses. The defenses transform the input
in the order written, left to right (here: JPEG at quality 75, then 5-bit reduction), and the
network sees the result:

- ``jpeg:Q``   -- a real JPEG encode/decode of the 8-bit image with Pillow at quality Q (1-100;
  Pillow advises <= 95), as in Guo et al. (ICLR 2018) and Dziugaite et al. (2016).
- ``bits:B``   -- bit-depth reduction to B bits per channel (1-8): ``round(x (2^B - 1)) / (2^B - 1)``
  (feature squeezing, Xu et al., NDSS 2018).
- ``median:K`` -- K x K median filter (odd K >= 3), edges padded by replication (Xu et al. 2018).
- ``smooth:SIGMA[,n=N][,alpha=A][,seed=S]`` -- randomized smoothing (Cohen, Rosenfeld & Kolter,
  ICML 2019): Gaussian noise of standard deviation SIGMA (in [0, 1] pixel units, SIGMA in [0, 1])
  is added at its place in the chain, the rest of the chain and the network classify N noisy copies,
  and the majority class is the prediction. As in Cohen et al.'s PREDICT, the model *abstains* unless
  a two-sided binomial test of the top count against the runner-up count rejects a tie at level A
  (default N=32, A=0.001, S=0). Evaluation counts an abstention as a failure of the attack (the
  defense did not output a wrong class) and as a wrong answer on clean images.

All of them are evaluation-time defenses: they are not differentiable (JPEG, rounding, the median,
the vote), so they are refused as attack sources; attacking through them would need BPDA or EOT,
which is a different threat model from transfer. Each image's result depends on that image alone
(the smoothing noise is seeded by the seed and the image's 8-bit content, and each image's copies
form their own batch), so predictions do not depend on batching, sharding or resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from skipgrad.binomial import binomial_test
from skipgrad.errors import UserError

ABSTAIN = -1  # the predicted "class" of a smoothed model that abstains
__all__ = ["ABSTAIN", "DEFENSES", "BitDepth", "DefendedModel", "Defense", "Jpeg", "Median",
           "Param", "Smoothing", "canonical_spec", "defense_help", "parse_defense", "split_spec"]


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 pixel levels (values outside [0, 1] are clipped first)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class Defense:
    """One input transformation; subclasses are frozen dataclasses with a canonical ``spec``."""

    name = ""

    @property
    def spec(self) -> str:
        """The canonical text of this defense, e.g. ``jpeg:75``."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Transform a batch of [0, 1] images (N, C, H, W)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Jpeg(Defense):
    """JPEG encode/decode with Pillow at ``quality`` (4:2:0 chroma subsampling for RGB, Pillow's
    default; grayscale has no chroma)."""

    quality: int
    name = "jpeg"

    @property
    def spec(self) -> str:
        return f"jpeg:{self.quality}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        levels = to_levels(x).cpu().numpy()
        out = np.stack([_jpeg_round_trip(image, self.quality) for image in levels])
        return torch.from_numpy(out).to(x.device, x.dtype) / 255


def _jpeg_round_trip(levels: np.ndarray, quality: int) -> np.ndarray:
    """One (C, H, W) uint8 image through Pillow's JPEG encoder and decoder."""
    mode = "L" if levels.shape[0] == 1 else "RGB"
    image = Image.fromarray(levels[0] if mode == "L" else levels.transpose(1, 2, 0), mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(mode))
    return decoded[None] if mode == "L" else decoded.transpose(2, 0, 1)


@dataclass(frozen=True)
class BitDepth(Defense):
    """Bit-depth reduction of the 8-bit image to ``bits`` bits per channel (Xu et al., 2018)."""

    bits: int
    name = "bits"

    @property
    def spec(self) -> str:
        return f"bits:{self.bits}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Integer arithmetic on the 8-bit levels: round(k (2^b - 1) / 255) never meets a .5 tie
        # (2 k (2^b - 1) is even, 255 (2 m + 1) is odd), so adding half and flooring is exact.
        top = 2 ** self.bits - 1
        reduced = (to_levels(x).to(torch.int32) * top * 2 + 255) // 510
        return (reduced.to(x.dtype) / top).to(x.device)


@dataclass(frozen=True)
class Median(Defense):
    """``size`` x ``size`` median filter per channel, edges replicated (odd ``size``)."""

    size: int
    name = "median"

    @property
    def spec(self) -> str:
        return f"median:{self.size}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.size // 2
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        windows = padded.unfold(2, self.size, 1).unfold(3, self.size, 1)
        return windows.flatten(-2).median(dim=-1).values  # an odd count: the exact middle value


@dataclass(frozen=True)
class Smoothing(Defense):
    """Gaussian noise for randomized smoothing (Cohen et al., 2019); the vote is in
    :class:`DefendedModel`. ``__call__`` draws the ``n`` copies of each image: (N * n, C, H, W)."""

    sigma: float
    n: int = 32
    alpha: float = 0.001
    seed: int = 0
    name = "smooth"

    @property
    def spec(self) -> str:
        return f"smooth:{self.sigma:g},n={self.n},alpha={self.alpha:g},seed={self.seed}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([image + self.sigma * self._noise(image) for image in x])

    def _noise(self, image: torch.Tensor) -> torch.Tensor:
        # Seeded by the image's own 8-bit content: the same image gets the same noise in any
        # batch, on any rank, clean or adversarial folder alike.
        digest = hashlib.sha256(to_levels(image).cpu().numpy().tobytes()).digest()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int.from_bytes(digest[:6]))
        noise = torch.randn((self.n, *image.shape), generator=generator)
        return noise.to(image.device, image.dtype)

    def vote(self, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Majority class of each row of ``predictions`` (N, n), or :data:`ABSTAIN` where the
        top count does not beat the runner-up at level ``alpha``: the two-sided exact binomial
        test of the top count among top + runner-up at 1/2, as PREDICT in Cohen et al. (2019)
        specifies (its BINOMPVALUE; their release calls scipy's two-sided ``binom_test``)."""
        counts = F.one_hot(predictions, num_classes).sum(1)
        top2 = counts.topk(2, dim=1)
        winners = top2.indices[:, 0].clone()
        for row, (first, second) in enumerate(top2.values.tolist()):
            if binomial_test(first, first + second) > self.alpha:
                winners[row] = ABSTAIN
        return winners


# ---------------------------------------------------------------- parsing

@dataclass(frozen=True)
class Param:
    """One parameter of a defense as the spec grammar takes it: the class field it sets, its type
    and range. Parsing, ``skipgrad models`` and its JSON all read these; defaults are the defense
    class's own field defaults, so there is no second copy of them."""

    field: str
    kind: type  # int or float
    low: float
    high: float
    what: str  # the parameter's name in messages ("the JPEG quality must be ...")
    doc: str  # one line for the listing
    symbol: str = ""  # how the grammar spells the value after the colon (Q, SIGMA)
    odd: bool = False
    above_low: bool = False  # ``low`` itself is refused (smoothing with sigma 0 is no defense)

    def parse(self, text: str) -> int | float:
        """``text`` -> a value in range; ``ValueError`` with a one-line reason otherwise."""
        value = (_int_in if self.kind is int else _number_in)(text, self.low, self.high, self.what)
        if self.odd and value % 2 == 0:
            raise ValueError(f"{self.what} must be odd, got {value}")
        if self.above_low and value == self.low:
            raise ValueError(f"{self.what} must be > {self.low:g}")
        return value


@dataclass(frozen=True)
class _Entry:
    """One defense of the grammar ``NAME:VALUE[,option=value...]``: the class it builds, the
    required value, the named options, and an optional check of the whole combination."""

    cls: type[Defense]
    value: Param
    summary: str
    options: tuple[Param, ...] = ()
    check: Callable[[Defense], None] | None = None

    def defaults(self) -> dict[str, object]:
        """The options' defaults, read from the defense class's dataclass fields."""
        declared = {f.name: f.default for f in dataclasses.fields(self.cls)}
        return {p.field: declared[p.field] for p in self.options}

    @property
    def syntax(self) -> str:
        """E.g. ``smooth:SIGMA[,n=32][,alpha=0.001][,seed=0]``."""
        defaults = self.defaults()
        return f"{self.cls.name}:{self.value.symbol}" + "".join(
            f"[,{p.field}={defaults[p.field]:g}]" for p in self.options)

    def build(self, value: str, options: dict[str, str]) -> Defense:
        """Parsed value and options -> the defense; ``ValueError`` on anything out of range."""
        known = {p.field: p for p in self.options}
        unknown = set(options) - set(known)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(known) or 'none'})")
        defense = self.cls(self.value.parse(value),
                           **{k: known[k].parse(text) for k, text in options.items()})
        if self.check is not None:
            self.check(defense)
        return defense

    def describe(self) -> dict:
        """JSON-ready description: grammar, summary and each parameter with range and default."""
        defaults = self.defaults()
        params = [(self.value, True, None), *((p, False, defaults[p.field]) for p in self.options)]
        return {"name": self.cls.name, "syntax": f"SPEC+{self.syntax}", "summary": self.summary,
                "parameters": [{"name": p.field, "symbol": p.symbol or p.field,
                                "type": p.kind.__name__, "required": required, "default": default,
                                "min": p.kind(p.low), "max": p.kind(p.high), "min_inclusive": not p.above_low,
                                "odd_only": p.odd, "description": p.doc}
                               for p, required, default in params]}


def _int_in(text: str, low: float, high: float, what: str) -> int:
    if not re.fullmatch(r"\d+", text) or not low <= int(text) <= high:
        raise ValueError(f"{what} must be an integer in [{low:g}, {high:g}], got {text!r}")
    return int(text)


def _number_in(text: str, low: float, high: float, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number in [{low:g}, {high:g}], got {text!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{what} must be a number in [{low:g}, {high:g}], got {text!r}")
    return value


def _vote_can_pass(smoothing: Defense) -> None:
    """Refuse an ``n`` at which even a unanimous vote fails the test (every answer an abstention)."""
    assert isinstance(smoothing, Smoothing)
    if binomial_test(smoothing.n, smoothing.n) > smoothing.alpha:
        needed = next(n for n in range(2, 100_001) if binomial_test(n, n) <= smoothing.alpha)
        raise ValueError(f"n={smoothing.n} can never pass the vote's test at alpha "
                         f"{smoothing.alpha:g} (a unanimous vote needs n >= {needed})")


DEFENSES: dict[str, _Entry] = {e.cls.name: e for e in (
    _Entry(Jpeg, Param("quality", int, 1, 100, "the JPEG quality",
                       "JPEG quality (Pillow advises <= 95)", symbol="Q"),
           "real JPEG encode/decode of the 8-bit image with Pillow at quality Q"),
    _Entry(BitDepth, Param("bits", int, 1, 8, "the bit depth", "bits kept per channel",
                           symbol="B"),
           "bit-depth reduction to B bits per channel (feature squeezing)"),
    _Entry(Median, Param("size", int, 3, 15, "the median filter size",
                         "filter width and height in pixels", symbol="K", odd=True),
           "K x K median filter per channel, edges replicated"),
    _Entry(Smoothing, Param("sigma", float, 0, 1, "sigma", "standard deviation of the Gaussian "
                            "noise, in [0, 1] pixel units", symbol="SIGMA", above_low=True),
           "randomized smoothing: majority vote over n Gaussian-noise copies; abstains unless "
           "the vote is significant at alpha (an abstention is never a wrong class)",
           options=(Param("n", int, 2, 100_000, "n", "noisy copies per image"),
                    Param("alpha", float, 0, 1, "alpha", "level of the vote's two-sided "
                          "binomial test (top count vs runner-up)"),
                    Param("seed", int, 0, 2**31 - 1, "seed", "noise seed (combined with each "
                          "image's 8-bit content)")),
           check=_vote_can_pass),
)}


def parse_defense(text: str) -> Defense:
    """``jpeg:75`` -> :class:`Jpeg`; raises :class:`UserError` (one line) on anything malformed."""
    name, _, rest = text.partition(":")
    entry = DEFENSES.get(name)
    if entry is None:
        raise UserError(f"unknown defense {name!r} in '+{text}' (known: "
                        f"{', '.join(e.syntax for e in DEFENSES.values())})")
    value, *pairs = rest.split(",")
    options = dict(p.partition("=")[::2] for p in pairs)
    try:
        if not value or any(not k or not v for k, v in options.items()):
            raise ValueError(f"expected {entry.syntax}")
        return entry.build(value, options)
    except ValueError as exc:
        raise UserError(f"malformed defense '+{text}': {exc}") from None


def split_spec(spec: str) -> tuple[str, tuple[Defense, ...]]:
    """``zoo:fmnist-vgg+jpeg:75+bits:5`` -> (``zoo:fmnist-vgg``, (Jpeg(75), BitDepth(5))).

    Model names of tv:, timm: and zoo: never contain ``+``, so every ``+`` part there is a defense.
    A ``file:`` path may: only trailing parts named like a defense are taken from it.
    """
    parts = spec.split("+")
    if spec.startswith("file:"):
        cut = len(parts)
        while cut > 1 and parts[cut - 1].partition(":")[0] in DEFENSES:
            cut -= 1
        parts = ["+".join(parts[:cut]), *parts[cut:]]
    defenses = tuple(parse_defense(p) for p in parts[1:])
    if sum(isinstance(d, Smoothing) for d in defenses) > 1:
        raise UserError(f"at most one smooth: defense per spec, got {spec!r}")
    return parts[0], defenses


def canonical_spec(spec: str) -> str:
    """The spec with each defense in its canonical form (``+smooth:0.25`` gets its n, alpha and
    seed spelled out), so tables and JSON name exactly what was evaluated."""
    base, defenses = split_spec(spec)
    return "".join([base, *(f"+{d.spec}" for d in defenses)])


def defense_help() -> list[dict]:
    """Each defense's grammar, summary and parameters (ranges, defaults), for ``skipgrad models``
    and its ``--json``; built from :data:`DEFENSES`, the grammar the parser uses."""
    return [entry.describe() for entry in DEFENSES.values()]


# ---------------------------------------------------------------- the defended model

class DefendedModel(nn.Module):
    """A loaded model behind a chain of defenses; predictions via :meth:`predict_labels`.

    ``forward`` returns logits for deterministic chains and vote frequencies for a smoothed one;
    ``predict_labels`` is what evaluation uses (it can return :data:`ABSTAIN`).
    """

    def __init__(self, model: nn.Module, defenses: tuple[Defense, ...], spec: str) -> None:
        super().__init__()
        self.model = model
        self.defenses = defenses
        self.config = model.config.replace(spec=spec)
        cut = next((i for i, d in enumerate(defenses) if isinstance(d, Smoothing)), len(defenses))
        self.before, self.after = defenses[:cut], defenses[cut + 1:]
        self.smoothing = defenses[cut] if cut < len(defenses) else None

    def _prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic defenses before the smoothing noise (all of them if none)."""
        for defense in self.before:
            x = defense(x)
        return x

    def _votes(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n) classes of each image's noisy copies; each image's n copies are one batch of
        their own, so its vote ignores its neighbours in ``x``."""
        votes = []
        for image in x:
            copies = self.smoothing(image[None])
            for defense in self.after:
                copies = defense(copies)
            votes.append(self.model(copies).argmax(1))
        return torch.stack(votes)

    @torch.no_grad()
    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 class per image, or :data:`ABSTAIN` where a smoothed model abstains."""
        x = self._prefix(x)
        if self.smoothing is None:
            return self.model(x).argmax(1)
        return self.smoothing.vote(self._votes(x), self.config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prefix(x)
        if self.smoothing is None:
            return self.model(x)
        return F.one_hot(self._votes(x), self.config.num_classes).float().mean(1)

    def extra_repr(self) -> str:
        return f"spec={self.config.spec!r}"
