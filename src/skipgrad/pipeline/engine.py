"""The ``attack`` command's engine: dataset batches -> :func:`skipgrad.attack` -> PNGs + manifest.

Output folder::

    DIR/run.json        what was run (the config that must match to resume) and the environment
    DIR/manifest.csv    one row per finished image: id, file, label, target_label, source_pred,
                        sha256 (of the PNG as written; evaluate verifies the files against it)
    DIR/images/...      lossless 8-bit PNGs, one per input, relative paths kept, suffix .png

Every file is written atomically; the manifest is rewritten after each image group, so an
interrupted run (even by ``kill -9``) keeps all finished images and re-running the same command does
only the missing ones.

Images are attacked in fixed groups by index: ``--batch-size`` images per :func:`skipgrad.attack`
call (group ``k`` holds ids ``k*size .. (k+1)*size-1``). A convolution's float result on CPU
depends on how many images share the batch, so the group size is part of the run's identity in
run.json: for a given group size the files are byte-identical whatever the number of torchrun
processes or where an interrupted run stopped, and a folder is only resumed with its own group
size (:func:`resolve_group_size`). A group with any image missing is attacked whole and only its
missing images are written: a finished file is never rewritten. Under torchrun the groups are
shared round-robin across ranks; each rank writes its own PNGs and its own manifest part
(``.manifest-rank<R>.csv``), which rank 0 merges into manifest.csv.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from skipgrad import units

from skipgrad.pipeline import distributed

from skipgrad.store import outdir

from skipgrad.store import verify
from skipgrad.attacks.config import AttackSpec
from skipgrad.data.datasets import ImageDataset, Sample, open_dataset
from skipgrad.data.images import atomic_write_many, atomic_write_text, png_bytes, to_uint8
from skipgrad.data.prefetch import adaptively_prefetched, choose_depth, prefetched
from skipgrad.errors import InputError, UserError
from skipgrad.models import WrappedModel, load_model, resolve_config
from skipgrad.models.defenses import split_spec

RUN_FORMAT = 1
# sha256: of the PNG as written, checked by evaluate (skipgrad.store.verify); empty in older folders.
MANIFEST_COLUMNS = ("id", "file", "label", "target_label", "source_pred", "sha256")
# Images per attack call when --batch-size is not given for a new folder. CPU: the fastest
# group measured on 2 cores (docs/scale.md, "Throughput"); larger groups only add memory. CUDA:
# a GPU is mostly idle below a few dozen images per call, and 64 ImageNet images at 224x224 fit
# a ResNet-152 attack in 16 GB; small inputs (the zoo's 28x28) can take far more.
DEFAULT_GROUP_SIZE = {"cpu": 32, "cuda": 64}
# Folders made before the group size followed --batch-size were attacked in groups of 16; their
# run.json says so, and resuming them without --batch-size keeps it.
LEGACY_GROUP_SIZE = 16
# Leftovers of atomic writes killed before their rename (data.images.atomic_write_bytes).
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


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
    records it (``attack`` is the canonical composed name; per-source gammas are a list). An L2
    run also records its ``eps_unit``: its sizes were levels before they were [0, 1] units, so a
    folder made then must not be resumed as if they were the same."""
    record: dict = {"attack": spec.name,
                    "sgm": list(spec.sgm) if isinstance(spec.sgm, tuple) else spec.sgm}
    for key in ATTACK_SETTINGS:
        value = getattr(spec, key)
        record[key] = units.to_command_line(value, spec.norm) if key in _LEVEL_SETTINGS else value
    if spec.norm != "linf":
        record["eps_unit"] = units.unit_of(spec.norm)
    if spec.backward is not None:  # only when set, so folders made before it still resume
        record["backward"] = ([None if p is None else p.label for p in spec.backward]
                              if isinstance(spec.backward, tuple) else spec.backward.label)
    return record


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


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; refuses CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def default_group_size(device: torch.device) -> int:
    """The attack's group size on ``device`` when ``--batch-size`` is not given."""
    return DEFAULT_GROUP_SIZE["cuda" if device.type == "cuda" else "cpu"]


def resolve_group_size(out: Path, asked: int | None, device: torch.device) -> int:
    """The group size of a run into ``out``: ``--batch-size`` when given; otherwise the size the
    folder was started with (so a resumed run goes on as it began, also on another device), or the
    device's default for a new folder. Asking a folder that holds finished images for another
    size is refused: its remaining groups would be computed differently from its finished ones."""
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 1):
        raise UserError(f"--batch-size must be a positive integer, got {asked}")
    existing = read_run(out)
    recorded = _recorded_group_size(existing) if existing is not None else None
    if asked is None:
        return recorded or default_group_size(device)
    if recorded is not None and asked != recorded and _has_finished_images(out):
        raise UserError(f"--batch-size {asked} does not match {out}, which was attacked in groups "
                        f"of {recorded} (the group size changes the float results); pass "
                        f"--batch-size {recorded} to resume it, or use another --out")
    return asked


def _recorded_group_size(run: dict) -> int:
    config = run.get("config") or {}
    return int(config.get("group_size", LEGACY_GROUP_SIZE))


def _has_finished_images(out: Path) -> bool:
    return bool(read_manifest(out)) or any(out.glob(".manifest-rank*.csv"))


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


def read_run(out: Path) -> dict | None:
    """The run.json of a folder, or None when there is none."""
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); it is not a skipgrad run folder") from exc


def claim_folder(out: Path, identity: dict, env: dict, notes: dict | None = None) -> None:
    """Write run.json, or check that the folder holds this same run. A folder whose run has
    finished images is refused to any other config; one with none yet is simply taken over.
    ``notes`` are further top-level records written with the claim (e.g. ``sgm_auto``)."""
    existing = read_run(out)
    if existing is None and ((out / "images").exists() or (out / "manifest.csv").exists()):
        raise UserError(f"output folder {out} holds images or a manifest but no run.json; "
                        f"use another --out")
    if existing is not None and existing.get("config") != identity and read_manifest(out):
        raise UserError(f"output folder {out} holds another run ({_differences(existing, identity)}); "
                        f"use another --out or remove it")
    if existing is not None:  # what the folder already holds stays true in run.json
        env = _carried_over(existing.get("environment") or {}, env, bool(read_manifest(out)))
    record = {"format": RUN_FORMAT, "config": identity, "environment": env, **(notes or {})}
    atomic_write_text(out / "run.json", json.dumps(record, indent=2) + "\n")


def _carried_over(old: dict, env: dict, has_images: bool) -> dict:
    """The new environment, keeping from the old one what still describes the folder: the total
    time spent on it and, when it holds images made with a larger ``--limit`` (None = all), that
    limit rather than the smaller one of a resumption that has nothing to add."""
    env = dict(env)
    if "total_elapsed_seconds" in old:
        env["total_elapsed_seconds"] = old["total_elapsed_seconds"]
    if has_images and "limit" in old and env.get("limit") is not None and (
            old["limit"] is None or old["limit"] > env["limit"]):
        env["limit"] = old["limit"]
    return env


def _differences(existing: dict, identity: dict) -> str:
    old = existing.get("config") or {}
    keys = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    return "; ".join(f"{k}: {shown(old.get(k))} there vs {shown(identity.get(k))} now"
                     for k in keys[:4])


def shown(value: object) -> str:
    """A setting as a user reads it: ``none`` / ``true`` rather than Python's None / True."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def read_manifest(out: Path) -> list[dict[str, str]]:
    """Manifest rows whose image file still exists (a row without its file is redone)."""
    return [row for row in _read_rows(out / "manifest.csv") if (out / row["file"]).is_file()]


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_manifest(out: Path, rows: Sequence[dict[str, object]]) -> None:
    """Rewrite the manifest atomically, rows ordered by id."""
    _write_rows(out / "manifest.csv", rows)


def _write_rows(path: Path, rows: Sequence[dict[str, object]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: int(r["id"])))
    atomic_write_text(path, buffer.getvalue())


def manifest_part(out: Path, rank: int) -> Path:
    """Where rank ``rank`` of a sharded run lists the images it finished."""
    return out / f".manifest-rank{rank}.csv"


def merge_manifest_parts(out: Path) -> None:
    """Fold the manifest parts of a sharded run (finished or interrupted) into manifest.csv, then
    delete them; the merged manifest is in place before any part disappears, so a kill in between
    loses nothing (merging again is harmless)."""
    parts = sorted(out.glob(".manifest-rank*.csv"))
    if not parts:
        return
    rows = {row["file"]: row for row in read_manifest(out)}
    for part in parts:
        rows.update((r["file"], r) for r in _read_rows(part) if (out / r["file"]).is_file())
    write_manifest(out, list(rows.values()))
    for part in parts:
        part.unlink(missing_ok=True)


def remove_stale_temp_files(out: Path) -> int:
    """Delete temporary files left by writes that were killed before their rename (``kill -9``
    skips the cleanup in :func:`atomic_write_bytes`); they never carry a final name."""
    stale = [p for p in out.rglob(".*.tmp") if p.is_file() and _TEMP_FILE.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def prepare_folder(out: Path, identity: dict, env: dict, notes: dict | None = None) -> None:
    """Make ``out`` ready for this run (rank 0 only): tidy what a killed run left, claim
    run.json (with ``notes``, see :func:`claim_folder`)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    merge_manifest_parts(out)
    claim_folder(out, identity, env, notes)


def image_groups(samples: Sequence[Sample], size: int) -> list[list[Sample]]:
    """Samples grouped by ``id // size``, in id order: the fixed units every attack call gets."""
    groups: dict[int, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.id):
        groups.setdefault(sample.id // size, []).append(sample)
    return [groups[k] for k in sorted(groups)]


def image_file(sample: Sample) -> str:
    """Path of a sample's adversarial PNG relative to the run folder."""
    return f"images/{sample.name}.png"


def check_bound(adv: np.ndarray, clean: np.ndarray, job: AttackJob, name: str) -> None:
    """Assert the perturbation bound on the 8-bit levels about to be saved (the same check
    ``evaluate`` repeats on the saved files)."""
    why = verify.bound_violation(adv, clean, job.attack.eps * 255, job.attack.norm)
    if why is not None:
        raise RuntimeError(f"refusing to save {name}: perturbation {why} exceeds the bound "
                           f"(this is a bug in the attack; please report)")


def run_attack_job(job: AttackJob, out: Path, opts: RunOptions = RunOptions(),
                   log: Callable[[str], None] = print, notes: dict | None = None) -> RunSummary:
    """Attack every image of ``job.data`` not yet finished in ``out``; see the module docstring.
    ``notes`` (e.g. ``{"sgm_auto": record}``) enter run.json with the run's claim, while the
    folder's lock is held."""
    check_job(job)
    outdir.refuse_data_overlap(out, job.data)
    if opts.prefetch is not None and opts.prefetch < 0:
        raise UserError(f"--prefetch must be 0 or more image groups, got {opts.prefetch}")
    device = distributed.device_for(resolve_device(opts.device))
    group_size = resolve_group_size(out, opts.batch_size, device)  # before any model is loaded
    if job.compile:
        from skipgrad.attacks.compiled import check_compile

        check_compile(device)
    data = open_dataset(job.data, limit=opts.limit, channels=job.channels, class_map=job.class_map)
    if job.attack.targeted and not data.has_targets():
        raise UserError(f"--targeted needs target labels, and {job.data} has none "
                        f"(labels.csv needs a targeted_label column)")
    models = load_sources(job, device)
    _check_labels(data, models, job.attack.targeted)
    _check_sgm(job, models)  # SGM's own message first; the backward methods are checked next
    identity = run_identity(job, models, data, group_size)
    env = environment(models, data, opts, device)
    env["eps_unit"] = units.unit_of(job.attack.norm)  # what the numbers in "config" mean
    with outdir.exclusive(out):  # one live run per folder; SIGINT/SIGTERM stop after a group
        distributed.on_main(lambda: prepare_folder(out, identity, env, notes))
        if distributed.world().is_main:
            log(f"data: {data.spec}: {len(data)} images, {data.channels} channel(s), "
                f"{data.size[1]}x{data.size[0]}; {data.convention}")
            accuracy, warning = clean_accuracy_report(data, models, device)
            log(accuracy)
            if warning:  # shown with --quiet too: it says the results would be meaningless
                print(warning, file=sys.stderr)
        return _attack_missing(job, out, opts, data, models, device, group_size, log)


def _check_labels(data: ImageDataset, models: Sequence[WrappedModel], targeted: bool) -> None:
    for model in models:
        classes = model.config.num_classes
        for sample in data.samples:
            label = sample.target if targeted else sample.label
            if not 0 <= label < classes:
                raise UserError(f"label {label} of {sample.name} is outside the {classes} classes "
                                f"of {model.config.spec}")


# Images the source's clean accuracy is measured on before attacking (one forward pass each).
CLEAN_CHECK_IMAGES = 64
# Below this clean accuracy the labels are suspect: a trained classifier on its own task does far
# better (the zoo: 89-93%; ImageNet models: 70-85% top-1).
SUSPECT_ACCURACY = 0.5


def clean_accuracy_report(data: ImageDataset, models: Sequence[WrappedModel],
                          device: torch.device) -> tuple[str, str | None]:
    """The source's clean accuracy on the first attacked images and, when it is below
    ``SUSPECT_ACCURACY`` (or near chance for a many-class model), a one-line warning: labels that
    do not match the model's classes (class folders sorted by name: Fashion-MNIST's named
    folders give 30-40%, with three classes matching by accident) make every later number
    meaningless."""
    samples = sorted(data.samples, key=lambda s: s.id)[:CLEAN_CHECK_IMAGES]
    images = data.load(samples).to(device)
    preds = predict(models, images)
    accuracy = float((preds == torch.tensor([s.label for s in samples])).double().mean())
    classes = min(m.config.num_classes for m in models)
    report = f"source clean accuracy on the first {len(samples)} images: {100 * accuracy:.1f}%"
    warning = None
    if accuracy < max(SUSPECT_ACCURACY, 1.5 / classes):
        warning = (f"skipgrad: warning: the source classifies only {100 * accuracy:.1f}% of the "
                     f"first {len(samples)} clean images correctly (chance: {100 / classes:.0f}%), "
                     f"so success rates would mean little: "
                     f"the labels probably do not match the model's classes; map class folder "
                     f"names to the model's indices with --class-map FILE")
    return report, warning


def _check_sgm(job: AttackJob, models: Sequence[WrappedModel]) -> None:
    """SGM must be able to change every source it is asked for (blocks it decays, or the
    official placement); say so before the folder is claimed, not mid-run."""
    for model, gamma in zip(models, job.attack.sgm_per_source(len(models))):
        if gamma is not None:
            require_sgm(model, official=job.attack.sgm_official)


def require_sgm(model: WrappedModel, *, official: bool = False, flag: str = "--sgm") -> None:
    """:func:`skipgrad.sgm_blocks` as a command-line error: one line that names the flag."""
    import skipgrad

    try:
        skipgrad.sgm_blocks(model, official=official)
    except (skipgrad.NothingToChangeError, skipgrad.UnsupportedOfficialModelError) as exc:
        raise UserError(f"{flag} cannot change {model.config.spec}: {exc}; drop --sgm for it "
                        f"(with several --source, give --sgm none in its place)") from None


def _attack_missing(job: AttackJob, out: Path, opts: RunOptions, data: ImageDataset,
                    models: Sequence[WrappedModel], device: torch.device, group_size: int,
                    log: Callable[[str], None]) -> RunSummary:
    from skipgrad.progress import progress_bar

    world = distributed.world()
    done = {row["file"]: row for row in read_manifest(out)}
    todo = [g for g in image_groups(data.samples, group_size)
            if any(image_file(s) not in done for s in g)]
    mine = distributed.shard(todo)
    skipped = len(data) - sum(image_file(s) not in done for g in todo for s in g)
    new_rows: dict[str, dict[str, object]] = {}
    with _attack_sources(job, models, mine, data, device) as (sources, spec, compile_seconds):
        started, cpu_started = time.perf_counter(), time.process_time()
        bar = progress_bar(len(data), "attack", opts.quiet or not world.is_main, initial=skipped)
        loaded = _loaded_groups(mine, data, opts, device, log)
        try:
            for group, clean in loaded:
                missing = [s for s in group if image_file(s) not in done]
                rows = _attack_group(job, out, (sources, spec), models, group, clean, missing,
                                     device)
                new_rows.update((r["file"], r) for r in rows)
                _save_progress(out, done, new_rows)
                bar.update(len(missing) * world.size)  # rank 0 speaks for all: shares are equal
                outdir.check_stop()
        finally:
            loaded.close()
            bar.close()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    attacked = distributed.total(len(new_rows))  # also waits for every rank's last part
    wanted = {image_file(s) for s in data.samples}
    success = distributed.on_main(lambda: _finish_manifest(out, wanted, job.attack.targeted,
                                                           seconds))
    return RunSummary(out, len(data), skipped, attacked, seconds, success, compile_seconds,
                      cpu_seconds)


@contextlib.contextmanager
def _attack_sources(job: AttackJob, models: Sequence[WrappedModel], groups: list[list[Sample]],
                    data: ImageDataset, device: torch.device):
    """``(modules, spec, compile seconds)`` for the attack calls: the loaded models and the job's
    spec; with ``--compile``, the compiled models with the spec's SGM and backward-pass contexts
    attached for the whole run (see :mod:`skipgrad.attacks.compiled`), compiled by a warm-up at
    every group size of this run before the attack is timed."""
    if not job.compile or not groups:
        yield list(models), job.attack, 0.0
        return
    from skipgrad.attacks.compiled import compiled_sources, warm_up

    with compiled_sources(models, job.attack) as (sources, spec):
        clean = _on_device(data.load(groups[0]), job, device)
        labels = _labels(groups[0], job.attack.targeted, device)
        try:
            with numerics(job, device):
                seconds = warm_up(sources, clean, labels, spec, [len(g) for g in groups])
        except Exception as exc:  # noqa: BLE001 - before any image: refuse, never crash mid-run
            raise UserError(f"--compile failed on {', '.join(m.config.spec for m in models)} "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}); "
                            f"run without --compile") from exc
        yield sources, spec, seconds


def _on_device(images: torch.Tensor, job: AttackJob, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if job.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def _labels(samples: Sequence[Sample], targeted: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor([s.target if targeted else s.label for s in samples], device=device)


def _loaded_groups(groups: list[list[Sample]], data: ImageDataset, opts: RunOptions,
                   device: torch.device, log: Callable[[str], None]):
    """``(group, images)`` in order; the next groups are read while one is attacked when that
    pays (``--prefetch``, or decided after the first group); on a GPU they arrive page-locked."""
    pin = device.type == "cuda"
    if opts.prefetch is not None:
        return prefetched(groups, data.load, opts.prefetch, pin_memory=pin)

    def choose(load_seconds: float, attack_seconds: float) -> int:
        depth = choose_depth(load_seconds, attack_seconds, device)
        if distributed.world().is_main:
            log(f"prefetch: {depth} group(s) ahead (a group took {1000 * load_seconds:.1f} ms to "
                f"load and {attack_seconds:.2f} s to attack)")
        return depth

    return adaptively_prefetched(groups, data.load, choose, pin_memory=pin)


def _save_progress(out: Path, done: dict[str, dict], new_rows: dict[str, dict]) -> None:
    """After each group: a single process rewrites manifest.csv; a rank of a sharded run rewrites
    only its own part, so no file ever has two writers."""
    world = distributed.world()
    if world.sharded:
        _write_rows(manifest_part(out, world.rank), list(new_rows.values()))
    else:
        write_manifest(out, list({**done, **new_rows}.values()))


def _finish_manifest(out: Path, wanted: set[str], targeted: bool, seconds: float) -> float:
    merge_manifest_parts(out)
    rows = read_manifest(out)
    record_finish(out, len(rows), seconds)
    return _source_success({r["file"]: r for r in rows}, wanted, targeted)


def record_finish(out: Path, images: int, seconds: float) -> None:
    """Add to run.json what the folder holds now and how long this invocation attacked: the
    ``images`` count, ``finished`` time, ``elapsed_seconds`` of this invocation and
    ``total_elapsed_seconds`` over every invocation that worked on the folder."""
    run = read_run(out)
    if run is None:
        return
    env = run.setdefault("environment", {})
    total = float(env.get("total_elapsed_seconds") or 0) + seconds
    env.update(images=images, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               elapsed_seconds=round(seconds, 3), total_elapsed_seconds=round(total, 3))
    atomic_write_text(out / "run.json", json.dumps(run, indent=2) + "\n")


def _attack_group(job: AttackJob, out: Path, attacker: tuple[list[torch.nn.Module], AttackSpec],
                  models: Sequence[WrappedModel], batch: list[Sample], clean: torch.Tensor,
                  missing: list[Sample], device: torch.device) -> list[dict[str, object]]:
    """Attack one fixed group whole (its members set the float results) with ``attacker``'s
    modules and spec (see :func:`_attack_sources`), check the bound on the 8-bit levels, write
    the PNGs of its ``missing`` images and return their manifest rows (the source prediction by
    the loaded ``models``). Finished images keep their files and rows: after a crash they hold
    these same bytes; after a ``--limit`` change they were made in a smaller group and are kept
    rather than redone."""
    from skipgrad.attacks.loop import attack_with

    sources, spec = attacker
    clean = _on_device(clean, job, device)
    labels = _labels(batch, job.attack.targeted, device)
    with outdir.naming_images([str(s.path or s.name) for s in batch]), numerics(job, device):
        adv = attack_with(sources, clean, labels, spec, ids=[s.id for s in batch])
    levels = [to_uint8(a) for a in adv]
    for sample, adv_levels, image in zip(batch, levels, clean):
        check_bound(adv_levels, to_uint8(image), job, sample.name)
    wanted = {s.id for s in missing}
    encoded = {s.id: png_bytes(a) for s, a in zip(batch, levels) if s.id in wanted}
    # The manifest records the hash of exactly the bytes written.
    if encoded:
        atomic_write_many([(outdir.inside(out, image_file(s)), encoded[s.id])
                           for s in batch if s.id in wanted])
    hashes = {i: verify.sha256_hex(data) for i, data in encoded.items()}
    preds = predict(models, _from_levels(levels, adv.shape, device))
    return [{"id": s.id, "file": image_file(s), "label": s.label,
             "target_label": "" if s.target is None else s.target, "source_pred": int(p),
             verify.SHA_COLUMN: hashes[s.id]}
            for s, p in zip(batch, preds.tolist()) if s.id in wanted]


def _from_levels(levels: list[np.ndarray], shape: torch.Size, device: torch.device) -> torch.Tensor:
    # Predict on exactly what was saved, not on the float tensor before rounding.
    stacked = torch.from_numpy(np.stack(levels)).to(device).float().div(255)
    return stacked.reshape(shape) if stacked.ndim == 3 else stacked.permute(0, 3, 1, 2)


@torch.no_grad()
def predict(models: Sequence[torch.nn.Module], images: torch.Tensor) -> torch.Tensor:
    """Top-1 class of the (ensemble-averaged) logits; a single defended target predicts by its own
    rule (a smoothed model's vote may abstain: :data:`skipgrad.models.defenses.ABSTAIN`)."""
    if len(models) == 1 and hasattr(models[0], "predict_labels"):
        return models[0].predict_labels(images).cpu()
    logits = sum(model(images) for model in models) / len(models)
    return logits.argmax(dim=1).cpu()


def _source_success(rows: dict[str, dict], wanted: set[str], targeted: bool) -> float:
    chosen = [r for f, r in rows.items() if f in wanted]
    if not chosen:
        return float("nan")
    hits = [(int(r["source_pred"]) == int(r["target_label"])) if targeted
            else (int(r["source_pred"]) != int(r["label"])) for r in chosen]
    return sum(hits) / len(hits)
