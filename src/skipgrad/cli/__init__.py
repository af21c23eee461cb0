"""The ``skipgrad`` command line: thin argument handling over the library.

User errors (:class:`skipgrad.errors.InputError`: ``UserError`` and the library's documented input
errors) print one line (``skipgrad: error: ...``) and exit with code 2; any other exception is a bug
and keeps its traceback (exit code 1). Ctrl-C exits with 130
(SIGTERM 143) and leaves only whole files behind. Perturbation sizes are pixel levels out of 255
for L-inf (``--eps 16``) and [0, 1] units for L2 (``--norm l2 --eps 1.5``); see skipgrad.units.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from skipgrad.errors import InputError, UserError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class LazyHelp(str):
    """A help text computed only when help is shown (it may need modules that load torch, and
    every command builds the whole parser)."""

    def __new__(cls, make) -> LazyHelp:
        text = super().__new__(cls, "...")  # non-empty: argparse hides empty help
        text.make = make
        return text


class _Formatter(argparse.HelpFormatter):
    def _expand_help(self, action: argparse.Action) -> str:
        if isinstance(action.help, LazyHelp):
            action.help = action.help.make().replace("%", "%%")
        return super()._expand_help(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in our format (no usage dump) and lazy help texts."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"skipgrad: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------- value parsers

def levels(text: str) -> float:
    """A perturbation size: ``16``, ``2.5`` (pixel levels out of 255 for L-inf, [0, 1] units for
    L2, see :mod:`skipgrad.units`), or a fraction such as ``16/255``, always read in [0, 1] pixel
    units. Never ``eval``."""
    from skipgrad.units import Fraction

    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value: float = Fraction(float(num) / float(den))
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def gamma(text: str) -> float | None:
    """An SGM gamma in (0, 1]; ``none`` means no SGM (for transfer matrices)."""
    if text.strip().lower() in ("none", "off", "no"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"SGM gamma {text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"SGM gamma must be in (0, 1], got {text}")
    return value


def _integer(text: str, minimum: int, meaning: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be {meaning}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0, "0 or a positive integer")


def positive_int(text: str) -> int:
    """A strictly positive integer."""
    return _integer(text, 1, "a positive integer")


def channels(text: str) -> int | None:
    """``auto`` (decide from the files), ``1`` (grayscale) or ``3`` (RGB)."""
    if text not in ("auto", "1", "3"):
        raise argparse.ArgumentTypeError("channels must be auto, 1 or 3")
    return None if text == "auto" else int(text)


def backward_method(text: str) -> str | None:
    """``--backward METHOD[:key=value,...]`` (methods joined with ``+``), checked against the
    registered methods and returned in canonical form; ``none`` -> None."""
    from skipgrad.backward.registry import BackwardSpecError, parse_backward

    try:
        plan = parse_backward(text)
    except BackwardSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return None if plan is None else plan.label


def per_source_backward(values: list[str | None] | None, n_sources: int
                        ) -> str | None | tuple[str | None, ...]:
    """Repeated ``--backward`` against the number of ``--source``: given once it applies to every
    source; with one source, several compose (as if joined with ``+``); otherwise exactly one per
    source, in order (``none`` for a source without). Other counts are refused in one line."""
    from skipgrad.backward.registry import combine, parse_backward

    if not values:
        return None
    if len(values) == 1:
        return values[0]
    if n_sources == 1:
        plan = combine(parse_backward(v) if v else None for v in values)
        return None if plan is None else plan.label
    if len(values) != n_sources:
        raise UserError(f"{len(values)} --backward for {n_sources} --source; give one for all "
                        f"sources or one per --source, in order (none for a source without)")
    return None if not any(values) else tuple(values)


# The sweep and --sgm auto grid 0.1, ..., 1.0 (1.0 is the plain gradient: the no-SGM baseline).
DEFAULT_GAMMAS = tuple(round(0.1 * k, 1) for k in range(1, 11))


def gamma_list(text: str) -> tuple[float, ...]:
    """Comma-separated gammas in (0, 1], e.g. ``0.1,0.2,0.5,1``; in the order given, no repeats."""
    values: list[float] = []
    for part in text.split(","):
        value = gamma(part.strip()) if part.strip() else None
        if value is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of gammas "
                                             f"in (0, 1]")
        if value not in values:
            values.append(value)
    return tuple(values)


def sgm_choice(text: str) -> float | str | None:
    """``--sgm`` of ``attack``: a gamma in (0, 1], or ``auto`` (calibrated, see autogamma)."""
    return "auto" if text.strip().lower() == "auto" else gamma(text)


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    """The full ``skipgrad`` parser with every subcommand."""
    import skipgrad

    parser = _Parser(prog="skipgrad", description="Transferable adversarial examples with the "
                     "Skip Gradient Method (Wu et al., ICLR 2020).")
    parser.add_argument("--version", action="version", version=f"skipgrad {skipgrad.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for add in (_add_demo, _add_attack, _add_evaluate, _add_compare, _add_transfer, _add_models,
                _add_zoo, _add_inspect, _add_sweep, _add_show):
        add(sub)
    return parser


def _add_run_options(p: argparse.ArgumentParser, defaults: bool = True,
                     evaluate: bool = False) -> None:
    p.add_argument("--batch-size", type=positive_int, help=(
        "images per prediction batch (default: 128 on CPU, 512 on CUDA)" if evaluate else
        LazyHelp(_group_size_help)))
    p.add_argument("--device", default="auto" if defaults else None, help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--prefetch", type=non_negative_int,
                   help="batches loaded ahead in a background thread (0 = off; default: decided "
                        "from how long the first one takes to load and to process)")


def _group_size_help() -> str:
    from skipgrad.pipeline.device import DEFAULT_GROUP_SIZE  # loads torch: only when help is shown

    cpu, cuda = DEFAULT_GROUP_SIZE["cpu"], DEFAULT_GROUP_SIZE["cuda"]
    return (f"images attacked together: the attack's fixed group size, part of the run (default: "
            f"the folder's own when resuming, else {cpu} on CPU, {cuda} on CUDA)")


def _add_data_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required,
                   help="fmnist:test, fmnist:train, or a folder (class subfolders, labels.csv "
                        "or images.csv layouts)")
    p.add_argument("--limit", type=positive_int, help="use only the first N images")
    p.add_argument("--channels", type=channels, default=None,
                   help="auto (default), 1 = grayscale, 3 = RGB")
    p.add_argument("--class-map", help="JSON or text file: class folder name -> index")


def _add_attack_settings(p: argparse.ArgumentParser) -> None:
    """Attack settings; defaults are None so a transfer config file is never overridden silently."""
    p.add_argument("--eps", type=levels, help="radius: L-inf in pixel levels out of 255 (default "
                   "16); with --norm l2 the L2 norm of the whole perturbation in [0, 1] pixel "
                   "units (default 1.5 up to 32x32 pixels, 3.0 above)")
    p.add_argument("--step-size", type=levels, help="step, in the unit of --eps (default 2 "
                   "levels for L-inf, eps/6 for L2)")
    p.add_argument("--steps", type=positive_int, help="iterations (default 10)")
    p.add_argument("--norm", choices=("linf", "l2"), help="linf (default) or l2; sets the unit "
                   "of --eps and --step-size")
    p.add_argument("--loss", choices=("ce", "margin"))
    p.add_argument("--targeted", action="store_true", default=None,
                   help="aim for the data's target labels (labels.csv targeted_label)")
    p.add_argument("--seed", type=int)
    p.add_argument("--decay", type=float, help="MI/NI momentum decay (default 1.0)")
    p.add_argument("--di-prob", type=float, help="DI probability (default 0.5)")
    p.add_argument("--di-scale", type=float, help="DI canvas scale (default 1.1)")
    p.add_argument("--ti-kernel", type=positive_int, help="TI kernel size, odd (default 7)")
    p.add_argument("--sgm-official", action="store_true", default=None,
                   help="use the authors' hook placement (torchvision ResNet/DenseNet)")
    _add_backward_option(p)
    p.add_argument("--amp", choices=("off", "bf16"),
                   help="autocast the source models to bfloat16 (mainly for GPUs; default off)")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory format for the source models and images")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the source models (with SGM and --backward attached) for "
                        "long runs: compile time is spent once, before the attack (needs a C++ "
                        "compiler on CPU)")


def _add_backward_option(p: argparse.ArgumentParser, demo: bool = False) -> None:
    scope = ("added with and without SGM" if demo else
             "once for every source, or once per --source in order (none = without)")
    p.add_argument("--backward", action="append", type=backward_method,
                   metavar="METHOD[:key=value,...]",
                   help=LazyHelp(lambda: f"backward-pass method ({_method_names()}), e.g. "
                                         f"linbp:branch_scale=0.5; {scope}; repeated with one "
                                         f"source, they compose (skipgrad inspect lists what "
                                         f"each changes)"))


def _method_names() -> str:
    from skipgrad.backward.registry import known_methods  # loads torch: only when help is shown

    return ", ".join(info.name for info in known_methods()) or "none registered"


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the embedded Fashion-MNIST benchmark")
    p.add_argument("--out", type=Path, default=Path("skipgrad-demo"))
    p.add_argument("--limit", type=positive_int)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int,
                   help="images attacked together (default: 32 on CPU, 64 on CUDA; a folder "
                        "resumes with its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", metavar="SPEC",
                   help="residual zoo model to attack from (default zoo:fmnist-preact-resnet20; "
                        "zoo:fmnist-resnet56 gains more from SGM and takes ~3x as long)")
    p.add_argument("--sgm", type=gamma, metavar="GAMMA", help="SGM gamma (default 0.5)")
    _add_backward_option(p, demo=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)


def _add_attack(sub) -> None:
    p = sub.add_parser("attack", help="craft adversarial images from source model(s)")
    p.add_argument("--source", action="append", required=True, metavar="SPEC",
                   help="model spec; repeat for an ensemble")
    p.add_argument("--weights", action="append", metavar="FILE",
                   help="local weights, one per --source in the same order")
    p.add_argument("--attack", default="ifgsm", help="ifgsm, pgd, mi, ni, di, ti joined by +")
    p.add_argument("--sgm", type=sgm_choice, action="append", metavar="GAMMA",
                   help="SGM gamma in (0, 1] (0.2 ResNet, 0.5 DenseNet), or auto: calibrated on "
                        "held-out models (docs/autogamma.md); once for every source, or once per "
                        "--source in order (none: no SGM for that source)")
    p.add_argument("--out", type=Path, required=True)
    _add_data_options(p, required=True)
    _add_attack_settings(p)
    _add_auto_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_attack)


def _add_auto_options(p: argparse.ArgumentParser) -> None:
    """Options of ``--sgm auto`` (ignored otherwise)."""
    p.add_argument("--calibrate-on", action="append", metavar="SPEC",
                   help="--sgm auto: held-out model; repeat (default: the other zoo models, "
                        "Fashion-MNIST data only)")
    p.add_argument("--calibrate-weights", action="append", metavar="FILE",
                   help="local weights, one per --calibrate-on in the same order")
    p.add_argument("--calibrate-images", type=positive_int,
                   help="--sgm auto: calibration images (default 200)")
    p.add_argument("--calibrate-data", metavar="DATA", help="--sgm auto: where calibration "
                   "images come from (default: fmnist:train for fmnist:test, else the images "
                   "after the --limit attacked ones)")
    p.add_argument("--calibrate-gammas", type=gamma_list,
                   help="--sgm auto: gamma grid (default 0.1,0.2,...,1.0)")


_AUTO_OPTIONS = ("calibrate_on", "calibrate_weights", "calibrate_images", "calibrate_data",
                 "calibrate_gammas")


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


def _check_auto_options(args: argparse.Namespace, auto: bool) -> None:
    """The --calibrate-* options only mean something with --sgm auto: refuse them otherwise
    rather than ignore them."""
    given = [f"--{name.replace('_', '-')}" for name in _AUTO_OPTIONS
             if getattr(args, name, None) is not None]
    if given and not auto:
        raise UserError(f"{', '.join(given)} only apply to --sgm auto; drop them or use --sgm auto")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="transfer success of an attack folder on target models")
    p.add_argument("folder", type=Path)
    p.add_argument("--target", action="append", required=True, metavar="SPEC")
    p.add_argument("--weights", action="append", metavar="FILE",
                   help="local weights, one per --target in the same order")
    p.add_argument("--json", type=Path, metavar="FILE", help="write results as JSON")
    p.add_argument("--data", help="where the clean images are now, if they moved")
    p.add_argument("--no-verify", action="store_true",
                   help="score the files without checking them against the manifest's SHA-256 "
                        "and the eps bound (e.g. folders made before the hashes)")
    _add_run_options(p, evaluate=True)
    p.set_defaults(func=cmd_evaluate)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="paired comparison of two attack folders on the same "
                                       "images (Δ, 95%% CI, McNemar p, Benjamini-Hochberg q)")
    p.add_argument("folder_a", type=Path, metavar="DIR_A", help="the reference attack folder")
    p.add_argument("folder_b", type=Path, metavar="DIR_B", help="the folder compared with it")
    p.add_argument("--target", action="append", required=True, metavar="SPEC")
    p.add_argument("--weights", action="append", metavar="FILE",
                   help="local weights, one per --target in the same order")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the comparison as JSON")
    _add_run_options(p)
    p.set_defaults(func=cmd_compare)


def _add_transfer(sub) -> None:
    p = sub.add_parser("transfer", help="sources x attacks x targets matrix (flags or --config)")
    p.add_argument("--config", type=Path, help="TOML file with the plan (flags override it)")
    p.add_argument("--source", action="append", metavar="SPEC")
    p.add_argument("--source-weights", action="append", metavar="FILE")
    p.add_argument("--target", action="append", metavar="SPEC")
    p.add_argument("--target-weights", action="append", metavar="FILE")
    p.add_argument("--attack", action="append", help="repeat for several attacks")
    p.add_argument("--sgm", action="append", type=gamma, help="gamma; repeat for several")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the runs without SGM (and, with --backward, those without the method)")
    p.add_argument("--preset", help="take sources/targets not given otherwise from a preset "
                                    "(wu2020, fmnist)")
    p.add_argument("--out", type=Path)
    p.add_argument("--title")
    _add_data_options(p, required=False)
    _add_attack_settings(p)
    _add_run_options(p, defaults=False)
    p.set_defaults(func=cmd_transfer)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list model specs with input size and mean/std")
    p.add_argument("--preset", help="wu2020 (the paper's zoo), fmnist (the bundled zoo) or "
                                    "fmnist-defended (adv. trained and input-transformed targets)")
    p.add_argument("--json", action="store_true",
                   help='print JSON instead of tables: {"models": [...], "defenses": [...]}')
    p.set_defaults(func=cmd_models)


def _add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="the bundled Fashion-MNIST zoo")
    zoo_sub = p.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    t = zoo_sub.add_parser("train", help="train one zoo architecture")
    t.add_argument("name")
    t.add_argument("--out", type=Path)
    t.add_argument("--epochs", type=positive_int)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=positive_int)
    t.add_argument("--batch-size", type=positive_int, default=128)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_zoo_train)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what each backward-pass method would change in a model; "
                                       "the blocks SGM decays and the skip/branch gradient split "
                                       "without and with SGM")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--weights", metavar="FILE", help="local weights for SPEC")
    p.add_argument("--gamma", type=gamma, default=0.5, help="SGM gamma to analyse (default 0.5)")
    p.add_argument("--backward", action="append", type=backward_method,
                   metavar="METHOD[:key=value,...]",
                   help="list what this backward-pass method changes (repeatable; default: "
                        "every registered method with its defaults)")
    p.add_argument("--data", default="fmnist:test", help="images to measure on (default "
                                                         "fmnist:test)")
    p.add_argument("--limit", type=positive_int, default=32, help="images used (default 32)")
    p.add_argument("--channels", type=channels, default=None)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the analysis as JSON")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_inspect)


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="what an output folder holds: settings, images, "
                                    "completeness, evaluations")
    p.add_argument("folder", type=Path, metavar="DIR")
    p.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    """``skipgrad show DIR``."""
    from skipgrad.pipeline.show import describe_folder

    print(describe_folder(args.folder))
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="transfer success against SGM gamma, one line per target")
    p.add_argument("--source", required=True, metavar="SPEC")
    p.add_argument("--source-weights", metavar="FILE")
    p.add_argument("--attack", default="ifgsm", help="ifgsm, pgd, mi, ni, di, ti joined by +")
    p.add_argument("--gammas", type=gamma_list, default=DEFAULT_GAMMAS,
                   help="comma-separated gammas in (0, 1] (default 0.1,0.2,...,1.0); "
                        "1.0 is the attack without SGM")
    p.add_argument("--target", action="append", required=True, metavar="SPEC")
    p.add_argument("--target-weights", action="append", metavar="FILE")
    p.add_argument("--out", type=Path, required=True)
    _add_data_options(p, required=True)
    _add_attack_settings(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_sweep)


# ---------------------------------------------------------------- commands

def _log(quiet: bool):
    return (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))


def _settings(args: argparse.Namespace) -> dict:
    """Attack and job settings given on the command line (unset flags are left out)."""
    from skipgrad.pipeline.job import ATTACK_SETTINGS, JOB_SETTINGS

    return {n: getattr(args, n) for n in ATTACK_SETTINGS + JOB_SETTINGS
            if getattr(args, n, None) is not None}


def _options(args: argparse.Namespace, base: dict | None = None):
    from skipgrad.pipeline.job import RunOptions

    base = base or {}
    pick = lambda name, default: (getattr(args, name, None) if getattr(args, name, None)  # noqa: E731
                                  is not None else base.get(name, default))
    return RunOptions(limit=pick("limit", None), batch_size=pick("batch_size", None),
                      device=pick("device", "auto"), quiet=bool(args.quiet or base.get("quiet")),
                      prefetch=pick("prefetch", None))


def cmd_attack(args: argparse.Namespace) -> int:
    """``skipgrad attack``."""
    from skipgrad.pipeline.engine import run_attack_job

    sgm = per_source_sgm(args.sgm, len(args.source))
    auto = sgm == "auto"
    _check_auto_options(args, auto)
    job = _job(args, sgm=None if auto else sgm)
    record = None
    if auto:  # gamma is resolved before the runner sees the job: run.json holds a plain float
        job, record = _auto_gamma(args, job)
    # The calibration record is written with run.json's claim, inside the folder's lock.
    notes = {"sgm_auto": record} if record is not None else None
    summary = run_attack_job(job, args.out, _options(args), log=_log(args.quiet), notes=notes)
    if record is not None:
        print(f"--sgm auto chose gamma {job.attack.sgm:g} "
              f"(calibration curve in {args.out}/run.json)")
    compiled = (f", after {summary.compile_seconds:.1f} s compiling"
                if summary.compile_seconds else "")
    print(f"{summary.total} images in {args.out} ({summary.skipped} already done, "
          f"{summary.attacked} attacked in {summary.seconds:.1f} s, {summary.cpu_seconds:.1f} s "
          f"CPU{compiled}); "
          f"white-box success on the source: {100 * summary.source_success:.1f}%")
    return 0


def _job(args: argparse.Namespace, sgm):
    """The AttackJob of ``attack``'s flags."""
    from skipgrad.pipeline.job import ATTACK_SETTINGS, JOB_SETTINGS, AttackJob, attack_from_settings

    settings = _settings(args)
    spec = attack_from_settings(args.attack, sgm,
                                {k: v for k, v in settings.items() if k in ATTACK_SETTINGS},
                                per_source_backward(args.backward, len(args.source)),
                                data=args.data)
    return AttackJob(sources=tuple(args.source), data=args.data, attack=spec,
                     weights=tuple(args.weights or ()),
                     **{k: v for k, v in settings.items() if k in JOB_SETTINGS})


def _auto_gamma(args: argparse.Namespace, job):
    """``--sgm auto``: (job with the calibrated gamma, the run.json record)."""
    import dataclasses

    from skipgrad.store import outdir
    from skipgrad.pipeline.autogamma import (DEFAULT_CALIBRATION_IMAGES, AutoGammaRequest,
                                    format_calibration, resolve_auto_gamma)
    from skipgrad.pipeline.job import check_job
    from skipgrad.pipeline.device import resolve_device, resolve_group_size

    check_job(job)  # bad settings and a bad --out fail before the (long) calibration
    outdir.refuse_data_overlap(args.out, job.data)
    device = resolve_device(args.device)
    held = _refs(args.calibrate_on, args.calibrate_weights, "calibrate")
    request = AutoGammaRequest(tuple((r.spec, r.weights) for r in held),
                               args.calibrate_images or DEFAULT_CALIBRATION_IMAGES,
                               args.calibrate_gammas or DEFAULT_GAMMAS, args.calibrate_data,
                               resolve_group_size(args.out, args.batch_size, device))
    chosen, record = resolve_auto_gamma(job, args.out, request, args.limit, device,
                                        _log(args.quiet))
    if not args.quiet:
        print(format_calibration(record), file=sys.stderr)
    return dataclasses.replace(job, attack=dataclasses.replace(job.attack, sgm=chosen)), record


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``skipgrad evaluate``."""
    from skipgrad.pipeline.evaluate import (evaluate_folder, format_table, record_evaluation,
                                   write_results_json)

    results = evaluate_folder(args.folder, args.target, weights=args.weights, device=args.device,
                              batch_size=args.batch_size, quiet=args.quiet, data=args.data,
                              prefetch=args.prefetch, check=not args.no_verify)
    title = f"transfer success of {args.folder}" + (" (files NOT verified: --no-verify)"
                                                      if args.no_verify else "")
    print(format_table(results, title=title))
    _warn_calibration([args.folder], args.target)
    record_evaluation(args.folder, results)
    if args.json:
        write_results_json(results, args.json, args.folder)
        print(f"wrote {args.json}")
    return 0


def _warn_calibration(folders: Sequence[Path], targets: Sequence[str]) -> None:
    """Say when a target chose a folder's ``--sgm auto`` gamma (its number is optimistic)."""
    from skipgrad.pipeline.autogamma import calibration_warning

    for folder in folders:
        warning = calibration_warning(folder, targets)
        if warning:
            print(warning, file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> int:
    """``skipgrad compare DIR_A DIR_B --target ...``: paired effect of B over A on each target."""
    from skipgrad.pipeline.compare import compare_folders, comparison_json, comparison_markdown
    from skipgrad.store.atomic import atomic_write_text

    comparison = compare_folders(args.folder_a, args.folder_b, args.target, weights=args.weights,
                                 device=args.device, batch_size=args.batch_size, quiet=args.quiet)
    print(comparison_markdown(comparison))
    _warn_calibration([args.folder_a, args.folder_b], args.target)
    if args.json:
        atomic_write_text(args.json, json.dumps(comparison_json(comparison), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    """``skipgrad transfer``: flags override the TOML config, which overrides defaults."""
    from skipgrad.pipeline.transfer import load_plan_file, run_transfer

    config = load_plan_file(args.config) if args.config else {}
    plan, out, opts = _transfer_plan(args, config)
    result = run_transfer(plan, out, opts, log=_log(args.quiet))
    from skipgrad.pipeline.report import markdown_table

    print(markdown_table(result.rows, plan.title))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


_PLAN_KEYS = ("sources", "targets", "preset", "attacks", "sgm", "baseline", "out", "data", "title",
              "backward")
_RUN_KEYS = ("limit", "batch_size", "device", "quiet")


def _transfer_plan(args: argparse.Namespace, config: dict):
    """Merge flags over the TOML config: (plan, output folder, run options)."""
    from skipgrad.pipeline.transfer import TransferPlan, gammas_with_baseline, plan_gammas, template_from

    settings = dict(config)  # what remains after the plan and run keys are the attack settings
    plan_cfg = {k: settings.pop(k) for k in _PLAN_KEYS if k in settings}
    run_cfg = {k: settings.pop(k) for k in _RUN_KEYS if k in settings}
    sources, targets = _transfer_models(args, plan_cfg)
    attacks = tuple(args.attack or _as_list(plan_cfg.get("attacks", ["ifgsm"])))
    gammas, per_source = (args.sgm, ()) if args.sgm is not None else plan_gammas(
        plan_cfg.get("sgm", []), sources, not args.no_baseline and plan_cfg.get("baseline", True),
        _toml_gamma)
    baseline = not args.no_baseline and bool(plan_cfg.get("baseline", True))
    out = args.out or (Path(plan_cfg["out"]) if "out" in plan_cfg else None)
    data = args.data or plan_cfg.get("data")
    if out is None or data is None or not sources or not targets:
        raise UserError("transfer needs --source, --target, --data and --out "
                        "(as flags or in the --config file)")
    backward = _transfer_backward(args.backward, plan_cfg.get("backward"), len(sources))
    if backward and not gammas and not baseline and not per_source:  # methods alone, no SGM
        gammas, baseline = [None], True
    column = gammas_with_baseline(list(gammas), baseline or bool(per_source))
    plan = TransferPlan(sources, attacks, column, targets,
                        template_from({**settings, **_settings(args)}, data),
                        args.title or plan_cfg.get("title", "Transfer success rate"),
                        backward=backward, backward_baseline=not args.no_baseline
                        and bool(plan_cfg.get("baseline", True)), source_gammas=per_source)
    return plan, out, _options(args, run_cfg)


def _transfer_backward(flags: list | None, config: object, n_sources: int) -> tuple:
    """Each source's backward-pass methods (a label or None) from the flags, else the plan's
    ``backward`` key (a string for every source or a list with one per source)."""
    if flags is None and config is not None:
        values = config if isinstance(config, list) else [config]
        if not all(isinstance(v, str) for v in values):
            raise UserError(f"backward in the plan must be a method string or a list of them "
                            f"(\"none\" for a source without), got {config!r}")
        if len(values) not in (1, n_sources):  # in a plan a list is per source, never composed
            raise UserError(f"backward in the plan has {len(values)} entries for {n_sources} "
                            f"sources; give one for all or one per source (join methods with +)")
        flags = [backward_method_or_error(v) for v in values]
    chosen = per_source_backward(flags, n_sources)
    if chosen is None:
        return ()
    return chosen if isinstance(chosen, tuple) else (chosen,) * n_sources


def backward_method_or_error(text: str) -> str | None:
    """:func:`backward_method` for values that do not come through argparse (plans)."""
    try:
        return backward_method(text)
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"backward: {exc}") from None


def _transfer_models(args: argparse.Namespace, plan_cfg: dict):
    from skipgrad.models.presets import get_preset
    from skipgrad.pipeline.transfer import model_refs

    sources = _refs(args.source, args.source_weights, "source") or model_refs(
        plan_cfg.get("sources", []), "sources")
    targets = _refs(args.target, args.target_weights, "target") or model_refs(
        plan_cfg.get("targets", []), "targets")
    preset = args.preset or plan_cfg.get("preset")
    if preset:
        chosen = get_preset(preset)
        sources = sources or model_refs(list(chosen.sources), "sources")
        targets = targets or model_refs(list(chosen.targets), "targets")
    return sources, targets


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _toml_gamma(value) -> float | None:
    """A plan's gamma: a number in (0, 1] or the string "none"; anything else is a UserError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < value <= 1:
            raise UserError(f"sgm in the plan: gamma must be in (0, 1], got {value:g}")
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("none", "off", "no"):
        return None
    raise UserError(f"sgm in the plan: {value!r} is not a gamma in (0, 1] (or \"none\")")


def _refs(specs: list[str] | None, weights: list[str] | None, what: str):
    from skipgrad.pipeline.transfer import ModelRef

    if not specs:
        if weights:
            raise UserError(f"--{what}-weights given without --{what}")
        return ()
    if weights and len(weights) != len(specs):
        raise UserError(f"{len(weights)} --{what}-weights for {len(specs)} --{what}; "
                        f"give one per --{what}, in order")
    return tuple(ModelRef(s, w) for s, w in zip(specs, weights or [None] * len(specs)))


def cmd_sweep(args: argparse.Namespace) -> int:
    """``skipgrad sweep``: one attack over a list of gammas, transfer success per target."""
    from skipgrad.pipeline.sweep import format_best, run_sweep
    from skipgrad.pipeline.transfer import ModelRef, template_from

    source = _refs([args.source], [args.source_weights] if args.source_weights else None,
                   "source")[0]
    targets = _refs(args.target, args.target_weights, "target")
    result = run_sweep(source, args.attack, args.gammas, targets,
                       template_from(_settings(args), args.data), args.out, _options(args),
                       log=_log(args.quiet), backward=per_source_backward(args.backward, 1))
    print(format_best(result))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``skipgrad inspect SPEC``: what every backward-pass method would change in the model, then
    SGM's blocks and gradient split on a few images of the data."""
    import dataclasses

    from skipgrad.backward.inspect import (format_method_changes, format_report, inspect_model,
                                           method_changes, report_json)
    from skipgrad.store.atomic import atomic_write_text
    from skipgrad.pipeline.device import resolve_device

    model, missing = _inspect_model(args.spec, args.weights, resolve_device(args.device))
    spec = model.config.spec
    methods = method_changes(model, _inspect_choices(args.backward))
    sgm_problem = _sgm_problem(model)
    has_blocks = sgm_problem is None
    _check_inspectable(spec, methods, has_blocks, args.backward)  # before any note: one line
    if missing:
        print(f"skipgrad: note: {missing}; analysing the architecture with random weights "
              f"(gradient shares then describe an untrained network)", file=sys.stderr)
    print(format_method_changes(methods, spec))
    record = {"spec": spec, "random_weights": missing is not None, "data": args.data,
              "backward": [m.to_json() for m in methods]}
    if has_blocks:
        images, labels = _inspect_batch(args, model)
        # Name the spec in the report rather than the wrapper class every loaded model shares.
        report = dataclasses.replace(inspect_model(model, args.gamma, images, labels), model=spec)
        print("\n" + format_report(report))
        record.update(images=len(labels), **report_json(report))
    else:
        print(f"\nSGM: {sgm_problem}")
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _inspect_choices(values: list[str | None] | None):
    """The methods ``--backward`` asks to list (None: every registered method)."""
    from skipgrad.backward.registry import parse_backward

    if not values:
        return None
    return [choice for v in values if v for choice in parse_backward(v).methods]


def _sgm_problem(model) -> str | None:
    """Why SGM cannot change ``model`` (:func:`skipgrad.sgm_blocks`), or None when it can."""
    import skipgrad

    try:
        skipgrad.sgm_blocks(model)
    except skipgrad.NoDecayedBlockError as exc:
        return _one_line(exc)
    except skipgrad.NoResidualBlockError:
        return (f"{model.config.spec} has no residual or dense block (e.g. VGG, Inception-v3); "
                f"nothing for SGM to decay")
    return None


def _check_inspectable(spec: str, methods: list, has_blocks: bool, asked: list | None) -> None:
    """Refuse, in one line, a method asked for by name that does not apply, or a model that no
    method and not SGM applies to."""
    refused = [m for m in methods if not m.applies]
    if asked and refused:
        raise UserError(f"--backward {refused[0].label} on {spec}: {refused[0].reason}")
    if not has_blocks and not any(m.applies for m in methods):
        raise UserError(f"{spec} has no residual or dense block SGM can decay (e.g. VGG, "
                        f"Inception-v3) and no backward-pass method applies to it; there is "
                        f"nothing to inspect")


def _inspect_model(spec: str, weights: str | None, device):
    """(model, why its weights are random or None): missing hub weights fall back to random ones,
    because which blocks exist and which are decayed does not depend on the weights."""
    from skipgrad.errors import MissingWeightsError
    from skipgrad.models import load_model

    try:
        return load_model(spec, weights=weights, device=device), None
    except MissingWeightsError as exc:
        return load_model(spec, weights=weights, pretrained=False, device=device), _one_line(exc)


def _inspect_batch(args: argparse.Namespace, model):
    """The first ``--limit`` images of ``--data`` and their labels; labels outside the model's
    classes (Fashion-MNIST into a 10-class model is fine, ImageNet labels into it are not) are
    replaced by the model's own predictions so the loss stays defined."""
    import torch

    from skipgrad.data.datasets import open_dataset

    data = open_dataset(args.data, limit=args.limit, channels=args.channels)
    device = next(model.parameters()).device
    images = data.load(data.samples).to(device)
    labels = torch.tensor([s.label for s in data.samples], device=device)
    if int(labels.max()) >= model.config.num_classes or int(labels.min()) < 0:
        with torch.no_grad():
            labels = model(images).argmax(dim=1)
    return images, labels


def cmd_models(args: argparse.Namespace) -> int:
    """``skipgrad models``: specs with input size, mean/std, parameter count, weight status, and
    the target defenses; ``--json`` prints ``{"models": [...], "defenses": [...]}``."""
    from skipgrad.models.defenses import defense_help
    from skipgrad.models.listing import defenses_table, model_rows, rows_table

    rows = model_rows(args.preset)
    if args.json:
        print(json.dumps({"models": rows, "defenses": defense_help()}, indent=2))
    else:
        print(f"{rows_table(rows)}\n\n{defenses_table()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``skipgrad demo``: the embedded Fashion-MNIST benchmark."""
    from skipgrad.pipeline.demo import run_demo

    chosen = {k: v for k, v in (("source", args.source), ("gamma", args.sgm),
                                ("backward", per_source_backward(args.backward, 1)))
              if v is not None}
    report = run_demo(args.out, limit=args.limit, device=args.device, quiet=args.quiet,
                      seed=args.seed, batch_size=args.batch_size, **chosen)
    print(f"wrote {report}")
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


# ---------------------------------------------------------------- entry point

def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 input error, 130 interrupted,
    143 stopped by SIGTERM). Any exception other than an :class:`InputError` propagates (a bug:
    ``python -m skipgrad`` then prints its traceback and exits with 1)."""
    try:
        args = build_parser().parse_args(argv)
        from skipgrad.pipeline.distributed import silence_other_ranks

        silence_other_ranks()  # under torchrun rank 0 prints the results
        return args.func(args)
    except SystemExit as exc:  # argparse: --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt as exc:
        print("skipgrad: interrupted; finished files are kept, re-run the same command to resume",
              file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)  # 143 after SIGTERM
    except InputError as exc:  # documented input errors only: anything else is a bug, and
        print(f"skipgrad: error: {_one_line(exc)}", file=sys.stderr)  # keeps its traceback (1)
        return EXIT_USAGE


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
