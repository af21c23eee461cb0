"""The ``attack`` command's engine: dataset batches -> :func:`skipgrad.attack` -> PNGs + manifest.

Output folder::

    DIR/run.json        what was run (the config that must match to resume) and the environment
    DIR/manifest.csv    one row per finished image: id, file, label, target_label, source_pred,
                        sha256 (of the PNG as written; evaluate verifies the files against it),
                        l2, linf (the saved perturbation in [0, 1] pixel units: levels / 255)
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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from skipgrad import units
from skipgrad.attacks.config import AttackSpec
from skipgrad.data.datasets import ImageDataset, Sample, open_dataset
from skipgrad.data.images import png_bytes, to_uint8
from skipgrad.data.prefetch import adaptively_prefetched, choose_depth, prefetched
from skipgrad.analysis.success import succeeded
from skipgrad.errors import UserError
from skipgrad.models import WrappedModel
from skipgrad.pipeline import distributed
from skipgrad.pipeline.device import resolve_device, resolve_group_size
from skipgrad.pipeline.job import (AttackJob, RunOptions, RunSummary, check_job, check_sgm, environment, load_sources, numerics, on_device, run_identity, source_names)
from skipgrad.store import outdir, verify
from skipgrad.store.atomic import atomic_write_many
from skipgrad.store.records import (FORWARD_PRED_COLUMN, NORM_COLUMNS, image_file, manifest_part,
                                    merge_manifest_parts, prepare_folder, read_manifest,
                                    record_finish, record_interrupted, write_manifest, write_rows)


def image_groups(samples: Sequence[Sample], size: int) -> list[list[Sample]]:
    """Samples grouped by ``id // size``, in id order: the fixed units every attack call gets."""
    groups: dict[int, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.id):
        groups.setdefault(sample.id // size, []).append(sample)
    return [groups[k] for k in sorted(groups)]


def check_bound(adv: np.ndarray, clean: np.ndarray, job: AttackJob, name: str) -> None:
    """Assert the perturbation bound on the 8-bit levels about to be saved (the same check
    ``evaluate`` repeats on the saved files)."""
    why = verify.bound_violation(adv, clean, job.attack.eps, job.attack.norm)
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
    check_sgm(job, models)  # SGM's own message first; the backward methods are checked next
    identity = run_identity(job, models, data, group_size)
    env = environment(models, data, opts, device)
    env["eps_unit"] = units.unit_of(job.attack.norm)  # what the numbers in "config" mean
    # Compute per image: model evaluations (forward + backward) over all steps and sources.
    env["gradient_evaluations_per_image"] = job.attack.gradient_evaluations * len(models)
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
    with _attack_sources(job, models, mine, data, device) as (sources, spec, compile_seconds,
                                                              plain):
        started, cpu_started = time.perf_counter(), time.process_time()
        saved = started  # when the last finished group was saved
        bar = progress_bar(len(data), "attack", opts.quiet or not world.is_main, initial=skipped)
        loaded = _loaded_groups(mine, data, opts, device, log)
        try:
            for group, clean in loaded:
                missing = [s for s in group if image_file(s) not in done]
                rows = _attack_group(job, out, (sources, spec), (plain, models), group, clean,
                                     missing, device)
                new_rows.update((r["file"], r) for r in rows)
                _save_progress(out, done, new_rows)
                saved = time.perf_counter()
                bar.update(len(missing) * world.size)  # rank 0 speaks for all: shares are equal
                outdir.check_stop()
        except BaseException:  # Ctrl-C, SIGTERM, an error: the finished groups' time is kept
            if world.is_main:
                with contextlib.suppress(Exception):  # never hide why the run stopped
                    record_interrupted(out, saved - started)
            raise
        finally:
            loaded.close()
            bar.close()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    attacked = distributed.total(len(new_rows))  # also waits for every rank's last part
    wanted = {image_file(s) for s in data.samples}
    success = distributed.on_main(lambda: _finish_manifest(out, wanted, job, seconds))
    return RunSummary(out, len(data), skipped, attacked, seconds, success[0], compile_seconds,
                      cpu_seconds, modified_source_success=success[1],
                      sources=source_names(job, models), mean_l2=success[2])


@contextlib.contextmanager
def _attack_sources(job: AttackJob, models: Sequence[WrappedModel], groups: list[list[Sample]],
                    data: ImageDataset, device: torch.device):
    """``(modules, spec, compile seconds, unmodified models)`` for the attack calls: the loaded
    models and the job's spec; with ``--compile``, the compiled models with the spec's SGM and
    backward-pass contexts attached for the whole run (see :mod:`skipgrad.attacks.compiled`),
    compiled by a warm-up at every group size of this run before the attack is timed. The
    unmodified models predict the source's white-box success: the loaded models, or with
    ``--compile`` and a forward method (whose context stays attached to them), copies taken
    before."""
    if not job.compile or not groups:
        yield list(models), job.attack, 0.0, list(models)
        return
    import copy

    from skipgrad.attacks.compiled import compiled_sources, warm_up

    plain = ([copy.deepcopy(m) for m in models] if job.attack.forward is not None
             else list(models))
    with compiled_sources(models, job.attack) as (sources, spec):
        clean = on_device(data.load(groups[0]), job, device)
        labels = _labels(groups[0], job.attack.targeted, device)
        try:
            with numerics(job, device):
                seconds = warm_up(sources, clean, labels, spec, [len(g) for g in groups])
        except Exception as exc:  # noqa: BLE001 - before any image: refuse, never crash mid-run
            raise UserError(f"--compile failed on {', '.join(m.config.spec for m in models)} "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}); "
                            f"run without --compile") from exc
        yield sources, spec, seconds, plain


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
        write_rows(manifest_part(out, world.rank), list(new_rows.values()))
    else:
        write_manifest(out, list({**done, **new_rows}.values()))


def _finish_manifest(out: Path, wanted: set[str], job: AttackJob, seconds: float
                     ) -> tuple[float, float | None, float | None]:
    """Merge the manifest, record the finish in run.json; the white-box success on the
    unmodified source and, with a forward method, on the modified one (also in run.json), and
    the mean L2 of the wanted images' perturbations (None when a row has no ``l2``)."""
    merge_manifest_parts(out)
    rows = {r["file"]: r for r in read_manifest(out)}
    success = _source_success(rows, wanted, job.attack.targeted)
    modified = None
    if job.attack.forward is not None:
        modified = _source_success(rows, wanted, job.attack.targeted, FORWARD_PRED_COLUMN)
    white_box = None if modified is None else {"source_success": success,
                                               "modified_source_success": modified}
    record_finish(out, len(rows), seconds, white_box)
    sizes = [r.get(NORM_COLUMNS[0]) for f, r in rows.items() if f in wanted]
    mean_l2 = (sum(map(float, sizes)) / len(sizes)) if sizes and all(sizes) else None
    return success, modified, mean_l2


def _attack_group(job: AttackJob, out: Path, attacker: tuple[list[torch.nn.Module], AttackSpec],
                  models: tuple[Sequence[torch.nn.Module], Sequence[WrappedModel]],
                  batch: list[Sample], clean: torch.Tensor, missing: list[Sample],
                  device: torch.device) -> list[dict[str, object]]:
    """Attack one fixed group whole (its members set the float results) with ``attacker``'s
    modules and spec (see :func:`_attack_sources`), check the bound on the 8-bit levels, write
    the PNGs of its ``missing`` images and return their manifest rows (the source prediction by
    the unmodified and, with a forward method, by the modified source: ``models`` holds both
    lists). Finished images keep their files and rows: after a crash they hold
    these same bytes; after a ``--limit`` change they were made in a smaller group and are kept
    rather than redone."""
    from skipgrad.attacks.loop import attack_with

    sources, spec = attacker
    clean = on_device(clean, job, device)
    labels = _labels(batch, job.attack.targeted, device)
    with outdir.naming_images([str(s.path or s.name) for s in batch]), numerics(job, device):
        adv = attack_with(sources, clean, labels, spec, ids=[s.id for s in batch])
    levels = [to_uint8(a) for a in adv]
    norms = {}  # id -> (l2, linf) of the levels about to be saved, as the manifest records them
    for sample, adv_levels, image in zip(batch, levels, clean):
        clean_levels = to_uint8(image)
        check_bound(adv_levels, clean_levels, job, sample.name)
        norms[sample.id] = verify.perturbation_norms(adv_levels, clean_levels)
    wanted = {s.id for s in missing}
    encoded = {s.id: png_bytes(a) for s, a in zip(batch, levels) if s.id in wanted}
    # The manifest records the hash of exactly the bytes written.
    if encoded:
        atomic_write_many([(outdir.inside(out, image_file(s)), encoded[s.id])
                           for s in batch if s.id in wanted])
    hashes = {i: verify.sha256_hex(data) for i, data in encoded.items()}
    plain, loaded = models
    saved = _from_levels(levels, adv.shape, device)
    preds = predict(plain, saved)
    rows = [{"id": s.id, "file": image_file(s), "label": s.label,
             "target_label": "" if s.target is None else s.target, "source_pred": int(p),
             verify.SHA_COLUMN: hashes[s.id], **dict(zip(NORM_COLUMNS, norms[s.id]))}
            for s, p in zip(batch, preds.tolist()) if s.id in wanted]
    if job.attack.forward is not None:
        with numerics(job, device):
            modified = _modified_predictions(job, loaded, saved, [s.id for s in batch])
        by_id = dict(zip([s.id for s in batch], modified.tolist()))
        for row in rows:
            row[FORWARD_PRED_COLUMN] = int(by_id[row["id"]])
    return rows


def _modified_predictions(job: AttackJob, models: Sequence[WrappedModel], images: torch.Tensor,
                          ids: list[int]) -> torch.Tensor:
    """Top-1 of the source as the job's forward methods modify it, on the saved images. A method
    that draws (Ghost) draws from the images' own streams of the run seed, so each image's
    prediction depends on its id only. With ``--compile`` the contexts are attached already."""
    if job.compile:
        return predict(models, images)
    import dataclasses

    from skipgrad.attacks.loop import backward_contexts
    from skipgrad.attacks.randomness import stream_factory
    from skipgrad.backward.base import evaluation_mode

    only_forward = dataclasses.replace(job.attack, sgm=None, sgm_official=False, backward=None)
    contexts = backward_contexts(models, only_forward)
    with contextlib.ExitStack() as stack:
        stack.enter_context(evaluation_mode(models))
        for context in contexts:
            context.follow_attack(stream_factory(job.attack.seed, ids))
            stack.enter_context(context)
        return predict(models, images)


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


def _source_success(rows: dict[str, dict], wanted: set[str], targeted: bool,
                    column_name: str = "source_pred") -> float:
    chosen = [r for f, r in rows.items() if f in wanted]
    if not chosen or any(not r.get(column_name) for r in chosen):
        return float("nan")
    column = lambda key: torch.tensor([int(r[key]) for r in chosen])  # noqa: E731
    hits = succeeded(column(column_name), column("label"),
                     column("target_label") if targeted else None)
    return float(hits.double().mean())
