"""The ``skipgrad`` argument parser: every subcommand, its flags and their help."""
from __future__ import annotations

import argparse
from pathlib import Path

from skipgrad.analysis.selection import DEFAULT_GAMMAS
from skipgrad.cli import commands
from skipgrad.cli.types import (backward_method, channels, forward_method, gamma, gamma_list,
                                levels, non_negative_int, positive_int, sgm_choice)

EXIT_USAGE = 2


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


# Where _StoreOnce notes, during one parse, the options already given (removed after the parse).
_GIVEN = "_skipgrad_given_options"


class _StoreOnce(argparse._StoreAction):
    """The default action of every single-valued option: giving it twice is refused rather than
    letting the last one win silently (``--attack mi --attack ifgsm`` would run I-FGSM).
    Repeatable options say so and use ``append``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = vars(namespace).setdefault(_GIVEN, {})
        if self.dest in given:
            raise argparse.ArgumentError(self, f"given twice ({given[self.dest]} and "
                                               f"{option_string or ''} {_shown(values)}); "
                                               f"this option takes one value")
        given[self.dest] = f"{option_string or ''} {_shown(values)}".strip()
        super().__call__(parser, namespace, values, option_string)


def _shown(values: object) -> str:
    if isinstance(values, (list, tuple)):
        return " ".join(map(_shown, values))
    return f"{values:g}" if isinstance(values, float) else str(values)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in our format (no usage dump), lazy help texts, and
    single-valued options that refuse to be given twice (:class:`_StoreOnce`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        vars(namespace).pop(_GIVEN, None)
        return namespace, extras

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"skipgrad: error: {message} (see `{self.prog} --help`)\n")


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
                   "levels for L-inf, eps/4 for L2)")
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
    _add_companion_settings(p)
    _add_backward_option(p)
    p.add_argument("--amp", choices=("off", "bf16"),
                   help="autocast the source models to bfloat16 (mainly for GPUs; default off)")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory format for the source models and images")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the source models (with SGM, --backward and --forward "
                        "attached; not with a --forward method that draws, such as ghost) for "
                        "long runs: compile time is spent once, before the attack (needs a C++ "
                        "compiler on CPU)")


def _add_companion_settings(p: argparse.ArgumentParser) -> None:
    """The companion parts' settings (defaults as published; each only with its part)."""
    for flag, kind, text in (
            ("--si-copies", positive_int, "SI: scaled copies x/2^i (default 5)"),
            ("--vt-neighbours", positive_int, "VT: neighbours per step (default 20)"),
            ("--vt-beta", float, "VT: neighbourhood radius in units of eps (default 1.5)"),
            ("--admix-scales", positive_int, "Admix: scales per mixture (default 5)"),
            ("--admix-mixes", positive_int, "Admix: mixtures per step (default 3)"),
            ("--admix-eta", float, "Admix: mixing strength (default 0.2)"),
            ("--sia-copies", positive_int, "SIA: transformed copies (default 20)"),
            ("--sia-blocks", positive_int, "SIA: blocks per side (default 3)"),
            ("--bsr-copies", positive_int, "BSR: shuffled copies (default 20)"),
            ("--bsr-blocks", positive_int, "BSR: blocks per side (default 2)"),
            ("--bsr-max-angle", float, "BSR: largest rotation in degrees (default 24)")):
        p.add_argument(flag, type=kind, help=text)


def _add_backward_option(p: argparse.ArgumentParser, demo: bool = False) -> None:
    scope = ("added with and without SGM" if demo else
             "once for every source, or once per --source in order (none = without)")
    p.add_argument("--backward", action="append", type=backward_method,
                   metavar="METHOD[:key=value,...]",
                   help=LazyHelp(lambda: f"backward-pass method ({_method_names()}), e.g. "
                                         f"linbp:branch_scale=0.5; {scope}; repeated with one "
                                         f"source, they compose (skipgrad inspect lists what "
                                         f"each changes)"))
    _add_forward_option(p, demo)


def _add_forward_option(p: argparse.ArgumentParser, demo: bool = False) -> None:
    scope = ("the source so modified in every attack" if demo else
             "once for every source, or once per --source in order (none = without)")
    p.add_argument("--forward", action="append", type=forward_method,
                   metavar="METHOD[:key=value,...]",
                   help=LazyHelp(lambda: f"method that changes the source's forward pass too "
                                         f"({_method_names('forward')}), e.g. ghost:erosion=0.16 "
                                         f"or iaa:beta=20; {scope}; composes with --sgm and "
                                         f"--backward; the white-box success is then reported "
                                         f"on the unmodified and on the modified source"))


def _presets() -> str:
    from skipgrad.models.presets import preset_help  # loads torch: only when help is shown

    return preset_help()


def _method_names(kind: str = "backward") -> str:
    from skipgrad.backward.registry import known_methods  # loads torch: only when help is shown

    return ", ".join(info.name for info in known_methods(kind)) or "none registered"


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
    p.set_defaults(func=commands.cmd_demo)


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
    p.set_defaults(func=commands.cmd_attack)


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
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="score only the first N images the folder holds (by id)")
    _add_run_options(p, evaluate=True)
    p.set_defaults(func=commands.cmd_evaluate)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="paired comparison of two attack folders on the same "
                                       "images (Δ, 95%% CI (Newcombe), McNemar p, Benjamini-Hochberg q)")
    p.add_argument("folder_a", type=Path, metavar="DIR_A", help="the reference attack folder")
    p.add_argument("folder_b", type=Path, metavar="DIR_B", help="the folder compared with it")
    p.add_argument("--target", action="append", required=True, metavar="SPEC")
    p.add_argument("--weights", action="append", metavar="FILE",
                   help="local weights, one per --target in the same order")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the comparison as JSON")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="compare on the first N images both folders hold (by id), e.g. a "
                        "64-image run against the first 64 of a 200-image one (default: all, "
                        "which must then be the same images)")
    _add_run_options(p, evaluate=True)  # compare predicts; it attacks nothing
    p.set_defaults(func=commands.cmd_compare)


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
    p.add_argument("--preset", help=LazyHelp(lambda: f"take sources/targets not given otherwise "
                                                     f"from a preset: {_presets()}"))
    p.add_argument("--out", type=Path)
    p.add_argument("--title")
    _add_data_options(p, required=False)
    _add_attack_settings(p)
    _add_run_options(p, defaults=False)
    p.set_defaults(func=commands.cmd_transfer)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list model specs with input size and mean/std")
    p.add_argument("spec", nargs="*", metavar="SPEC",
                   help="specs to resolve and list, e.g. tv:resnet50 (default: the presets' "
                        "models)")
    p.add_argument("--preset", help=LazyHelp(lambda: f"list a preset's models: {_presets()}"))
    p.add_argument("--json", action="store_true",
                   help='print JSON instead of tables: {"models": [...], "defenses": [...]}')
    p.set_defaults(func=commands.cmd_models)


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
    t.set_defaults(func=commands.cmd_zoo_train)
    listing = zoo_sub.add_parser("list", help="the zoo's specs, with their weights' status")
    listing.set_defaults(func=commands.cmd_zoo_list)


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
    p.add_argument("--forward", action="append", type=forward_method,
                   metavar="METHOD[:key=value,...]",
                   help="list what this forward method (ghost, iaa) changes (repeatable; "
                        "default: every registered forward method with its defaults)")
    p.add_argument("--data", default="fmnist:test", help="images to measure on (default "
                                                         "fmnist:test)")
    p.add_argument("--limit", type=positive_int, default=32, help="images used (default 32)")
    p.add_argument("--channels", type=channels, default=None)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the analysis as JSON")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=commands.cmd_inspect)


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="what an output folder holds: settings, images, "
                                    "completeness, evaluations")
    p.add_argument("folder", type=Path, metavar="DIR")
    p.set_defaults(func=commands.cmd_show)


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
    p.set_defaults(func=commands.cmd_sweep)
