"""What an attack run is: :class:`AttackJob` (sources, data, the attack and the numerics), its
settings as the command line and the plans spell them, its checks before any work, and its
identity as run.json records it (what must match for a folder to be resumed).
"""
from __future__ import annotations

import contextlib
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from skipgrad.attacks.config import AttackSpec
from skipgrad.backward.base import NothingToChangeError
from skipgrad.backward.official import UnsupportedOfficialModelError
from skipgrad.backward.sgm import NoResidualBlockError, sgm_blocks
from skipgrad.data.datasets import ImageDataset
from skipgrad.errors import InputError, UserError
from skipgrad.models import WrappedModel, load_model, resolve_config
from skipgrad.models.defenses import split_spec
from skipgrad.pipeline import distributed
from skipgrad.pipeline.settings import JOB_SETTINGS, attack_settings


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


def job_record(job: AttackJob) -> dict:
    """The whole job as plain JSON values in command-line units (the run.json config keys)."""
    return {"sources": list(job.sources), "data": job.data, **attack_settings(job.attack),
            "weights": list(job.weights),
            **{key: getattr(job, key) for key in JOB_SETTINGS}}


# Attack settings that enter run.json only when they differ from these defaults.
_OPTIONAL_IDENTITY = {"amp": "off", "channels_last": False, "compile": False, "backward": None,
                      "forward": None}


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
    # With a forward method: the white-box success on the source as the method modifies it
    # (source_success is always on the unmodified source); None without one.
    modified_source_success: float | None = None
    # The sources as resolved (``tv:resnet50`` -> ``tv:resnet50.IMAGENET1K_V1``), a local weights
    # file named after its spec: what the summary line says was attacked from.
    sources: tuple[str, ...] = ()
    # Mean L2 of the folder's saved perturbations in [0, 1] pixel units (the manifest's ``l2``
    # column); None when a row lacks it (a folder begun before the column).
    mean_l2: float | None = None


def check_job(job: AttackJob) -> None:
    """Validate what the AttackSpec cannot know (sources, weights, numerics) before any model
    is loaded."""
    if not job.sources:
        raise UserError("at least one --source is needed")
    if job.amp not in AMP_MODES:
        raise UserError(f"--amp must be one of {', '.join(AMP_MODES)}, got {job.amp!r} (float16 "
                        f"is not offered: input gradients underflow in it without loss scaling)")
    backward_plans(job)
    if job.compile:
        _refuse_compiled_draws(job)
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


def backward_plans(job: AttackJob) -> tuple:
    """The job's backward-pass methods, one plan (or None) per source; bad text is a UserError."""
    return _plans(job, "backward")


def forward_plans(job: AttackJob) -> tuple:
    """The job's forward methods (``--forward``), one plan (or None) per source, like
    :func:`backward_plans`."""
    return _plans(job, "forward")


def _plans(job: AttackJob, kind: str) -> tuple:
    from skipgrad.backward.registry import BackwardSpecError

    try:
        return getattr(job.attack, f"{kind}_per_source")(len(job.sources))
    except BackwardSpecError as exc:
        raise UserError(f"--{kind}: {exc}") from None


def has_methods(job: AttackJob) -> bool:
    """Whether the job has any backward-pass or forward method."""
    return job.attack.backward is not None or job.attack.forward is not None


def backward_record(job: AttackJob, models: Sequence[WrappedModel]) -> list[list[dict]]:
    """Per source: each method with its resolved settings and the modules it changes in that
    source, as run.json records them (part of the run's identity). Building the contexts on the
    loaded models is also the check that every method applies to its source, so that a method
    with nothing to change (PNA on a CNN, LinBP on a ViT, Ghost on a CNN without residual
    blocks, IAA on a ViT) or two methods that would redefine the same module fail here, before
    the folder is claimed."""
    return method_records(job, models)["backward"]


def forward_record(job: AttackJob, models: Sequence[WrappedModel]) -> list[list[dict]]:
    """:func:`backward_record` of the job's forward methods (``--forward``)."""
    return method_records(job, models)["forward"]


def method_records(job: AttackJob, models: Sequence[WrappedModel]) -> dict[str, list[list[dict]]]:
    """``{"backward": ..., "forward": ...}``: per source, each method's record (see
    :func:`backward_record`), after checking that every method applies and that none
    conflicts."""
    import skipgrad
    from skipgrad.attacks.loop import backward_contexts

    plans = {kind: _plans(job, kind) for kind in ("backward", "forward")}
    try:
        contexts = backward_contexts(models, job.attack)
        with contextlib.ExitStack() as stack:  # entering them all finds conflicts, then leaves
            for context in contexts:
                stack.enter_context(context)
    except InputError as exc:  # nothing to change, a conflict, a bad start=: the user's to fix
        raise UserError(f"{_plan_text(plans, models)}: {exc}") from None
    by_method = iter(c for c in contexts if not isinstance(c, skipgrad.skip_gradient))
    records: dict[str, list[list[dict]]] = {"backward": [], "forward": []}
    for backward, forward in zip(plans["backward"], plans["forward"]):  # the contexts' order
        for kind, plan in (("backward", backward), ("forward", forward)):
            records[kind].append([] if plan is None else [_method_record(choice, next(by_method))
                                                          for choice in plan.methods])
    return records


def _refuse_compiled_draws(job: AttackJob) -> None:
    """``--compile`` enters the contexts once, without the attack's per-image streams, so a
    method that draws anew at every forward pass (Ghost: its context takes the streams through
    ``follow_attack``) cannot run compiled; refuse it in one line."""
    from skipgrad.backward.base import BackwardContext

    for plan in forward_plans(job):
        for choice in plan.methods if plan is not None else ():
            factory = choice.info.factory
            if getattr(factory, "follow_attack", None) not in (None,
                                                               BackwardContext.follow_attack):
                raise UserError(f"--compile cannot run --forward {choice.label}: it draws anew "
                                f"at every forward pass from the images' own random streams, "
                                f"and the compiled path enters the contexts once without them; "
                                f"run without --compile")


def _method_record(choice, context) -> dict:
    from skipgrad.backward.registry import resolved_settings

    return {"method": choice.name, "settings": resolved_settings(choice, context),
            "modules": [change.module for change in context.changes]}


def _plan_text(plans: Mapping[str, Sequence], models: Sequence[WrappedModel]) -> str:
    from skipgrad.backward.registry import describe

    given = " ".join(f"--{kind} {describe(p)}" for kind, p in plans.items() if any(p))
    return f"{given} on {', '.join(m.config.spec for m in models)}"


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
    records = method_records(job, models) if has_methods(job) else {}
    for kind in ("backward", "forward"):
        record = records.get(kind)
        identity[kind] = record if record and any(record) else None
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
