"""What an attack run is: :class:`AttackJob` (sources, data, the attack and the numerics), its
settings as the command line and the plans spell them, its checks before any work, and its
identity as run.json records it (what must match for a folder to be resumed).
"""
from __future__ import annotations

import contextlib
import math
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from skipgrad import units
from skipgrad.attacks.config import AttackSpec
from skipgrad.backward.base import NothingToChangeError
from skipgrad.backward.official import UnsupportedOfficialModelError
from skipgrad.backward.sgm import NoResidualBlockError, sgm_blocks
from skipgrad.data.datasets import ImageDataset, open_dataset
from skipgrad.errors import InputError, UserError
from skipgrad.models import WrappedModel, load_model, resolve_config
from skipgrad.models.defenses import split_spec
from skipgrad.pipeline import distributed


@dataclass(frozen=True)
class AttackJob:
    """Everything that determines the adversarial images (and so must match to resume): the
    source models, the data and the attack (one :class:`~skipgrad.AttackSpec`, in [0, 1] pixel
    units; :func:`attack_from_settings` builds it from command-line units)."""

    sources: tuple[str, ...]
    data: str
    attack: AttackSpec = AttackSpec()
    weights: tuple[str | None, ...] = ()
    channels: int | None = None
    class_map: str | None = None
    # Numerics of the source's forward/backward. They change the float results, so they are part
    # of the run's identity (recorded only when not the default, so older folders still resume).
    amp: str = "off"  # "off" (float32) or "bf16" (autocast to bfloat16)
    channels_last: bool = False
    compile: bool = False  # torch.compile the sources (attacks.compiled)


# Attack settings as the command line and the TOML plans spell them; eps and step_size are pixel
# levels out of 255 there. ``attack_from_settings`` turns them into the AttackSpec.
ATTACK_SETTINGS = ("eps", "step_size", "steps", "norm", "loss", "targeted", "seed", "decay",
                   "di_prob", "di_scale", "ti_kernel", "sgm_official")


# Settings of the job rather than of the attack (data decoding and numerics).
JOB_SETTINGS = ("channels", "class_map", "amp", "channels_last", "compile")


_LEVEL_SETTINGS = ("eps", "step_size")


def attack_from_settings(method: str = "ifgsm", sgm: float | None | tuple = None,
                         settings: dict | None = None,
                         backward: str | None | tuple[str | None, ...] = None,
                         data: str | None = None) -> AttackSpec:
    """The AttackSpec of command-line/plan ``settings`` (keys of ``ATTACK_SETTINGS``, unset ones
    left out; eps and step size in the units of :mod:`skipgrad.units`: levels for L-inf, [0, 1]
    for L2) with the composed attack ``method``, the SGM gamma(s) and the backward-pass
    method(s). ``data`` sizes the L2 defaults. Bad values are a UserError."""
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
    elif not all(k in values for k in _LEVEL_SETTINGS):
        values = {**units.l2_defaults(_pixels(data)), **values}
    for key in _LEVEL_SETTINGS:
        if key in values:
            values[key] = units.to_library(values[key], norm)
    try:
        return skipgrad.AttackSpec.parse(method, sgm=sgm, backward=backward, **values)
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
    if eps < 1 - 1e-6:
        raise UserError(f"--eps {eps:g} is below one 8-bit level, so no pixel can change (--eps "
                        f"is in {units.LINF_UNIT}); did you mean "
                        f"--eps {units.nearest_levels(eps)}?")
    if isinstance(steps, int) and steps * step < 0.5 - 1e-6:
        raise UserError(f"--step-size {step:g} x {steps} steps moves a pixel by less than half a "
                        f"level, so no pixel can change (--step-size is in {units.LINF_UNIT}); "
                        f"did you mean --step-size {units.nearest_levels(step)}?")


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
    if spec.backward is not None:  # only when set, so folders made before it still resume
        record["backward"] = ([None if p is None else p.label for p in spec.backward]
                              if isinstance(spec.backward, tuple) else spec.backward.label)
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


def job_record(job: AttackJob) -> dict:
    """The whole job as plain JSON values in command-line units (the run.json config keys)."""
    return {"sources": list(job.sources), "data": job.data, **attack_settings(job.attack),
            "weights": list(job.weights),
            **{key: getattr(job, key) for key in JOB_SETTINGS}}


# Attack settings that enter run.json only when they differ from these defaults.
_OPTIONAL_IDENTITY = {"amp": "off", "channels_last": False, "compile": False, "backward": None}


AMP_MODES = ("off", "bf16")


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what): these may change between a run and its resumption."""

    limit: int | None = None
    # The attack's group size (part of the run's identity, see resolve_group_size) and the
    # evaluation batch; None: the folder's own when resuming, else the device's default.
    batch_size: int | None = None
    device: str = "auto"
    quiet: bool = False
    # Image groups loaded ahead in a background thread; None: decided from the first group's
    # load and attack times (data.prefetch.choose_depth); 0: load in turn.
    prefetch: int | None = None


@dataclass
class RunSummary:
    """What a call to :func:`run_attack_job` did."""

    out: Path
    total: int
    skipped: int
    attacked: int
    seconds: float
    source_success: float = field(default=float("nan"))
    compile_seconds: float = 0.0  # --compile: the warm-up that compiled the sources, not in seconds
    # CPU time of this process over ``seconds`` (all threads): on a shared machine wall time
    # depends on the neighbours, CPU time much less.
    cpu_seconds: float = 0.0
    # The sources as resolved (``tv:resnet50`` -> ``tv:resnet50.IMAGENET1K_V1``), a local weights
    # file named after its spec: what the summary line says was attacked from.
    sources: tuple[str, ...] = ()


def check_job(job: AttackJob) -> None:
    """Validate what the AttackSpec cannot know (sources, weights, numerics) before any model
    is loaded."""
    if not job.sources:
        raise UserError("at least one --source is needed")
    if job.amp not in AMP_MODES:
        raise UserError(f"--amp must be one of {', '.join(AMP_MODES)}, got {job.amp!r} (float16 "
                        f"is not offered: input gradients underflow in it without loss scaling)")
    backward_plans(job)
    if job.weights and len(job.weights) != len(job.sources):
        raise UserError(f"{len(job.weights)} --weights for {len(job.sources)} --source; give one "
                        f"weights file per source, in the same order")
    if isinstance(job.attack.sgm, tuple) and len(job.attack.sgm) != len(job.sources):
        raise UserError(f"{len(job.attack.sgm)} --sgm values for {len(job.sources)} --source; give "
                        f"one --sgm for all sources or one per --source, in the same order")
    for spec, weights in zip(job.sources, job.weights or (None,) * len(job.sources)):
        _refuse_defended_source(spec)
        resolve_config(spec, weights)  # unknown specs fail before any data is read


def _refuse_defended_source(spec: str) -> None:
    # Input-transformation defenses are not differentiable (JPEG, rounding, votes): a gradient
    # through them would be silently wrong, and attacking them is BPDA/EOT, not transfer.
    base, defenses = split_spec(spec)
    if defenses:
        raise UserError(f"{spec!r} cannot be an attack source: its defenses "
                        f"({', '.join('+' + d.spec for d in defenses)}) are evaluation-time only; "
                        f"attack from {base!r} and evaluate on {spec!r} with --target")


def _positive(what: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{what} must be a finite number > 0, got {value}")


def backward_plans(job: AttackJob) -> tuple:
    """The job's backward-pass methods, one plan (or None) per source; bad text is a UserError."""
    from skipgrad.backward.registry import BackwardSpecError

    try:
        return job.attack.backward_per_source(len(job.sources))
    except BackwardSpecError as exc:
        raise UserError(f"--backward: {exc}") from None


def backward_record(job: AttackJob, models: Sequence[WrappedModel]) -> list[list[dict]]:
    """Per source: each method with its resolved settings and the modules it changes in that
    source, as run.json records them (part of the run's identity). Building the contexts on the
    loaded models is also the check that every method applies to its source, so that a method
    with nothing to change (PNA on a CNN, LinBP on a ViT) or two methods that would redefine the
    same module's backward fail here, before the folder is claimed."""
    import contextlib

    import skipgrad
    from skipgrad.attacks.loop import backward_contexts

    plans = backward_plans(job)
    try:
        contexts = backward_contexts(models, job.attack)
        with contextlib.ExitStack() as stack:  # entering them all finds conflicts, then leaves
            for context in contexts:
                stack.enter_context(context)
    except InputError as exc:  # nothing to change, a conflict, a bad start=: the user's to fix
        raise UserError(f"--backward {_plan_text(plans, models)}: {exc}") from None
    by_method = iter(c for c in contexts if not isinstance(c, skipgrad.skip_gradient))
    return [[] if plan is None else [_method_record(choice, next(by_method))
                                     for choice in plan.methods] for plan in plans]


def _method_record(choice, context) -> dict:
    from skipgrad.backward.registry import resolved_settings

    return {"method": choice.name, "settings": resolved_settings(choice, context),
            "modules": [change.module for change in context.changes]}


def _plan_text(plans: Sequence, models: Sequence[WrappedModel]) -> str:
    from skipgrad.backward.registry import describe

    return f"{describe(plans)} on {', '.join(m.config.spec for m in models)}"


def load_sources(job: AttackJob, device: torch.device) -> list[WrappedModel]:
    """The source models of a job, on ``device``."""
    weights = job.weights or (None,) * len(job.sources)
    models = [load_model(spec, weights=w, device=device) for spec, w in zip(job.sources, weights)]
    if job.channels_last:
        for model in models:
            model.to(memory_format=torch.channels_last)
    return models


def source_names(job: AttackJob, models: Sequence[WrappedModel]) -> tuple[str, ...]:
    """Each source as resolved, with its local weights file when one was given."""
    weights = job.weights or (None,) * len(models)
    return tuple(m.config.spec if w is None else f"{m.config.spec} ({w})"
                 for m, w in zip(models, weights))


def numerics(job: AttackJob, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a job's forward and backward passes (a no-op for ``amp="off"``).
    Losses, gradients and the projection stay in float32: autocast only lowers the matmuls and
    convolutions inside the models."""
    if job.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_identity(job: AttackJob, models: Sequence[WrappedModel], data: ImageDataset,
                 group_size: int) -> dict:
    """The part of run.json that must be equal for a folder to be resumed."""
    identity = job_record(job)
    identity.pop("weights")
    identity["sources"] = [m.config.spec for m in models]
    identity["weights_sha256"] = [m.config.weights_sha256 for m in models]
    identity["data"] = data.spec
    identity["channels"] = data.channels
    identity["group_size"] = group_size
    record = backward_record(job, models) if job.attack.backward is not None else None
    identity["backward"] = record if record and any(record) else None
    for key, default in _OPTIONAL_IDENTITY.items():
        if identity[key] == default:
            del identity[key]
    return identity


def environment(models: Sequence[WrappedModel], data: ImageDataset, opts: RunOptions,
                device: torch.device) -> dict:
    """Versions and run options: recorded, not compared."""
    import skipgrad

    return {"skipgrad": skipgrad.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "numpy": np.__version__, "device": str(device), "batch_size": opts.batch_size,
            "world_size": distributed.world().size, "prefetch": opts.prefetch,
            "limit": opts.limit, "data_convention": data.convention,
            "models": [m.config.to_dict() for m in models],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def check_sgm(job: AttackJob, models: Sequence[WrappedModel]) -> None:
    """SGM must be able to change every source it is asked for (blocks it decays, or the
    official placement); say so before the folder is claimed, not mid-run."""
    for model, gamma in zip(models, job.attack.sgm_per_source(len(models))):
        if gamma is not None:
            require_sgm(model, official=job.attack.sgm_official)


def sgm_refusal(model: WrappedModel, *, official: bool = False) -> InputError | None:
    """Why SGM cannot change ``model`` (the error :func:`skipgrad.sgm_blocks` raises: no residual or
    dense block, none decayed, or a model the ``official`` placement does not support), or None
    when it can: the one check of "can SGM change this source" behind every caller."""
    try:
        sgm_blocks(model, official=official)
    except (NothingToChangeError, UnsupportedOfficialModelError) as exc:
        return exc
    return None


def sgm_problem(model: WrappedModel, *, official: bool = False) -> str | None:
    """:func:`sgm_refusal` as one readable line, or None when SGM can change ``model``."""
    refusal = sgm_refusal(model, official=official)
    if refusal is None:
        return None
    if type(refusal) is NoResidualBlockError:
        return (f"{model.config.spec} has no residual or dense block (e.g. VGG, Inception-v3); "
                f"nothing for SGM to decay")
    return " ".join(str(refusal).split())


def require_sgm(model: WrappedModel, *, official: bool = False, flag: str = "--sgm") -> None:
    """:func:`sgm_refusal` as a command-line error: one line that names the flag."""
    refusal = sgm_refusal(model, official=official)
    if refusal is not None:
        raise UserError(f"{flag} cannot change {model.config.spec}: {refusal}; drop --sgm for it "
                        f"(with several --source, give --sgm none in its place)")


def settings_of(flags: Mapping[str, object]) -> dict:
    """The attack and job settings among parsed command-line ``flags`` (unset ones, None, left out)."""
    return {n: flags[n] for n in ATTACK_SETTINGS + JOB_SETTINGS if flags.get(n) is not None}


def run_options(flags: Mapping[str, object], base: Mapping[str, object] | None = None
                ) -> RunOptions:
    """The RunOptions of parsed command-line ``flags`` over ``base`` (a plan's run keys)."""
    base = base or {}

    def pick(name: str, default: object) -> object:
        value = flags.get(name)
        return value if value is not None else base.get(name, default)

    return RunOptions(limit=pick("limit", None), batch_size=pick("batch_size", None),
                      device=pick("device", "auto"),
                      quiet=bool(flags.get("quiet") or base.get("quiet")),
                      prefetch=pick("prefetch", None))


def on_device(images: torch.Tensor, job: AttackJob, device: torch.device) -> torch.Tensor:
    """Images moved to ``device`` in the job's memory format (channels-last when asked)."""
    images = images.to(device, non_blocking=True)
    if job.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
