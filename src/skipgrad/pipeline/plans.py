"""Transfer plans: the TOML file and the command-line flags merged into one :class:`TransferPlan`
(flags override the file, which overrides the defaults), and the plan schema: every key a plan may
hold, with its type (docs/plans.md describes each)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from skipgrad.backward.registry import BackwardSpecError, combine, parse_plan
from skipgrad.gamma import parse_gamma
from skipgrad.errors import InputError, UserError
from skipgrad.pipeline.settings import (ATTACK_SETTINGS, JOB_SETTINGS, attack_from_settings, refuse_unused_settings, settings_of)
from skipgrad.pipeline.job import AttackJob, RunOptions, run_options
from skipgrad.pipeline.transfer import ModelRef, TransferPlan, gammas_with_baseline, model_refs_of



def per_source_backward(values: list[str | None] | None, n_sources: int
                        ) -> str | None | tuple[str | None, ...]:
    """Repeated ``--backward`` against the number of ``--source``: given once it applies to every
    source; with one source, several compose (as if joined with ``+``); otherwise exactly one per
    source, in order (``none`` for a source without). Other counts are refused in one line."""
    return per_source_methods(values, n_sources, "backward")


def per_source_methods(values: list[str | None] | None, n_sources: int, kind: str
                       ) -> str | None | tuple[str | None, ...]:
    """Repeated ``--backward`` or ``--forward`` (``kind``) against the number of ``--source``,
    by the rule of :func:`per_source_backward`."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    if n_sources == 1:
        try:
            plan = combine(parse_plan(v, kind) if v else None for v in values)
        except BackwardSpecError as exc:
            raise UserError(f"--{kind}: {exc}") from None
        return None if plan is None else plan.label
    if len(values) != n_sources:
        raise UserError(f"{len(values)} --{kind} for {n_sources} --source; give one for all "
                        f"sources or one per --source, in order (none for a source without)")
    return None if not any(values) else tuple(values)


def per_source_forward(values: list[str | None] | None, n_sources: int
                       ) -> str | None | tuple[str | None, ...]:
    """Repeated ``--forward`` against the number of ``--source`` (the rule of ``--backward``)."""
    return per_source_methods(values, n_sources, "forward")


def per_source_sgm(values: list | None, n_sources: int) -> float | str | None | tuple:
    """Repeated ``--sgm`` against the number of ``--source``: once for every source, or exactly
    once per source in order (``none``: no SGM for that source); other counts are refused."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    if len(values) != n_sources:
        raise UserError(f"{len(values)} --sgm for {n_sources} --source; give one --sgm for all "
                        f"sources or one per --source, in order (none for a source without)")
    if "auto" in values:
        raise UserError("--sgm auto calibrates one gamma for the whole ensemble; give it once")
    return None if all(v is None for v in values) else tuple(values)


# Options of --sgm auto only: refused without it rather than ignored.
AUTO_OPTIONS = ("calibrate_on", "calibrate_weights", "calibrate_images", "calibrate_data",
                "calibrate_gammas")


def attack_job(flags: Mapping[str, object]) -> tuple[AttackJob, bool]:
    """The AttackJob of ``attack``'s parsed flags, and whether ``--sgm auto`` is to choose its
    gamma (the job then has none yet)."""
    sources = tuple(flags["source"])
    sgm = per_source_sgm(flags.get("sgm"), len(sources))
    auto = sgm == "auto"
    given = [f"--{name.replace('_', '-')}" for name in AUTO_OPTIONS if flags.get(name) is not None]
    if given and not auto:
        raise UserError(f"{', '.join(given)} only apply to --sgm auto; drop them or use --sgm auto")
    settings = settings_of(flags)
    spec = attack_from_settings(flags.get("attack") or "ifgsm", None if auto else sgm,
                                {k: v for k, v in settings.items() if k in ATTACK_SETTINGS},
                                per_source_backward(flags.get("backward"), len(sources)),
                                data=flags["data"], channels=settings.get("channels"),
                                forward=per_source_forward(flags.get("forward"), len(sources)))
    refuse_unused_settings(settings, [spec.name], sgm=sgm is not None)  # values checked first
    job = AttackJob(sources=sources, data=flags["data"], attack=spec,
                    weights=tuple(flags.get("weights") or ()),
                    **{k: v for k, v in settings.items() if k in JOB_SETTINGS})
    return job, auto


def backward_label(text: str, kind: str = "backward") -> str | None:
    """A ``METHOD[:key=value,...]`` text checked against the registered methods of ``kind``, in
    canonical form; ``none`` -> None."""
    plan = parse_plan(text, kind)
    return None if plan is None else plan.label


# The keys of a plan that shape the matrix, and those that say how to run it; every other key of
# PLAN_SCHEMA is an attack or job setting (pipeline.job.ATTACK_SETTINGS, JOB_SETTINGS).
STRUCTURE_KEYS = ("sources", "targets", "preset", "attacks", "sgm", "baseline", "out", "data",
                  "title", "backward", "forward")
RUN_KEYS = ("limit", "batch_size", "device", "quiet")


def transfer_plan(flags: dict, config: dict) -> tuple[TransferPlan, Path, RunOptions]:
    """Merge command-line ``flags`` (the parsed arguments as a dict; unset ones None) over a TOML
    plan ``config``: (plan, output folder, run options)."""
    settings = dict(config)  # what remains after the structure and run keys: attack settings
    plan_cfg = {k: settings.pop(k) for k in STRUCTURE_KEYS if k in settings}
    run_cfg = {k: settings.pop(k) for k in RUN_KEYS if k in settings}
    sources, targets = _models(flags, plan_cfg)
    attacks = tuple(flags.get("attack") or _as_list(plan_cfg.get("attacks", ["ifgsm"])))
    baseline = not flags.get("no_baseline") and bool(plan_cfg.get("baseline", True))
    gammas, per_source = ((flags["sgm"], ()) if flags.get("sgm") is not None else
                          plan_gammas(plan_cfg.get("sgm", []), sources, baseline, _plan_gamma))
    out = flags.get("out") or (Path(plan_cfg["out"]) if "out" in plan_cfg else None)
    data = flags.get("data") or plan_cfg.get("data")
    if out is None or data is None or not sources or not targets:
        raise UserError("transfer needs --source, --target, --data and --out "
                        "(as flags or in the --config file)")
    backward = _methods(flags.get("backward"), plan_cfg.get("backward"), len(sources), "backward")
    forward = _methods(flags.get("forward"), plan_cfg.get("forward"), len(sources), "forward")
    column_baseline = baseline
    if (backward or forward) and not gammas and not baseline and not per_source:  # methods alone, no SGM
        gammas, column_baseline = [None], True
    column = gammas_with_baseline(list(gammas), column_baseline or bool(per_source))
    chosen = {**settings, **settings_of(flags)}
    template = template_from(chosen, data)  # bad values first, then settings nothing uses
    refuse_unused_settings(chosen, attacks, sgm=any(
        g is not None for g in (*column, *(g for c in per_source if c for g in c))))
    plan = TransferPlan(sources, attacks, column, targets, template,
                        flags.get("title") or plan_cfg.get("title", "Transfer success rate"),
                        backward=backward, backward_baseline=baseline, source_gammas=per_source,
                        forward=forward)
    return plan, out, run_options(flags, run_cfg)


def _methods(flags: list | None, config: object, n_sources: int, kind: str) -> tuple:
    """Each source's methods of ``kind`` (``backward`` or ``forward``; a label or None) from the
    flags, else the plan's key of that name (a string for every source or a list with one per
    source)."""
    if flags is None and config is not None:
        values = config if isinstance(config, list) else [config]
        if not all(isinstance(v, str) for v in values):
            raise UserError(f"{kind} in the plan must be a method string or a list of them "
                            f"(\"none\" for a source without), got {config!r}")
        if len(values) not in (1, n_sources):  # in a plan a list is per source, never composed
            raise UserError(f"{kind} in the plan has {len(values)} entries for {n_sources} "
                            f"sources; give one for all or one per source (join methods with +)")
        try:
            flags = [backward_label(v, kind) for v in values]
        except BackwardSpecError as exc:
            raise UserError(f"{kind}: {exc}") from None
    chosen = per_source_methods(flags, n_sources, kind)
    if chosen is None:
        return ()
    return chosen if isinstance(chosen, tuple) else (chosen,) * n_sources


def _models(flags: dict, plan_cfg: dict) -> tuple[tuple[ModelRef, ...], tuple[ModelRef, ...]]:
    from skipgrad.models.presets import get_preset

    sources = model_refs_of(flags.get("source"), flags.get("source_weights"), "source") or \
        model_refs(plan_cfg.get("sources", []), "sources")
    targets = model_refs_of(flags.get("target"), flags.get("target_weights"), "target") or \
        model_refs(plan_cfg.get("targets", []), "targets")
    preset = flags.get("preset") or plan_cfg.get("preset")
    if preset:
        chosen = get_preset(preset)
        sources = sources or model_refs(list(chosen.sources), "sources")
        targets = targets or model_refs(list(chosen.targets), "targets")
    return sources, targets


def _as_list(value: object) -> list:
    return value if isinstance(value, list) else [value]


def _plan_gamma(value: object) -> float | None:
    """A plan's gamma: a number in (0, 1] or "none" (:func:`skipgrad.backward.parse_gamma`)."""
    try:
        return parse_gamma(value)
    except InputError as exc:
        raise UserError(f"sgm in the plan: {exc}") from None


# The settings a plan's template takes: every attack and job setting.
_TEMPLATE_KEYS = set(ATTACK_SETTINGS) | set(JOB_SETTINGS)


def load_plan_file(path: Path) -> dict:
    """Read a TOML plan into a plain dict (validated later, together with the flags)."""
    import tomllib

    if not path.is_file():
        raise UserError(f"transfer config {path} does not exist")
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"transfer config {path} is not valid TOML: {exc}") from exc
    check_plan(config, path)
    return config


# Every key a plan may hold and the TOML type it takes (docs/plans.md describes each).
_NUMBER, _INT, _BOOL, _TEXT = "a number", "an integer", "true or false", "a string"


PLAN_SCHEMA: dict[str, str] = {
    "data": _TEXT, "sources": "a list of specs", "targets": "a list of specs", "preset": _TEXT,
    "attacks": "a list of attack names", "sgm": "gammas", "baseline": _BOOL, "backward": "backward-pass methods",
    "forward": "forward methods",
    "out": _TEXT, "title": _TEXT, "limit": _INT, "batch_size": _INT, "device": _TEXT,
    "quiet": _BOOL, "eps": _NUMBER, "step_size": _NUMBER, "steps": _INT, "norm": _TEXT,
    "loss": _TEXT, "targeted": _BOOL, "seed": _INT, "decay": _NUMBER, "di_prob": _NUMBER,
    "di_scale": _NUMBER, "ti_kernel": _INT, "sgm_official": _BOOL, "amp": _TEXT,
    "channels_last": _BOOL, "compile": _BOOL, "channels": _INT, "class_map": _TEXT,
    "si_copies": _INT, "vt_neighbours": _INT, "vt_beta": _NUMBER, "admix_scales": _INT,
    "admix_mixes": _INT, "admix_eta": _NUMBER, "sia_copies": _INT, "sia_blocks": _INT,
    "bsr_copies": _INT, "bsr_blocks": _INT, "bsr_max_angle": _NUMBER}


_CHECKS = {
    _NUMBER: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    _INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    _BOOL: lambda v: isinstance(v, bool),
    _TEXT: lambda v: isinstance(v, str),
    "a list of attack names": lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


def check_plan(config: dict, path: Path | str = "the plan") -> None:
    """Unknown keys (listed with every known one) and values of the wrong type, in one line each.
    Model lists, gammas and backward methods are checked where they are read."""
    unknown = sorted(set(config) - set(PLAN_SCHEMA))
    if unknown:
        raise UserError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(unknown)}; known keys: {', '.join(PLAN_SCHEMA)}")
    for key, value in config.items():
        check = _CHECKS.get(PLAN_SCHEMA[key])
        if check is not None and not check(value):
            raise UserError(f"{path}: {key} must be {PLAN_SCHEMA[key]}, got {value!r}")


def plan_gammas(value: object, sources: tuple[ModelRef, ...], baseline: bool,
                parse: Callable[[object], float | None]
                ) -> tuple[list[float | None], tuple[tuple[float | None, ...] | None, ...]]:
    """A plan's ``sgm``: a gamma or list of gammas for every source, or a table ``{SPEC = gamma
    or [gammas]}`` (sources not in it run without SGM). Returns (shared gammas, per-source
    columns or ())."""
    if not isinstance(value, dict):
        return [parse(g) for g in (value if isinstance(value, list) else [value])], ()
    specs = [s.spec for s in sources]
    unknown = sorted(set(value) - set(specs))
    if unknown:
        raise UserError(f"sgm names {', '.join(unknown)}, which is not a source of the plan "
                        f"(sources: {', '.join(specs)})")
    columns = []
    for spec in specs:
        given = value.get(spec, [])
        gammas = [parse(g) for g in (given if isinstance(given, list) else [given])]
        columns.append(gammas_with_baseline(gammas, baseline or not gammas))
    return [], tuple(columns)


def model_refs(values: object, what: str) -> tuple[ModelRef, ...]:
    """``["spec", {spec = "...", weights = "..."}]`` -> ModelRefs."""
    if isinstance(values, (str, dict)):
        values = [values]
    if not isinstance(values, list):
        raise UserError(f"{what} must be a list of model specs")
    refs = []
    for value in values:
        if isinstance(value, str):
            refs.append(ModelRef(value))
        elif isinstance(value, dict) and isinstance(value.get("spec"), str):
            refs.append(ModelRef(value["spec"], value.get("weights")))
        else:
            raise UserError(f"{what}: {value!r} is neither a spec string nor {{spec = ..., weights = ...}}")
    return tuple(refs)


def template_from(settings: dict, data: str) -> AttackJob:
    """An AttackJob holding the shared attack settings of a plan (sources/attack/sgm filled later)."""
    unknown = sorted(set(settings) - _TEMPLATE_KEYS)
    if unknown:
        raise UserError(f"unknown transfer setting(s): {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(_TEMPLATE_KEYS))})")
    job_settings = {k: settings[k] for k in JOB_SETTINGS if k in settings}
    spec = attack_from_settings(settings={k: settings[k] for k in ATTACK_SETTINGS if k in settings},
                                data=data, channels=job_settings.get("channels"))
    return AttackJob(sources=(), data=data, attack=spec, **job_settings)
