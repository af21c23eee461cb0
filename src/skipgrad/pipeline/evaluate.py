"""Transfer success of attack outputs on target models, with Wilson 95% intervals.

Success rate follows Wu et al. (2020): 1 - top-1 accuracy of the target on the adversarial images,
*all* images counted (a smoothed target that abstains counts as not fooled, and as not correct on
the clean image) (for targeted runs: the fraction classified as the target label). We also report
the target's clean accuracy and the success rate restricted to images it classified correctly when
clean, which separates "fooled" from "was wrong anyway".

Under torchrun the prediction batches (fixed by ``--batch-size`` before sharding, so each is
computed as a single process computes it) are shared across ranks and their predictions gathered,
so every rank scores the same full result; only rank 0 writes files.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from skipgrad.pipeline import distributed

from skipgrad.store import outdir

from skipgrad.store import verify
from skipgrad import units
from skipgrad.data.datasets import ImageDataset, Sample, open_dataset
from skipgrad.store.atomic import atomic_write_text
from skipgrad.store.records import record_evaluations
from skipgrad.data.images import read_image
from skipgrad.analysis.success import succeeded
from skipgrad.errors import UserError
from skipgrad.models import WrappedModel, load_model
from skipgrad.models.loading import named_spec
from skipgrad.progress import progress_bar
from skipgrad.pipeline.engine import predict
from skipgrad.store.records import read_manifest, read_run
from skipgrad.pipeline.device import resolve_device
from skipgrad.analysis.stats import wilson_interval

# Images per prediction batch when --batch-size is not given: forward passes only (no gradient
# memory), so larger than the attack's groups; ImageNet models at 224x224 stay well inside a
# 16 GB GPU at 512 and around a gigabyte of activations on a CPU at 128.
DEFAULT_EVAL_BATCH = {"cpu": 128, "cuda": 512}


@dataclass(frozen=True)
class TargetResult:
    """One target model's numbers on one attack folder."""

    target: str
    n: int
    successes: int
    clean_correct: int
    successes_on_correct: int
    # Per-image success (bool, in manifest order): what paired comparisons between attacks need.
    per_image: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # The image ids those outcomes belong to, in the same order.
    ids: tuple[int, ...] = field(default=(), compare=False, repr=False)
    # The perturbation of the n scored files against their clean images, in [0, 1] pixel units
    # (skipgrad.store.verify.perturbation_norms): mean L2 and largest L-inf; None when unknown.
    mean_l2: float | None = None
    max_linf: float | None = None

    @property
    def success_rate(self) -> float:
        return self.successes / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n)

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / self.n if self.n else float("nan")

    @property
    def success_rate_on_correct(self) -> float | None:
        if not self.clean_correct:
            return None
        return self.successes_on_correct / self.clean_correct

    def to_json(self) -> dict:
        """The per-target object of ``evaluate --json`` (docs/design.md, "Output contracts"), with
        both denominators' counts (``clean_correct`` of ``n``, ``successes_on_correct`` of
        ``clean_correct``) as transfer.json rows carry them."""
        lo, hi = self.ci95
        return {"success_rate": self.success_rate, "n": self.n, "ci95": [lo, hi],
                "clean_accuracy": self.clean_accuracy,
                "success_rate_on_correct": self.success_rate_on_correct,
                "clean_correct": self.clean_correct,
                "successes_on_correct": self.successes_on_correct,
                "mean_l2": self.mean_l2, "max_linf": self.max_linf,
                **({"per_image_success": outcome_bits(self.per_image)}
                   if self.per_image is not None else {})}


def outcome_bits(success: torch.Tensor) -> list[int]:
    """Per-image outcomes as JSON stores them: a list of ``0``/``1``, one per image in id order."""
    return [int(s) for s in success.bool().tolist()]


def bits_outcomes(bits: list[int] | str) -> torch.Tensor:
    """The inverse of :func:`outcome_bits`; records written before it held a list (evaluate
    --json files, evaluations.json) hold a string of ``0``/``1`` and read the same."""
    return torch.tensor([str(b) == "1" for b in bits], dtype=torch.bool)


@dataclass
class AttackOutput:
    """A finished (or partly finished) attack folder, paired with its clean images."""

    folder: Path
    run: dict
    data: ImageDataset
    samples: list[Sample]
    files: list[Path]
    targeted: bool
    # SHA-256 of each file as the attack wrote it (manifest.csv); None in manifests made before.
    hashes: list[str | None] = field(default_factory=list)


def open_attack_output(folder: Path, data_override: str | None = None,
                       limit: int | None = None) -> AttackOutput:
    """Read run.json + manifest and find each adversarial image's clean original; ``limit``
    keeps the images of the first ``limit`` inputs (those an ``attack --limit`` run made), so a
    folder that holds more is scored on exactly what was asked for."""
    run = read_run(folder)
    if run is None:
        raise UserError(f"{folder} is not an attack output folder (no run.json); "
                        f"run `skipgrad attack ... --out {folder}` first")
    config = run["config"]
    rows = [r for r in read_manifest(folder) if limit is None or int(r["id"]) < limit]
    if not rows:
        raise UserError(f"{folder} has no finished images yet (manifest.csv is empty or missing)")
    data = _clean_data(config, data_override)
    samples = [_match(data, row, folder) for row in rows]
    return AttackOutput(folder, run, data, samples, [folder / r["file"] for r in rows],
                        bool(config.get("targeted")),
                        [r.get(verify.SHA_COLUMN) or None for r in rows])


def keep_images(output: AttackOutput, ids: Collection[int]) -> AttackOutput:
    """The output restricted to the images whose id is in ``ids`` (in the manifest's id order)."""
    keep = [i for i, sample in enumerate(output.samples) if sample.id in ids]
    return dataclasses.replace(
        output, samples=[output.samples[i] for i in keep], files=[output.files[i] for i in keep],
        hashes=[output.hashes[i] for i in keep] if output.hashes else [])


def first_images(output: AttackOutput, count: int) -> AttackOutput:
    """The first ``count`` images the folder holds, by id (``evaluate --limit``); a folder that
    holds fewer is refused rather than scored on fewer than were asked for."""
    ids = sorted(s.id for s in output.samples)
    if len(ids) < count:
        raise UserError(f"{output.folder} holds {len(ids)} finished images, fewer than --limit "
                        f"{count}")
    return keep_images(output, set(ids[:count]))


def _clean_data(config: dict, override: str | None) -> ImageDataset:
    spec = override or config["data"]
    try:
        return open_dataset(spec, channels=config.get("channels"), class_map=config.get("class_map"))
    except UserError as exc:
        raise UserError(f"cannot open the clean data of this run ({exc}); "
                        f"pass --data to say where it is now") from exc


def _match(data: ImageDataset, row: dict[str, str], folder: Path) -> Sample:
    index = int(row["id"])
    sample = data.samples[index] if 0 <= index < len(data.samples) else None
    if sample is None or f"images/{sample.name}.png" != row["file"]:
        raise UserError(f"{folder}/manifest.csv row {row['id']} ({row['file']}) does not match the "
                        f"clean data {data.spec}; was it changed since the attack?")
    return sample


def _batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def clean_predictions(models: dict[str, WrappedModel], output: AttackOutput, batch_size: int,
                      quiet: bool = True, prefetch: int | None = None) -> dict[str, torch.Tensor]:
    """Each target's predictions on the clean originals of an attack output; every batch is
    read once for all targets (``prefetch`` batches ahead of the models in a background thread)."""
    return _predictions(models, _batches(output.samples, batch_size), output.data.load,
                        "clean", quiet, prefetch)


@dataclass(frozen=True)
class PerturbationSize:
    """The perturbation of a set of saved files against their clean images, in [0, 1] pixel
    units: the mean of the per-image L2 norms and the largest L-inf."""

    mean_l2: float | None
    max_linf: float | None

    @classmethod
    def of(cls, norms: Sequence[tuple[float, float]]) -> PerturbationSize:
        """From per-image ``(l2, linf)`` pairs; unknown (None) when there are none."""
        if not norms:
            return cls(None, None)
        return cls(sum(n[0] for n in norms) / len(norms), max(n[1] for n in norms))


def adversarial_predictions(models: dict[str, WrappedModel], output: AttackOutput,
                            batch_size: int, quiet: bool = True, prefetch: int | None = None,
                            check: bool = True) -> dict[str, torch.Tensor]:
    """Each target's predictions on the saved adversarial PNGs (see :func:`adversarial_pass`)."""
    return adversarial_pass(models, output, batch_size, quiet, prefetch, check)[0]


def adversarial_pass(models: dict[str, WrappedModel], output: AttackOutput, batch_size: int,
                     quiet: bool = True, prefetch: int | None = None, check: bool = True
                     ) -> tuple[dict[str, torch.Tensor], PerturbationSize]:
    """Each target's predictions on the saved adversarial PNGs, each PNG read and decoded once for
    all targets, and the size of their perturbations, measured on the files against the clean
    images as they are read (so folders made before the manifest's norm columns get it too).
    With ``check`` each file is verified as it is read (:mod:`skipgrad.store.verify`): its bytes
    against the manifest's SHA-256, its levels against the run's eps bound around the clean
    image; any failure raises one :class:`~skipgrad.store.verify.VerificationError` (on every
    rank of a sharded run) once the pass is done."""
    if check:
        _require_hashes(output)
    mismatches: list[verify.Mismatch] = []  # appended from the loading thread
    norms: list[tuple[int, float, float]] = []  # likewise: (file index, l2, linf)

    def load(batch: Sequence[int]) -> torch.Tensor:
        contents = [output.files[i].read_bytes() for i in batch]
        adv = torch.stack([read_image(output.files[i], output.data.channels, data)
                           for i, data in zip(batch, contents)])
        clean = verify.levels(output.data.load([output.samples[i] for i in batch]))
        found = [verify.levels(a) for a in adv]
        if all(a.shape == c.shape for a, c in zip(found, clean)):  # --no-verify may hold others
            norms.extend((i, *verify.perturbation_norms(a, c))
                         for i, a, c in zip(batch, found, clean))
        if check:
            mismatches.extend(_mismatches(output, batch, contents, found, clean))
        return adv

    indices = list(range(len(output.files)))
    preds = _predictions(models, _batches(indices, batch_size), load, "adversarial", quiet,
                         prefetch)
    found = [m for part in distributed.gather(mismatches) for m in part]
    if found:
        raise verify.mismatch_error(output.folder, sorted(found, key=lambda m: m.file))
    # In file order whatever the ranks: the mean sums as a single process sums it.
    measured = sorted(n for part in distributed.gather(norms) for n in part)
    complete = len(measured) == len(indices)
    return preds, PerturbationSize.of([n[1:] for n in measured] if complete else [])


def _require_hashes(output: AttackOutput) -> None:
    missing = [_name(output, i) for i, sha in enumerate(output.hashes) if not sha]
    if missing:
        raise verify.unverifiable(output.folder, missing)


def _mismatches(output: AttackOutput, batch: Sequence[int], contents: Sequence[bytes],
                adv: Sequence[np.ndarray], clean: np.ndarray) -> list[verify.Mismatch]:
    """The files of ``batch`` whose bytes differ from the manifest's hash or whose levels
    (``adv``) leave the run's eps ball around their clean images' (``clean``) (one entry per
    file, every reason)."""
    config = output.run.get("config", {})
    norm = config.get("norm", "linf")  # run.json: command-line units; the bound: [0, 1] units
    eps = units.to_library(float(config["eps"]), norm)
    found = []
    for k, (i, data) in enumerate(zip(batch, contents)):
        reasons = [] if verify.sha256_hex(data) == output.hashes[i] else ["SHA-256 differs"]
        outside = verify.bound_violation(adv[k], clean[k], eps, norm)
        reasons += [outside] if outside else []
        if reasons:
            found.append(verify.Mismatch(_name(output, i), "; ".join(reasons)))
    return found


def _name(output: AttackOutput, index: int) -> str:
    return str(output.files[index].relative_to(output.folder))


def _predictions(models: dict[str, WrappedModel], batches: Sequence[Sequence], load: Callable,
                 desc: str, quiet: bool, prefetch: int | None) -> dict[str, torch.Tensor]:
    """Top-1 predictions of every model on ``load(batch)`` for each batch, shared across ranks:
    a batch is loaded (decoded) once and every model scores it before the next one. SIGINT or
    SIGTERM stops after the current (batch, target) prediction (:func:`outdir.check_stop`);
    nothing is written for a pass that did not finish."""
    if not models:
        return {}
    device = next(next(iter(models.values())).parameters()).device
    bar = _bar(sum(len(b) for b in batches) * len(models), f"{desc} x {len(models)} target(s)",
               quiet)

    def run(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        preds = []
        for model in models.values():  # a smoothed target's batch can take many seconds
            outdir.check_stop()
            preds.append(predict([model], images))
        bar.update(len(images) * len(models) * distributed.world().size)
        return torch.stack(preds)

    try:
        with outdir.stop_after_batch():
            preds = torch.cat(distributed.map_units(batches, run, load=load, prefetch=prefetch,
                                                    device=device), dim=1)
    finally:
        bar.close()
    return dict(zip(models, preds))


def _bar(total: int, desc: str, quiet: bool):
    # One bar for a sharded run: rank 0's, counting for all ranks (their shares are equal).
    return progress_bar(total, desc, quiet or not distributed.world().is_main)


def score(target: str, output: AttackOutput, clean: torch.Tensor, adv: torch.Tensor) -> TargetResult:
    """Count successes from predictions (untargeted: label left; targeted: target reached)."""
    labels = torch.tensor([s.label for s in output.samples])
    correct = clean == labels
    targets = torch.tensor([s.target for s in output.samples]) if output.targeted else None
    success = succeeded(adv, labels, targets)
    return TargetResult(target, len(labels), int(success.sum()), int(correct.sum()),
                        int((success & correct).sum()), per_image=success,
                        ids=tuple(s.id for s in output.samples))


def evaluate_folder(folder: Path, targets: Sequence[str], *,
                    weights: Sequence[str | None] | None = None, device: str = "auto",
                    batch_size: int | None = None, quiet: bool = False,
                    data: str | None = None, prefetch: int | None = None,
                    check: bool = True, limit: int | None = None) -> dict[str, TargetResult]:
    """Evaluate every target spec on one attack folder (``data`` overrides where the clean images
    are, should they have moved since the attack); ``check=False`` skips the verification of the
    files (``evaluate --no-verify``); ``limit`` scores only the first ``limit`` images the folder
    holds, by id (:func:`first_images`)."""
    output = open_attack_output(folder, data)
    if limit is not None:
        output = first_images(output, limit)
    if check:
        _require_hashes(output)  # before any model is loaded
    models = load_targets(targets, weights, distributed.device_for(resolve_device(device)))
    return evaluate_output(output, models, batch_size=batch_size, quiet=quiet, prefetch=prefetch,
                           check=check)


def load_targets(targets: Sequence[str], weights: Sequence[str | None] | None,
                 device: torch.device) -> dict[str, WrappedModel]:
    """Target models by spec, with optional weight files paired in order."""
    if not targets:
        raise UserError("at least one --target is needed")
    weights = list(weights or [None] * len(targets))
    if len(weights) != len(targets):
        raise UserError(f"{len(weights)} --weights for {len(targets)} --target; give one per target")
    # Keyed by the spec as outputs name it: the weights a bare hub spec resolves to, and the
    # defaults of a defense (smoothing's n, alpha, seed), appear in every table and JSON.
    return {named_spec(spec, w): load_model(spec, weights=w, device=device)
            for spec, w in zip(targets, weights)}


def evaluate_output(output: AttackOutput, models: dict[str, WrappedModel], *,
                    batch_size: int | None = None, quiet: bool = False,
                    clean_cache: dict | None = None,
                    prefetch: int | None = None, check: bool = True) -> dict[str, TargetResult]:
    """Score each target on an opened attack output; ``clean_cache`` reuses clean predictions
    across folders that share their clean images (as in a transfer matrix). ``batch_size``
    defaults to the device's (``DEFAULT_EVAL_BATCH``); ``prefetch`` to a depth decided from the
    first batch's load and prediction times. The adversarial files are verified as they are read
    unless ``check`` is False (see :func:`adversarial_predictions`); they are read first, so a bad
    folder fails early."""
    device = next(next(iter(models.values())).parameters()).device if models else None
    batch_size = batch_size or DEFAULT_EVAL_BATCH["cuda" if getattr(device, "type", "") == "cuda"
                                                  else "cpu"]
    cache = clean_cache if clean_cache is not None else {}
    keys = {spec: (spec, model.config.weights_sha256, output.data.spec,
                   tuple(s.id for s in output.samples)) for spec, model in models.items()}
    adversarial, size = adversarial_pass(models, output, batch_size, quiet, prefetch, check)
    uncached = {spec: model for spec, model in models.items() if keys[spec] not in cache}
    for spec, preds in clean_predictions(uncached, output, batch_size, quiet, prefetch).items():
        cache[keys[spec]] = preds
    return {spec: dataclasses.replace(score(spec, output, cache[keys[spec]], adversarial[spec]),
                                      mean_l2=size.mean_l2, max_linf=size.max_linf)
            for spec in models}


def results_json(results: dict[str, TargetResult], folder: Path | None = None) -> dict:
    """The ``evaluate --json`` document: ``targets`` as docs/design.md, "Output contracts" fixes it (each with its
    ``per_image_success`` bits), plus ``image_ids`` (the order of those bits) and, given the
    attack ``folder``, its path and attack ``settings`` (run.json's config)."""
    document: dict = {"targets": {spec: r.to_json() for spec, r in results.items()}}
    first = next(iter(results.values()), None)
    if first is not None and first.ids:
        document["image_ids"] = list(first.ids)
    if folder is not None:
        document["folder"] = str(folder)
        document["settings"] = (read_run(folder) or {}).get("config", {})
    return document


def record_evaluation(folder: Path, results: dict[str, TargetResult], *,
                      verified: bool = True) -> None:
    """Keep each target's latest result, with its per-image outcomes, in the attack folder's
    evaluations record (:func:`skipgrad.store.records.record_evaluations`), marked ``verified``
    False when the files were not checked against the manifest (``--no-verify``)."""
    if distributed.world().is_main:
        record_evaluations(folder, {spec: {**r.to_json(), "image_ids": list(r.ids)}
                                    for spec, r in results.items()}, verified=verified)


def write_results_json(results: dict[str, TargetResult], path: Path,
                       folder: Path | None = None) -> None:
    """Write the ``--json`` file atomically (rank 0 only under torchrun: every rank holds the
    same gathered results)."""
    if not distributed.world().is_main:
        return
    atomic_write_text(path, json.dumps(results_json(results, folder), indent=2) + "\n")


def format_table(results: dict[str, TargetResult], title: str = "") -> str:
    """A fixed-width terminal table (percentages)."""
    header = ("target", "n", "success", "95% CI", "mean L2", "clean acc",
              "success | clean correct")
    lines = [[spec, str(r.n), _pct(r.success_rate), f"[{_pct(r.ci95[0])}, {_pct(r.ci95[1])}]",
              units.l2_text(r.mean_l2, "-"), _pct(r.clean_accuracy),
              _pct(r.success_rate_on_correct)]
             for spec, r in results.items()]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt: Callable[[Sequence[str]], str] = lambda row: "  ".join(  # noqa: E731
        cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    body = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)]
    return "\n".join(([title] if title else []) + body)


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%"
