"""The command handlers: each translates parsed arguments into one library call and prints what
it returns."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from skipgrad.errors import UserError








def cmd_show(args: argparse.Namespace) -> int:
    """``skipgrad show DIR``."""
    from skipgrad.pipeline.show import describe_folder

    print(describe_folder(args.folder))
    return 0


def _log(quiet: bool):
    return (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))






def cmd_attack(args: argparse.Namespace) -> int:
    """``skipgrad attack``."""
    from skipgrad.pipeline.autogamma import format_calibration, with_auto_gamma
    from skipgrad.pipeline.engine import run_attack_job
    from skipgrad.pipeline.job import run_options
    from skipgrad.pipeline.plans import attack_job
    from skipgrad.units import l2_text

    flags = vars(args)
    job, auto = attack_job(flags)
    record = None
    if auto:  # gamma is resolved before the engine sees the job: run.json holds a plain float
        job, record = with_auto_gamma(job, args.out, flags, _log(args.quiet))
        if not args.quiet:
            print(format_calibration(record), file=sys.stderr)
    # The calibration record is written with run.json's claim, inside the folder's lock.
    notes = {"sgm_auto": record} if record is not None else None
    summary = run_attack_job(job, args.out, run_options(flags), log=_log(args.quiet), notes=notes)
    if record is not None:
        print(f"--sgm auto chose gamma {job.attack.sgm:g} "
              f"(calibration curve in {args.out}/run.json)")
    compiled = (f", after {summary.compile_seconds:.1f} s compiling"
                if summary.compile_seconds else "")
    white_box = f"white-box success on the source: {100 * summary.source_success:.1f}%"
    if summary.modified_source_success is not None:  # --forward changes the source's predictions
        from skipgrad.backward.registry import describe

        method = describe(job.attack.forward_per_source(len(job.sources)))
        white_box = (f"white-box success on the unmodified source: "
                     f"{100 * summary.source_success:.1f}%, on the source modified by --forward "
                     f"{method}: {100 * summary.modified_source_success:.1f}%")
    print(f"{summary.total} images from {', '.join(summary.sources)} in {args.out} "
          f"({summary.skipped} already done, "
          f"{summary.attacked} attacked in {summary.seconds:.1f} s, {summary.cpu_seconds:.1f} s "
          f"CPU{compiled}); {white_box}"
          + ("" if summary.mean_l2 is None else f"; mean L2 {l2_text(summary.mean_l2)}"))
    return 0






def cmd_evaluate(args: argparse.Namespace) -> int:
    """``skipgrad evaluate``."""
    from skipgrad.pipeline.evaluate import (evaluate_folder, format_table, record_evaluation,
                                   write_results_json)

    results = evaluate_folder(args.folder, args.target, weights=args.weights, device=args.device,
                              batch_size=args.batch_size, quiet=args.quiet, data=args.data,
                              prefetch=args.prefetch, check=not args.no_verify,
                              limit=args.limit)
    title = f"transfer success of {args.folder}" + (" (files NOT verified: --no-verify)"
                                                      if args.no_verify else "")
    print(format_table(results, title=title))
    _warn_calibration([args.folder], list(results))  # the targets as resolved
    record_evaluation(args.folder, results, verified=not args.no_verify)
    if args.json:
        write_results_json(results, args.json, args.folder)
        print(f"wrote {args.json}")
    return 0


def _warn_calibration(folders: Sequence[Path], targets: Sequence[str]) -> None:
    """Say when a target chose a folder's ``--sgm auto`` gamma (its number is optimistic)."""
    from skipgrad.store.records import calibration_warning

    for folder in folders:
        warning = calibration_warning(folder, targets)
        if warning:
            print(warning, file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> int:
    """``skipgrad compare DIR_A DIR_B --target ...``: paired effect of B over A on each target."""
    from skipgrad.pipeline.compare import compare_folders, comparison_json, comparison_markdown
    from skipgrad.store.atomic import atomic_write_text

    comparison = compare_folders(args.folder_a, args.folder_b, args.target, weights=args.weights,
                                 device=args.device, batch_size=args.batch_size, quiet=args.quiet,
                                 prefetch=args.prefetch, limit=args.limit)
    print(comparison_markdown(comparison))
    _warn_calibration([args.folder_a, args.folder_b], list(comparison.comparisons))
    if args.json:
        atomic_write_text(args.json, json.dumps(comparison_json(comparison), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    """``skipgrad transfer``: flags override the TOML config, which overrides defaults."""
    from skipgrad.pipeline.plans import load_plan_file, transfer_plan
    from skipgrad.pipeline.report import markdown_table
    from skipgrad.pipeline.transfer import run_transfer

    config = load_plan_file(args.config) if args.config else {}
    plan, out, opts = transfer_plan(vars(args), config)
    result = run_transfer(plan, out, opts, log=_log(args.quiet))

    print(markdown_table(result.rows, plan.title))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``skipgrad sweep``: one attack over a list of gammas, transfer success per target."""
    from skipgrad.pipeline.settings import refuse_unused_settings, settings_of
    from skipgrad.pipeline.job import run_options
    from skipgrad.pipeline.plans import (per_source_backward, per_source_forward,
                                         template_from)
    from skipgrad.pipeline.sweep import format_best, run_sweep
    from skipgrad.pipeline.transfer import model_refs_of

    flags = vars(args)
    refuse_unused_settings(settings_of(flags), [args.attack], sgm=True)  # every gamma is SGM
    source = model_refs_of([args.source], [args.source_weights] if args.source_weights else None,
                           "source")[0]
    targets = model_refs_of(args.target, args.target_weights, "target")
    result = run_sweep(source, args.attack, args.gammas, targets,
                       template_from(settings_of(flags), args.data), args.out, run_options(flags),
                       log=_log(args.quiet), backward=per_source_backward(args.backward, 1),
                       forward=per_source_forward(args.forward, 1))
    print(format_best(result))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``skipgrad inspect SPEC``: what every backward-pass method would change in the model, then
    SGM's blocks and gradient split on a few images of the data."""
    from skipgrad.pipeline.inspect import inspect_spec
    from skipgrad.store.atomic import atomic_write_text

    found = inspect_spec(args.spec, weights=args.weights, backward=args.backward, data=args.data,
                         limit=args.limit, channels=args.channels, gamma=args.gamma,
                         device=args.device, forward=args.forward)
    if found.random_weights_reason:
        print(f"skipgrad: note: {found.random_weights_reason}; analysing the architecture with "
              f"random weights (gradient shares then describe an untrained network)",
              file=sys.stderr)
    print(found.text)
    if args.json:
        atomic_write_text(args.json, json.dumps(found.record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``skipgrad models``: specs with input size, mean/std, parameter count, weight status, and
    the target defenses; ``--json`` prints ``{"models": [...], "defenses": [...]}``."""
    from skipgrad.models.defenses import defense_help
    from skipgrad.models.listing import defenses_table, model_rows, rows_table

    rows = model_rows(args.preset, args.spec)
    if args.json:
        print(json.dumps({"models": rows, "defenses": defense_help()}, indent=2))
    else:
        print(f"{rows_table(rows)}\n\n{defenses_table()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``skipgrad demo``: the embedded Fashion-MNIST benchmark."""
    from skipgrad.pipeline.demo import run_demo
    from skipgrad.pipeline.plans import per_source_backward, per_source_forward

    chosen = {k: v for k, v in (("source", args.source), ("gamma", args.sgm),
                                ("backward", per_source_backward(args.backward, 1)),
                                ("forward", per_source_forward(args.forward, 1)))
              if v is not None}
    report = run_demo(args.out, limit=args.limit, device=args.device, quiet=args.quiet,
                      seed=args.seed, batch_size=args.batch_size, **chosen)
    print(f"wrote {report}")
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    """``skipgrad zoo list``: every zoo spec, adversarially trained members marked, and whether
    its weights are on disk (the one enumeration: ``models.loading.zoo_specs``)."""
    from skipgrad.models.loading import zoo_specs

    plain, present = set(zoo_specs()), set(zoo_specs(defended=True, present=True))
    for spec in zoo_specs(defended=True):
        kind = "plain" if spec in plain else "adversarially trained"
        weights = "bundled" if spec in present else "weights missing (skipgrad zoo train NAME)"
        print(f"{spec:<28} {kind:<22} {weights}")
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    """``skipgrad zoo train NAME``."""
    from skipgrad.models.zoo.training import RECIPES, train_model

    name = args.name.removeprefix("zoo:").removeprefix("fmnist-")
    if name not in RECIPES or name == "resnet110":
        known = [n for n in RECIPES if n != "resnet110"]
        raise UserError(f"unknown zoo model {args.name!r} (known: {', '.join(known)})")
    out = args.out or Path("zoo-weights")
    summary = train_model(name, out, epochs=args.epochs, seed=args.seed, limit=args.limit,
                          batch_size=args.batch_size, progress=not args.quiet)
    print(json.dumps(summary, indent=2, default=str))
    return 0
