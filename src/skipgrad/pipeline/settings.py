"""The settings record: an attack's settings as the command line and the TOML plans spell them
(eps and step size in the units of :mod:`skipgrad.units`), turned into the :class:`AttackSpec` and
back into run.json's record; the level checks of sizes that could not move a saved pixel, and the
refusal of settings of a part the attack does not have."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from skipgrad import units
from skipgrad.attacks.config import AttackSpec
from skipgrad.data.datasets import open_dataset
from skipgrad.errors import UserError


# Attack settings as the command line and the TOML plans spell them; eps and step_size are pixel
# levels out of 255 there. ``attack_from_settings`` turns them into the AttackSpec.
ATTACK_SETTINGS = ("eps", "step_size", "steps", "norm", "loss", "targeted", "seed", "decay",
                   "di_prob", "di_scale", "ti_kernel", "sgm_official",
                   # the companion parts' (attacks.companions), recorded only when in the attack
                   "si_copies", "vt_neighbours", "vt_beta", "admix_scales", "admix_mixes",
                   "admix_eta", "sia_copies", "sia_blocks", "bsr_copies", "bsr_blocks",
                   "bsr_max_angle")


_LEVEL_SETTINGS = ("eps", "step_size")


def attack_from_settings(method: str = "ifgsm", sgm: float | None | tuple = None,
                         settings: dict | None = None,
                         backward: str | None | tuple[str | None, ...] = None,
                         data: str | None = None, channels: int | None = None,
                         forward: str | None | tuple[str | None, ...] = None) -> AttackSpec:
    """The AttackSpec of command-line/plan ``settings`` (keys of ``ATTACK_SETTINGS``, unset ones
    left out; eps and step size in the units of :mod:`skipgrad.units`: levels for L-inf, [0, 1]
    for L2) with the composed attack ``method``, the SGM gamma(s), the backward-pass method(s)
    and the forward method(s) (``--forward``). ``data`` (read as ``channels``, the
    ``--channels`` setting) sizes the L2 defaults and the largest L2 eps. Bad values are a
    UserError."""
    import skipgrad

    values = dict(settings or {})
    unknown = sorted(set(values) - set(ATTACK_SETTINGS))
    if unknown:
        raise ValueError(f"not attack settings: {', '.join(unknown)}")  # a caller's bug
    norm = values.get("norm", "linf")
    for key in _LEVEL_SETTINGS:
        if key in values:
            _positive(f"--{key.replace('_', '-')}", values[key])
    if norm == "linf":
        _check_linf_levels(values)
    for key in _LEVEL_SETTINGS:
        if key in values:
            values[key] = units.to_library(values[key], norm)
    if norm == "l2":
        pixels = _pixels(data)
        values = {**units.l2_defaults(pixels, values.get("eps")), **values}
        _check_l2_levels(values, _channels(data, channels) * pixels)
    try:
        return skipgrad.AttackSpec.parse(method, sgm=sgm, backward=backward, forward=forward,
                                         **values)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def _check_linf_levels(values: dict) -> None:
    """L-inf sizes are levels out of 255: a size that cannot move a saved pixel was almost surely
    typed in [0, 1] units; say what it probably meant."""
    eps = values.get("eps", units.LINF_DEFAULTS["eps"])
    step = values.get("step_size", units.LINF_DEFAULTS["step_size"])
    steps = values.get("steps", 10)
    if eps > 255:
        raise UserError(f"--eps is in {units.LINF_UNIT}; {eps:g} is larger than 255")
    problem = units.no_op_size(eps / 255, step / 255, steps)
    if problem == "eps":
        raise UserError(f"--eps {eps:g} is below one 8-bit level, so no pixel can change (--eps "
                        f"is in {units.LINF_UNIT}); did you mean "
                        f"--eps {units.nearest_levels(eps)}?")
    if problem == "step_size":
        raise UserError(f"--step-size {step:g} x {steps} steps moves a pixel by less than half a "
                        f"level, so no pixel can change (--step-size is in {units.LINF_UNIT}); "
                        f"did you mean --step-size {units.nearest_levels(step)}?")


def _check_l2_levels(values: dict, size: int) -> None:
    """L2 sizes are norms of the whole perturbation in [0, 1] units (after defaults): a radius no
    image of ``size`` values can reach was typed in another unit (levels?); a radius or walk that
    cannot move a saved pixel changes nothing."""
    eps, step, steps = values["eps"], values["step_size"], values.get("steps", 10)
    largest = units.diameter("l2", size)
    if eps > largest:
        raise UserError(f"--eps {eps:g} is larger than any L2 perturbation of these images: "
                        f"{largest:.4g} = sqrt({size} values) for the whole [0, 1] box (--eps "
                        f"is in {units.L2_UNIT})")
    problem = units.no_op_size(eps, step, steps)
    if problem == "eps":
        raise UserError(f"--eps {eps:g} is below one 8-bit level (1/255 = {units.ONE_LEVEL:.4f}), "
                        f"so no pixel can change (--eps is in {units.L2_UNIT})")
    if problem == "step_size":
        raise UserError(f"--step-size {step:g} x {steps} steps moves a pixel by less than half a "
                        f"level (0.5/255 = {units.ONE_LEVEL / 2:.4f}), so no pixel can change "
                        f"(--step-size is in {units.L2_UNIT}); the default for --eps {eps:g} is "
                        f"{units.l2_defaults(0, eps)['step_size']:g}")


def _channels(data: str | None, channels: int | None) -> int:
    """``data``'s channels under ``--channels``; a folder read with auto channels counts 3 (what
    RGB files give), so that the largest L2 eps is never below what its images can reach."""
    return channels or (1 if data is None or data.startswith("fmnist:") else 3)


def _pixels(data: str | None) -> int:
    """Height x width of ``data``'s images (Fashion-MNIST without opening it)."""
    if data is None or data.startswith("fmnist:"):
        return 28 * 28
    width, height = open_dataset(data, limit=1).size
    return width * height


def attack_settings(spec: AttackSpec) -> dict:
    """The inverse of :func:`attack_from_settings`: the spec in command-line units, as run.json
    records it (``attack`` is the canonical composed name; per-source gammas are a list). The
    settings of parts the attack does not have (``decay`` of an I-FGSM run, ``sgm_official``
    without SGM: :data:`~skipgrad.attacks.config.PART_SETTINGS`) are left out: they do not change
    the images, so they do not define the run (older folders that hold them still resume,
    :func:`skipgrad.store.records.comparable_config`). An L2
    run also records its ``eps_unit``: its sizes were levels before they were [0, 1] units, so a
    folder made then must not be resumed as if they were the same."""
    record: dict = {"attack": spec.name,
                    "sgm": list(spec.sgm) if isinstance(spec.sgm, tuple) else spec.sgm}
    unused = spec.unused_settings()  # of parts the attack lacks: they change nothing
    for key in ATTACK_SETTINGS:
        if key in unused:
            continue
        value = getattr(spec, key)
        record[key] = units.to_command_line(value, spec.norm) if key in _LEVEL_SETTINGS else value
    if spec.norm != "linf":
        record["eps_unit"] = units.unit_of(spec.norm)
    for kind in ("backward", "forward"):  # only when set, so older folders still resume
        plans = getattr(spec, kind)
        if plans is not None:
            record[kind] = ([None if p is None else p.label for p in plans]
                            if isinstance(plans, tuple) else plans.label)
    return record


def refuse_unused_settings(given: Iterable[str], attacks: Sequence[str], sgm: bool) -> None:
    """Refuse, in one line, settings (command-line flags or plan keys) of a part that none of the
    run's ``attacks`` has (with ``sgm``: whether any of its runs uses SGM): they would change
    nothing, so the run would not be what was asked for (``--attack ifgsm --decay 0.5`` makes the
    bytes of plain ``ifgsm``)."""
    from skipgrad.attacks.config import parts_using, unused_settings

    parts = frozenset({"sgm"} if sgm else ()).union(
        *(AttackSpec.parse(name).parts for name in attacks))
    unused = [key for key in unused_settings(parts) if key in set(given)]
    if not unused:
        return
    label = lambda part: "SGM" if part == "sgm" else part  # noqa: E731
    flags = ", ".join(f"--{key.replace('_', '-')} (a setting of "
                      f"{' and '.join(map(label, parts_using(key)))})" for key in unused)
    owners = " or ".join(dict.fromkeys(label(p) for key in unused for p in parts_using(key)))
    names = ", ".join(dict.fromkeys(AttackSpec.parse(name).name for name in attacks))
    lacking = (f"the attack {names} has no {owners}" if len(attacks) == 1 else
               f"no attack of this run ({names}) has {owners}")
    it = "it" if len(unused) == 1 else "them"
    raise UserError(f"{flags} would change nothing: {lacking}; drop {it} or add the "
                    f"part to the attack{' (--sgm GAMMA for SGM)' if 'SGM' in owners else ''}")


def settings_of(flags: Mapping[str, object]) -> dict:
    """The attack and job settings among parsed command-line ``flags`` (unset ones, None, left out)."""
    return {n: flags[n] for n in ATTACK_SETTINGS + JOB_SETTINGS if flags.get(n) is not None}


# Settings of the job rather than of the attack (data decoding and numerics).
JOB_SETTINGS = ("channels", "class_map", "amp", "channels_last", "compile")


def _positive(what: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{what} must be a finite number > 0, got {value}")
