"""The whole transfer experiment: sources x attacks x SGM gammas (x backward-pass methods) -> attack
folders -> targets -> matrix.

Each (source, attack, gamma, backward) cell is an ordinary ``attack`` output folder under ``OUT/attacks/``, so a
re-run reuses finished folders (and finishes interrupted ones); the matrix is written by
:func:`skipgrad.pipeline.report.write_transfer_report`. Plans come from flags or a TOML file, e.g.::

    data = "fmnist:test"
    limit = 500
    sources = ["zoo:fmnist-resnet20", {spec = "zoo:fmnist-resnet56", weights = "r56.safetensors"}]
    attacks = ["ifgsm", "mi"]
    sgm = [0.2, 0.5]          # gammas; the no-SGM baseline is included unless baseline = false
    # or per source (the paper: 0.2 for ResNets, 0.5 for DenseNets); a source left out of the
    # table runs without SGM:  sgm = {"zoo:fmnist-resnet20" = 0.2, "zoo:fmnist-densenet" = [0.5]}
    backward = "linbp"        # backward-pass method(s) for every source, or a list with one per
                              # source ("none" for a source without); each cell then runs with
                              # and without it (without: the baseline, unless baseline = false)
    targets = ["zoo:fmnist-vgg", "zoo:fmnist-densenet"]
    eps = 16                  # pixel levels out of 255, like step_size

Before the first image, :func:`preflight` checks every source (spec, weights, SGM- and
backward-capability), every target (spec, weights), the data and the output folder, and reports
every problem in one error. A source without residual or dense blocks (a CNN, a VGG of a preset)
is not an error under SGM: it runs the baseline only, and the matrix title says so.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from skipgrad.pipeline import distributed

from skipgrad.store import outdir
from skipgrad.backward.registry import parse_backward, parse_forward
from skipgrad.gamma import check_gamma
from skipgrad.errors import UserError
from skipgrad.models.loading import named_spec
from skipgrad.store.records import calibration_warning, read_manifest, read_run
from skipgrad.pipeline.evaluate import (evaluate_output, load_targets, open_attack_output,
                               record_evaluation)
from skipgrad.pipeline.html_report import write_html_report
from skipgrad.pipeline.report import TransferRow, write_transfer_report
from skipgrad.pipeline.job import AttackJob, RunOptions
from skipgrad.pipeline.device import resolve_device
from skipgrad.pipeline.engine import run_attack_job
from skipgrad.units import l2_text


@dataclass(frozen=True)
class ModelRef:
    """A model spec plus an optional local weights file."""

    spec: str
    weights: str | None = None


Cell = tuple[ModelRef, str, "float | None", "str | None"]


@dataclass(frozen=True)
class TransferPlan:
    """Sources x attacks x gammas x targets, and the attack settings shared by every cell.

    ``backward`` gives each source's backward-pass methods (a ``METHOD[...]`` label, one per
    source, None for a source without; empty: none at all). A source with a method runs every
    (attack, gamma) cell with it, and also without it unless ``backward_baseline`` is off.
    """

    sources: tuple[ModelRef, ...]
    attacks: tuple[str, ...]
    gammas: tuple[float | None, ...]
    targets: tuple[ModelRef, ...]
    template: AttackJob
    title: str = "Transfer success rate"
    backward: tuple[str | None, ...] = ()
    backward_baseline: bool = True
    # Per source: its own gamma column (None: the plan's ``gammas``), e.g. from a plan's
    # ``sgm = {SPEC = gamma}`` table or for a source without blocks (baseline only).
    source_gammas: tuple[tuple[float | None, ...] | None, ...] = ()
    # Per source: the forward methods (``--forward``, a label or None) that modify it in every
    # cell of that source (empty: none at all); the source is then the modified one throughout.
    forward: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        for kind in ("backward", "forward"):
            given = getattr(self, kind)
            if given and len(given) != len(self.sources):
                raise UserError(f"{len(given)} {kind} entries for {len(self.sources)} sources; "
                                f"give one for all sources or one per source, in order")

    def forward_of(self, source: ModelRef) -> str | None:
        """The forward methods of ``source`` (its own in every cell), or None."""
        return self.forward[self.sources.index(source)] if self.forward else None

    def variants(self, index: int) -> tuple[str | None, ...]:
        """The backward column of source ``index``: None (without), then its method if any."""
        method = self.backward[index] if self.backward else None
        if method is None:
            return (None,)
        return (None, method) if self.backward_baseline else (method,)

    def gammas_of(self, index: int) -> tuple[float | None, ...]:
        """The gamma column of source ``index``."""
        own = self.source_gammas[index] if self.source_gammas else None
        return self.gammas if own is None else own

    def cells(self) -> list[Cell]:
        """Every (source, attack, gamma, backward) to run, in table order."""
        return [(s, a, g, b) for i, s in enumerate(self.sources) for a in self.attacks
                for b in self.variants(i) for g in self.gammas_of(i)]


@dataclass
class TransferResult:
    """Rows of the matrix and where its files went."""

    rows: list[TransferRow]
    files: dict[str, Path] = field(default_factory=dict)
    # (source spec, attack, gamma, backward label or None, target spec) -> per-image success, for
    # paired statistics.
    outcomes: dict[tuple, object] = field(default_factory=dict)
    # The attack folders in table order, and each target's weights hash (for report.html).
    folders: list[Path] = field(default_factory=list)
    target_weights: dict[str, str | None] = field(default_factory=dict)


def gammas_with_baseline(gammas: list[float | None], baseline: bool) -> tuple[float | None, ...]:
    """The gamma column: ``None`` (no SGM) first unless ``baseline`` is off, then each gamma once."""
    values: list[float | None] = [None] if baseline else []
    for gamma in gammas:
        if gamma is not None:
            check_gamma(gamma)
        if gamma not in values:
            values.append(gamma)
    if not values:
        raise UserError("nothing to run: no SGM gamma given and the baseline is switched off")
    return tuple(values)


def cell_folder(out: Path, source: ModelRef, attack: str, gamma: float | None,
                backward: str | None = None, forward: str | None = None) -> Path:
    """Readable, filesystem-safe folder name of one matrix row; a backward-pass method adds a
    last part (``__linbp-branch_scale=0.5+bpa``) and a forward method one more
    (``__forward-iaa-beta=32``), so folders without them keep their names."""
    label = source.spec if source.weights is None else f"{source.spec}-{Path(source.weights).stem}"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
    sgm = "nosgm" if gamma is None else f"sgm{gamma:g}"
    name = f"{safe}__{attack.replace('+', '-')}__{sgm}"
    if backward is not None:
        name += "__" + re.sub(r"[^A-Za-z0-9._=+-]+", "-", backward).strip("-")
    if forward is not None:
        name += "__forward-" + re.sub(r"[^A-Za-z0-9._=+-]+", "-", forward).strip("-")
    return out / "attacks" / name


def cell_job(template: AttackJob, source: ModelRef, attack: str, gamma: float | None,
             backward: str | None = None, forward: str | None = None) -> AttackJob:
    """The attack job of one matrix row: the plan's shared settings with this source, attack name,
    SGM gamma, backward-pass method(s) and forward method(s)."""
    spec = dataclasses.replace(template.attack.with_method(attack), sgm=gamma, backward=backward,
                               forward=forward)
    return dataclasses.replace(template, sources=(source.spec,), attack=spec,
                               weights=(source.weights,))


def run_transfer(plan: TransferPlan, out: Path, opts: RunOptions = RunOptions(),
                 log: Callable[[str], None] = print) -> TransferResult:
    """Run (or resume) every attack folder, evaluate every target, write the matrix files."""
    if not plan.sources or not plan.targets or not plan.attacks:
        raise UserError("transfer needs at least one source, one attack and one target")
    outdir.refuse_data_overlap(out, plan.template.data)  # before the first attack folder
    if not distributed.world().is_main:  # under torchrun rank 0 speaks and writes the matrix
        log = lambda _msg: None  # noqa: E731
    plan, targets = preflight(plan, out, opts, log)
    # One stop region over every folder and the evaluation: SIGINT/SIGTERM stop after the current
    # attack group or (batch, target) prediction, also when the signal lands between two folders.
    with outdir.stop_after_batch():
        folders = _attack_cells(plan, out, opts, log)
        outdir.check_stop()
        rows, outcomes = evaluate_cells(plan, folders, opts, log, targets)
    title = f"{plan.title} ({setting_text(plan.template, rows[0].n if rows else 0)})"
    result = TransferResult(rows, {}, outcomes, [f[-1] for f in folders],
                            {spec: m.config.weights_sha256 for spec, m in targets.items()})
    result.files = distributed.on_main(lambda: {**write_transfer_report(rows, out, title),
                                                **write_paired_effects(out, outcomes),
                                                "html": write_transfer_html(out, result, title)})
    return result


def write_transfer_html(out: Path, result: TransferResult, title: str,
                        figures: list[tuple[Path, str]] | None = None, **page) -> Path:
    """``report.html`` of a transfer folder (:mod:`skipgrad.pipeline.html_report`): by default the
    heatmap; ``figures`` and ``page`` (intro, summary, source) let demo and sweep add theirs."""
    return write_html_report(out, title=title, rows=result.rows, outcomes=result.outcomes,
                             folders=result.folders, target_weights=result.target_weights,
                             figures=[heatmap_figure(out)] if figures is None else figures,
                             **page)


def heatmap_figure(out: Path) -> tuple[Path, str]:
    """The transfer heatmap of ``out`` and its caption, for report.html."""
    return (out / "transfer_heatmap.png",
            "Transfer success (%): above, all images; below, only the images each target "
            "classified correctly when clean (fooled/correct in each cell).")


def _attack_cells(plan: TransferPlan, out: Path, opts: RunOptions,
                  log: Callable[[str], None]) -> list[tuple]:
    """Run (or resume) the attack folder of every cell; ``(source, attack, gamma, backward,
    folder)`` each, in table order."""
    folders = []
    for i, (source, attack, gamma, backward) in enumerate(plan.cells(), start=1):
        outdir.check_stop()
        forward = plan.forward_of(source)
        job = cell_job(plan.template, source, attack, gamma, backward, forward)
        folder = cell_folder(out, source, attack, gamma, backward, forward)
        extra = "" if backward is None else f" backward={backward}"
        extra += "" if forward is None else f" forward={forward}"
        sgm = "no SGM" if gamma is None else f"SGM {gamma:g}"
        log(f"[{i}/{len(plan.cells())}] {source.spec} {attack}, {sgm}{extra} -> {folder}")
        summary = run_attack_job(job, folder, opts, log=lambda _msg: None)
        modified = ("" if summary.modified_source_success is None else
                    f" (modified source {100 * summary.modified_source_success:.1f}%)")
        size = "" if summary.mean_l2 is None else f", mean L2 {l2_text(summary.mean_l2)}"
        log(f"    {summary.skipped} reused, {summary.attacked} attacked, "
            f"source success {100 * summary.source_success:.1f}%{modified}{size}")
        folders.append((source, attack, gamma, backward, folder))
    return folders


def write_paired_effects(out: Path, outcomes: dict[tuple, object]) -> dict[str, Path]:
    """``paired_effects.md``/``.json``: every SGM cell against the same attack without SGM, and
    every backward-pass method cell against the cell without it, on the same images: Δ, 95% CI,
    McNemar p and the Benjamini-Hochberg q over the transfer comparisons (the demo's helpers).
    Nothing is written when the plan has no such pair (e.g. no baseline)."""
    import json

    from skipgrad.analysis.effects import backward_effects, sgm_effects, transfer_q_values
    from skipgrad.pipeline.report import effects_markdown
    from skipgrad.store.atomic import atomic_write_text

    families = [f for f in (sgm_effects(outcomes), backward_effects(outcomes)) if f]
    if not families:
        return {}
    paths = {"effects_markdown": out / "paired_effects.md",
             "effects_json": out / "paired_effects.json"}
    parts, records = ["# Paired effects (same images)\n"], []
    for effects in families:
        q_values = transfer_q_values(effects)
        parts.append(effects_markdown(effects, q_values))
        records += [{**e.to_json(), "bh_q": q_values.get(id(e))} for e in effects]
    parts.append("Δ is success with minus without, in percentage points; 95% CI (Newcombe): "
                 "Newcombe's hybrid score interval for paired proportions (1998, method 10); "
                 "McNemar's exact test on the images fooled by one variant only; BH q: "
                 "Benjamini-Hochberg over the "
                 "transfer comparisons of each table (white-box cells excluded).\n")
    atomic_write_text(paths["effects_markdown"], "\n".join(parts))
    atomic_write_text(paths["effects_json"], json.dumps({"effects": records}, indent=2) + "\n")
    return paths


def setting_text(template: AttackJob, n: int) -> str:
    """What a matrix title states besides its name: images and the perturbation size, in the
    command line's unit, e.g. ``n = 1000 images, L-inf eps 16/255``."""
    from skipgrad.pipeline.settings import attack_settings

    eps = attack_settings(template.attack)["eps"]
    size = (f"L-inf eps {eps:g}/255" if template.attack.norm == "linf"
            else f"L2 eps {eps:g}")
    return f"n = {n} images, {size}"


def preflight(plan: TransferPlan, out: Path, opts: RunOptions,
              log: Callable[[str], None] = print) -> tuple[TransferPlan, dict]:
    """Check everything a transfer needs before the first image and report every problem in one
    error: each source (known spec, weights present, backward methods that apply), each target
    (known spec, weights present), the data and the output folder. Returns the plan, with
    sources that have no residual or dense block reduced to the baseline (their title notes it),
    and the loaded target models."""
    device = distributed.device_for(resolve_device(opts.device))
    problems: list[str] = []
    plan, no_blocks = _check_sources(plan, device, problems)
    targets = _load_checked([t.spec for t in plan.targets], [t.weights for t in plan.targets],
                            device, problems)
    _check_data_and_out(plan.template, out, opts, problems)
    if problems:
        raise UserError(f"transfer cannot start ({len(problems)} problem"
                        f"{'s' if len(problems) > 1 else ''}): " + "; ".join(problems))
    if no_blocks:
        names = ", ".join(no_blocks)
        log(f"SGM does not apply to {names} (no residual or dense blocks): baseline only")
        plan = dataclasses.replace(plan, title=f"{plan.title} (SGM rows: residual sources only; "
                                               f"{names} baseline only)")
    return plan, targets


def _check_sources(plan: TransferPlan, device, problems: list[str]
                   ) -> tuple[TransferPlan, list[str]]:
    """Load each source once: weights present, backward methods apply; a source without blocks
    under SGM gets the baseline column only."""
    from skipgrad.pipeline.job import has_methods, load_sources, method_records, sgm_problem

    own, no_blocks = [], []
    for index, source in enumerate(plan.sources):
        job = cell_job(plan.template, source, plan.template.attack.name, None,
                       plan.backward[index] if plan.backward else None,
                       plan.forward[index] if plan.forward else None)
        own.append(plan.source_gammas[index] if plan.source_gammas else None)
        try:
            models = load_sources(job, device)
            if has_methods(job):
                method_records(job, models)
        except UserError as exc:
            problems.append(f"source {source.spec}: {exc}")
            continue
        column = plan.gammas_of(index)
        problem = sgm_problem(models[0], official=job.attack.sgm_official)
        if any(g is not None for g in column) and problem is not None:
            if None not in column:
                problems.append(f"source {source.spec}: SGM cannot change it ({problem}) and the "
                                f"baseline is off; drop it or keep the baseline")
                continue
            own[index] = (None,)
            no_blocks.append(source.spec)
    return dataclasses.replace(plan, source_gammas=tuple(own)), no_blocks


def _load_checked(specs: list[str], weights: list[str | None], device,
                  problems: list[str]) -> dict:
    """Target models by spec; a target that cannot load becomes a problem, not an exit."""
    models = {}
    for spec, w in zip(specs, weights):
        try:
            models.update(load_targets([spec], [w], device))
        except UserError as exc:
            problems.append(f"target {spec}: {exc}")
    return models


def _check_data_and_out(template: AttackJob, out: Path, opts: RunOptions,
                        problems: list[str]) -> None:
    import os

    from skipgrad.data.datasets import open_dataset

    try:
        open_dataset(template.data, limit=opts.limit, channels=template.channels,
                     class_map=template.class_map)
    except UserError as exc:
        problems.append(f"data: {exc}")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} is a file, not a folder")
    elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"--out {out}: {existing} is not writable")


def evaluate_cells(plan: TransferPlan, folders: list, opts: RunOptions,
                   log: Callable[[str], None], models: dict | None = None,
                   ) -> tuple[list[TransferRow], dict[tuple, object]]:
    """Score every target on every folder; targets load once, clean predictions are shared.
    ``folders`` holds ``(source, attack, gamma, backward, folder)``. Returns the matrix rows and
    each cell's per-image success vector."""
    if models is None:
        models = load_targets([t.spec for t in plan.targets], [t.weights for t in plan.targets],
                              distributed.device_for(resolve_device(opts.device)))
    cache: dict = {}
    rows, outcomes = [], {}
    for source, attack, gamma, backward, folder in folders:
        output = open_attack_output(folder, limit=opts.limit)  # a reused folder may hold more
        results = evaluate_output(output, models, batch_size=opts.batch_size, quiet=opts.quiet,
                                  prefetch=opts.prefetch, clean_cache=cache)
        names = tuple(parse_backward(backward).names) if backward is not None else ()
        forward = plan.forward_of(source)
        forward_names = tuple(parse_forward(forward).names) if forward is not None else ()
        named = named_spec(source.spec, source.weights)  # tv:resnet50 -> its weights' tag
        rows += [TransferRow(named, attack, gamma, spec, r.success_rate, r.n, r.ci95, names,
                             r.clean_correct, r.successes_on_correct, forward=forward_names,
                             mean_l2=r.mean_l2)
                 for spec, r in results.items()]
        outcomes.update({(named, attack, gamma, backward, spec): r.per_image
                         for spec, r in results.items()})
        distributed.on_main(lambda: record_evaluation(folder, results))
        warning = calibration_warning(folder, list(results))
        if warning and distributed.world().is_main:
            print(warning, file=sys.stderr)
    log(f"evaluated {len(folders)} attack folders on {len(models)} targets")
    return rows, outcomes


def score_finished(plan: TransferPlan, out: Path, opts: RunOptions = RunOptions(),
                   log: Callable[[str], None] = print) -> tuple[list[TransferRow], dict]:
    """Score the plan's finished attack folders under ``out`` on its targets, attacking nothing
    (e.g. on other targets than the run's, or for a newer table). Returns what
    :func:`evaluate_cells` returns; a cell without a finished folder is a ``UserError``."""
    folders = []
    for source, attack, gamma, backward in plan.cells():
        folder = cell_folder(out, source, attack, gamma, backward, plan.forward_of(source))
        if read_run(folder) is None or not read_manifest(folder):
            raise UserError(f"{folder} is not a finished attack folder: run the plan first")
        folders.append((source, attack, gamma, backward, folder))
    return evaluate_cells(plan, folders, opts, log)


def model_refs_of(specs: list[str] | None, weights: list[str] | None,
                  what: str) -> tuple[ModelRef, ...]:
    """``--SOURCE``/``--SOURCE-weights``-style flags (``what`` names them) as ModelRefs, paired
    in order."""
    if not specs:
        if weights:
            raise UserError(f"--{what}-weights given without --{what}")
        return ()
    if weights and len(weights) != len(specs):
        raise UserError(f"{len(weights)} --{what}-weights for {len(specs)} --{what}; "
                        f"give one per --{what}, in order")
    return tuple(ModelRef(s, w) for s, w in zip(specs, weights or [None] * len(specs)))
