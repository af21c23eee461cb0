"""Attack configuration: composable names such as ``"mi+di+ti"`` parsed into a frozen spec.

:class:`AttackSpec` is the one carrier of an attack's parameters: the command line and the transfer
plans build one (``skipgrad.pipeline.settings.attack_from_settings``), ``runner.AttackJob`` holds it, and
:func:`skipgrad.attack` builds one from its keywords and hands it to the loop.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from skipgrad.backward.registry import BackwardPlan, as_plan, per_source
from skipgrad.gamma import check_gamma
from skipgrad.errors import InputError
from skipgrad.units import no_op_size

UPDATE_RULES = ("ifgsm", "mi", "ni")
MODIFIERS = ("pgd", "di", "ti")
# Companion parts of the gradient estimate (attacks/companions.py), in their canonical order.
COMPANIONS = ("si", "vt", "admix", "sia", "bsr")
ATTACK_TOKENS = UPDATE_RULES + MODIFIERS + COMPANIONS
# Names from the literature that are compositions of the tokens above.
ALIASES = {"vmi": ("mi", "vt"), "vni": ("ni", "vt"), "sini": ("ni", "si")}
# The AttackSpec switch of each modifier and companion token.
_SWITCHES = {"pgd": "random_start", "di": "input_diversity", "ti": "translation_invariance",
             "si": "scale_invariance", "vt": "variance_tuning", "admix": "admix",
             "sia": "structure_invariance", "bsr": "block_shuffle_rotation"}
NORMS = ("linf", "l2")
LOSSES = ("ce", "margin")

# Which settings belong to which part of an attack (a token of its name, or "sgm" for the Skip
# Gradient Method). A part's settings change nothing when the part is not in the attack
# (``ifgsm --decay 0.5`` makes the bytes of plain ``ifgsm``), so they are not part of such a run's
# identity (``pipeline.job.attack_settings``) and a command line that sets them is refused
# (``pipeline.job.refuse_unused_settings``). A new part with settings adds its row here; a setting
# shared by several parts (``decay``: MI and NI) is used when any of them is present.
PART_SETTINGS: dict[str, tuple[str, ...]] = {
    "mi": ("decay",),
    "ni": ("decay",),
    "di": ("di_prob", "di_scale"),
    "ti": ("ti_kernel",),
    "sgm": ("sgm_official",),
    "si": ("si_copies",),
    "vt": ("vt_neighbours", "vt_beta"),
    "admix": ("admix_scales", "admix_mixes", "admix_eta"),
    "sia": ("sia_copies", "sia_blocks"),
    "bsr": ("bsr_copies", "bsr_blocks", "bsr_max_angle"),
}


@dataclass(frozen=True)
class AttackSpec:
    """Everything that defines one iterative attack.

    Attributes:
        update: ``"ifgsm"`` (sign step, Kurakin et al. 2017), ``"mi"`` (momentum, Dong et al. 2018)
            or ``"ni"`` (Nesterov look-ahead, Lin et al. 2020).
        random_start: start from a uniform point in the ball (PGD, Madry et al. 2018).
        input_diversity: random resize-and-pad of the input each step (DI, Xie et al. 2019).
        translation_invariance: Gaussian smoothing of the gradient (TI, Dong et al. 2019).
        eps, step_size: ball radius and step length in [0, 1] pixel units.
        steps: number of iterations.
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"`` (cross-entropy) or ``"margin"`` (Carlini-Wagner logit margin).
        targeted: ``labels`` are target classes to reach rather than true classes to leave.
        decay: momentum decay mu for MI/NI.
        di_prob, di_scale: DI applies with probability ``di_prob`` on a canvas ``di_scale`` times
            the input size.
        ti_kernel: TI Gaussian kernel size (odd); sigma spans +-3 over the kernel as in Dong et al.
        sgm: Skip Gradient Method gamma in (0, 1] for every source, ``None`` for no SGM, or a
            tuple with one entry per source model (``None`` entries: no SGM for that source).
        sgm_official: the authors' hook placement (torchvision ResNet/DenseNet only).
        backward: backward-pass methods (:mod:`skipgrad.backward.registry`) for every source, as
            ``"METHOD[:key=value,...]"`` joined with ``+`` or a ``BackwardPlan``, or a tuple with
            one entry per source (``None``: none for that source); stored as plans.
        seed: the run seed; each image's random draws come from its own stream (seed, image id).
        forward: methods that change the source's forward pass (Ghost networks, IAA), in the same
            forms as ``backward`` (``"iaa:beta=20"``, one plan or one per source); stored as plans.
        scale_invariance: average the gradients of ``si_copies`` copies ``x / 2**i`` (SI, Lin et
            al., ICLR 2020; 5 copies).
        variance_tuning: add the previous step's gradient variance, the mean gradient at
            ``vt_neighbours`` points uniform in the norm ball of radius ``vt_beta * eps`` around the
            iterate minus the gradient there (VT, Wang & He, CVPR 2021; N = 20, beta = 1.5).
            With ``mi`` it is VMI-FGSM, with ``ni`` VNI-FGSM.
        admix: average over ``admix_mixes`` mixtures ``x + admix_eta * x'`` with other images
            ``x'`` of the batch, each at ``admix_scales`` scales ``1 / 2**i`` (Admix, Wang et al.,
            ICCV 2021; 3 mixtures, 5 scales, eta = 0.2). The only batch-dependent part.
        structure_invariance: average over ``sia_copies`` copies whose ``sia_blocks`` x
            ``sia_blocks`` random blocks each get a random transformation (SIA, Wang et al.,
            ICCV 2023; 20 copies, 3 x 3 blocks).
        block_shuffle_rotation: average over ``bsr_copies`` copies cut into ``bsr_blocks`` x
            ``bsr_blocks`` blocks, shuffled, each rotated by up to ``bsr_max_angle`` degrees (BSR,
            Wang et al., CVPR 2024; 20 copies, 2 x 2 blocks, 24 degrees).

    Build one from a composed name with :meth:`parse`; :attr:`name` gives the name back.
    """

    update: str = "ifgsm"
    random_start: bool = False
    input_diversity: bool = False
    translation_invariance: bool = False
    eps: float = 16 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "linf"
    loss: str = "ce"
    targeted: bool = False
    decay: float = 1.0
    di_prob: float = 0.5
    di_scale: float = 1.1
    ti_kernel: int = 7
    sgm: float | None | tuple[float | None, ...] = None
    sgm_official: bool = False
    backward: BackwardPlan | None | tuple[BackwardPlan | None, ...] = None
    seed: int = 0
    forward: BackwardPlan | None | tuple[BackwardPlan | None, ...] = None
    scale_invariance: bool = False
    variance_tuning: bool = False
    admix: bool = False
    structure_invariance: bool = False
    block_shuffle_rotation: bool = False
    si_copies: int = 5
    vt_neighbours: int = 20
    vt_beta: float = 1.5
    admix_scales: int = 5
    admix_mixes: int = 3
    admix_eta: float = 0.2
    sia_copies: int = 20
    sia_blocks: int = 3
    bsr_copies: int = 20
    bsr_blocks: int = 2
    bsr_max_angle: float = 24.0

    @classmethod
    def parse(cls, method: str = "ifgsm", **settings: object) -> AttackSpec:
        """The spec of a composed attack name such as ``"mi+di"`` with the other ``settings``."""
        return cls(**parse_attack_name(method), **settings)  # type: ignore[arg-type]

    def with_method(self, method: str) -> AttackSpec:
        """The same settings with another composed attack name."""
        return dataclasses.replace(self, **parse_attack_name(method))  # type: ignore[arg-type]

    def sgm_per_source(self, count: int) -> tuple[float | None, ...]:
        """One gamma (or None) per source model; a per-source tuple must have ``count`` entries."""
        if not isinstance(self.sgm, tuple):
            return (self.sgm,) * count
        if len(self.sgm) != count:
            raise InputError(f"sgm has {len(self.sgm)} entries for {count} source models")
        return self.sgm

    def backward_per_source(self, count: int) -> tuple[BackwardPlan | None, ...]:
        """One backward plan (or None) per source model, like :meth:`sgm_per_source`."""
        return per_source(self.backward, count)

    def forward_per_source(self, count: int) -> tuple[BackwardPlan | None, ...]:
        """One forward-method plan (or None) per source model, like :meth:`sgm_per_source`."""
        return per_source(self.forward, count, "forward")

    def __post_init__(self) -> None:
        if isinstance(self.sgm, list):  # a list from JSON/TOML: keep the spec hashable
            object.__setattr__(self, "sgm", tuple(self.sgm))
        # Strings are parsed once, here, so a spec compares equal however its methods were written.
        for kind in ("backward", "forward"):
            plans = getattr(self, kind)
            object.__setattr__(self, kind, tuple(as_plan(p, kind) for p in plans)
                               if isinstance(plans, (list, tuple)) else as_plan(plans, kind))
        _check_choice("update rule", self.update, UPDATE_RULES)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("loss", self.loss, LOSSES)
        _check_positive("eps", self.eps)
        _check_positive("step_size", self.step_size)
        if self.norm == "linf" and self.eps > 1:
            raise InputError(f"eps is in [0, 1] pixel units for the L-inf norm, got {self.eps}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be a positive integer, got {self.steps!r}")
        self._check_levels()
        if not (isinstance(self.decay, (int, float)) and math.isfinite(self.decay)
                and self.decay >= 0):
            raise InputError(f"decay must be a finite number >= 0, got {self.decay!r}")
        if not 0 <= self.di_prob <= 1:
            raise InputError(f"di_prob must be in [0, 1], got {self.di_prob}")
        if not self.di_scale >= 1:
            raise InputError(f"di_scale must be >= 1, got {self.di_scale}")
        if not (isinstance(self.ti_kernel, int) and self.ti_kernel >= 1 and self.ti_kernel % 2):
            raise InputError(f"ti_kernel must be a positive odd integer, got {self.ti_kernel!r}")
        for gamma in self.sgm if isinstance(self.sgm, tuple) else (self.sgm,):
            _check_optional_gamma(gamma)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        self._check_companions()

    def _check_companions(self) -> None:
        for field in ("si_copies", "vt_neighbours", "admix_scales", "admix_mixes", "sia_copies",
                      "sia_blocks", "bsr_copies", "bsr_blocks"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{field} must be a positive integer, got {value!r}")
        _check_positive("vt_beta", self.vt_beta)
        _check_between("admix_eta", self.admix_eta, 0, math.inf)
        _check_between("bsr_max_angle (degrees)", self.bsr_max_angle, 0, 180)
        if self.scale_invariance and self.admix:
            raise InputError("'admix' already averages over SI's scale copies (admix_scales of "
                             "them, Wang et al. 2021); drop 'si', or set admix_scales")

    @property
    def evaluation_costs(self) -> dict[str, int]:
        """The model evaluations (forward + backward, per image and source model) by which each
        companion part in use multiplies a gradient estimate: its copies (SI, Admix, SIA, BSR;
        they nest, so copies multiply) or, for VT, the gradient plus its neighbours'. The other
        parts (update rules, PGD, DI, TI, SGM, backward methods) cost no extra evaluation."""
        copies = {"si": self.si_copies, "admix": self.admix_mixes * self.admix_scales,
                  "sia": self.sia_copies, "bsr": self.bsr_copies, "vt": 1 + self.vt_neighbours}
        return {token: copies[token] for token in COMPANIONS
                if getattr(self, _SWITCHES[token])}

    @property
    def gradient_evaluations_per_step(self) -> int:
        """Forward + backward passes of each source model per image in one step: the product of
        :attr:`evaluation_costs` (1 for an attack without companion parts). An ensemble of k
        sources costs k times this."""
        return math.prod(self.evaluation_costs.values())

    @property
    def gradient_evaluations(self) -> int:
        """Forward + backward passes of each source model per image for the whole attack:
        :attr:`gradient_evaluations_per_step` x steps, less the last step's VT neighbours (their
        variance would only serve a step that never comes, so the loop skips them)."""
        per_step = self.gradient_evaluations_per_step
        if not self.variance_tuning:
            return self.steps * per_step
        copies = per_step // (1 + self.vt_neighbours)
        return self.steps * per_step - self.vt_neighbours * copies

    def _check_levels(self) -> None:
        """An attack whose radius, or whose whole walk, stays under one 8-bit level cannot change a
        saved pixel (under either norm, :func:`skipgrad.units.no_op_size`): refuse it rather than
        return the clean images."""
        problem = no_op_size(self.eps, self.step_size, self.steps)
        linf = self.norm == "linf"
        example = "16/255 in the paper" if linf else "an L2 radius such as 1.5"
        usual = "2/255 in the paper" if linf else "eps/4 by default"
        if problem == "eps":
            raise InputError(f"eps {self.eps:.4g} is below one 8-bit level (1/255), so no pixel "
                             f"can change; eps is in [0, 1] pixel units ({example})")
        if problem == "step_size":
            raise InputError(f"step_size {self.step_size:.4g} x {self.steps} steps moves a pixel "
                             f"by less than half an 8-bit level, so no pixel can change; "
                             f"step_size is in [0, 1] pixel units ({usual})")

    @property
    def parts(self) -> frozenset[str]:
        """The parts this attack is made of: the tokens of its name, its update rule, and
        ``"sgm"`` when SGM decays any source (the keys of :data:`PART_SETTINGS`)."""
        gammas = self.sgm if isinstance(self.sgm, tuple) else (self.sgm,)
        sgm = {"sgm"} if any(g is not None for g in gammas) else set()
        return frozenset(self.name.split("+")) | {self.update} | sgm

    def unused_settings(self) -> tuple[str, ...]:
        """The settings of parts this attack does not have (see :data:`PART_SETTINGS`)."""
        return unused_settings(self.parts)

    @property
    def name(self) -> str:
        """The canonical composed name, e.g. ``"mi+di+ti"``."""
        parts = ["pgd"] if self.random_start and self.update == "ifgsm" else [self.update]
        if self.random_start and self.update != "ifgsm":
            parts.append("pgd")
        parts += [t for t in ("di", "ti") + COMPANIONS if getattr(self, _SWITCHES[t])]
        return "+".join(parts)


def unused_settings(parts: Iterable[str]) -> tuple[str, ...]:
    """The settings of :data:`PART_SETTINGS` that belong to none of ``parts``, in table order."""
    used = {setting for part in parts for setting in PART_SETTINGS.get(part, ())}
    return tuple(dict.fromkeys(setting for settings in PART_SETTINGS.values()
                               for setting in settings if setting not in used))


def parts_using(setting: str) -> tuple[str, ...]:
    """The parts a setting belongs to (empty: every attack uses it)."""
    return tuple(part for part, settings in PART_SETTINGS.items() if setting in settings)


def parse_attack_name(name: str) -> dict[str, object]:
    """Turn ``"mi+di+ti"`` into AttackSpec fields.

    Tokens: one update rule at most (``ifgsm``, ``mi``, ``ni``; default ``ifgsm``), any of the
    modifiers ``pgd`` (random start), ``di``, ``ti`` and any of the companion parts ``si``,
    ``vt``, ``admix``, ``sia``, ``bsr``. ``"pgd"`` alone is I-FGSM with a random start. The
    aliases ``vmi`` (``mi+vt``), ``vni`` (``ni+vt``) and ``sini`` (``ni+si``) stand for their
    parts; :attr:`AttackSpec.name` spells the parts out.
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"attack name must be a non-empty string such as 'mi+di', got {name!r}")
    tokens, aliases = [], ""
    for token in (t.strip().lower() for t in name.split("+")):
        if token not in ATTACK_TOKENS and token not in ALIASES:
            raise InputError(f"unknown attack {token!r} in {name!r}; known: "
                             f"{', '.join(ATTACK_TOKENS + tuple(ALIASES))} (combine with '+')")
        tokens += ALIASES.get(token, (token,))
        if token in ALIASES:  # said in the errors below: the clash may hide inside an alias
            aliases += f"; {token} = {'+'.join(ALIASES[token])}"
    if len(set(tokens)) != len(tokens):
        raise InputError(f"attack {name!r} names a component twice{aliases}")
    rules = [t for t in tokens if t in UPDATE_RULES]
    if len(rules) > 1:
        raise InputError(f"attack {name!r} has several update rules ({', '.join(rules)}); "
                         f"pick one{aliases}")
    return {"update": rules[0] if rules else "ifgsm",
            **{field: token in tokens for token, field in _SWITCHES.items()}}


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")


def _check_between(what: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (math.isfinite(value) and low <= value <= high):
        raise InputError(f"{what} must be a finite number in [{low:g}, {high:g}], got {value!r}")


def _check_positive(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise InputError(f"{what} must be a finite number > 0, got {value!r}")


def _check_optional_gamma(gamma: object) -> None:
    if gamma is not None:
        check_gamma(gamma)
