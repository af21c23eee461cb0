"""The Fashion-MNIST study of the backward-pass family behind docs/backward.md: each method on the
zoo sources it applies to, alone and with SGM at the study's gamma (docs/study.md), with I-FGSM
and MI, each against the same attack without the method on the same images, scored on every zoo
model, with paired McNemar tests and Benjamini-Hochberg correction (as docs/study.md does).

    python scripts/backward_study.py --out runs/backward [--limit 1000] [--only SOURCE:METHOD,...]
        [--replication runs/replication]

The targets are the plain zoo, its adversarially trained members and the input-transformation
defenses of scripts/fmnist_defended.py around the plain CNN and VGG. ``--replication DIR`` scores
the finished attack folders again, on the seed-1 retrained targets of scripts/fmnist_replication.py
in DIR (trained there first where missing; nothing is attacked), and writes the replication tables
of docs/backward.md.

Each cell is an ordinary attack folder under OUT/SOURCE/attacks/ (the baselines without a method
are shared by the methods of a source), so re-running resumes. Each (source, method) saves its
rows and per-image outcomes in OUT/SOURCE/METHOD.json; OUT/backward_study.json and (with
--write-docs) the generated tables of docs/backward.md put together every part saved so far, so
parts of the grid can run in separate processes (--only) and be collected with --collect-only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_defended import DEFENSES, PLAIN  # noqa: E402
from fmnist_replication import SEED, retrained_targets  # noqa: E402
from fmnist_study import effects_matrix, replace_section  # noqa: E402

from skipgrad.analysis.effects import backward_effects, transfer_q_values  # noqa: E402
from skipgrad.models.loading import zoo_specs  # noqa: E402
from skipgrad.errors import UserError  # noqa: E402
from skipgrad.pipeline.report import effects_markdown, markdown_table  # noqa: E402
from skipgrad.pipeline.job import AttackJob, RunOptions  # noqa: E402
from skipgrad.pipeline.transfer import (  # noqa: E402
    ModelRef, TransferPlan, run_transfer, score_finished)

ROOT = Path(__file__).resolve().parents[1]
STUDY_GAMMA = 0.5  # docs/study.md: the gamma of its MI/DI rows, the best or near it for most sources
ATTACKS = ("ifgsm", "mi")
# (zoo source, its methods, whether SGM applies), in the order they are run: the residual sources
# for LinBP/BPA (LinBP refuses DenseNet and MobileNetV2: no ReLU inside a residual branch that it
# could linearise; the refusal is recorded), the ViT for PNA/TGR, the plain VGG (no skips: no SGM)
# for LinBP/BPA, ResNet-56 last (it costs about as much as the others together).
GRID = [
    ("preact-resnet20", ("linbp", "bpa"), True),
    ("resnet20", ("linbp", "bpa"), True),
    ("densenet", ("linbp", "bpa"), True),
    ("mobilenetv2", ("linbp", "bpa"), True),
    ("vit", ("pna", "tgr"), True),
    ("vgg", ("linbp", "bpa"), False),
    ("resnet56", ("linbp", "bpa"), True),
]


def study_plan(source: str, method: str, sgm: bool, targets: list[str]) -> TransferPlan:
    """One source and method: I-FGSM and MI, without/with SGM, without/with the method."""
    return TransferPlan(sources=(ModelRef(f"zoo:fmnist-{source}"),), attacks=ATTACKS,
                        gammas=(None, STUDY_GAMMA) if sgm else (None,),
                        targets=tuple(ModelRef(t) for t in targets),
                        template=AttackJob(sources=(), data="fmnist:test"),
                        title=f"{method} from {source}", backward=(method,))


def study_targets() -> list[str]:
    """Every zoo model with weights, its adversarially trained members, and each defense of
    scripts/fmnist_defended.py around the plain CNN and VGG."""
    from skipgrad.models.zoo import AT_NAMES, weights_path

    return [*zoo_specs(present=True), *(f"zoo:fmnist-{n}" for n in AT_NAMES if weights_path(n).exists()),
            *(f"{plain}+{defense}" for plain in PLAIN for defense in DEFENSES)]


def run_study(out: Path, limit: int, only: set[str] | None, replication: Path | None) -> None:
    """Run every selected (source, method) and save each one's rows and per-image outcomes in
    ``OUT/SOURCE/METHOD.json`` (or why it did not run), so that runs of parts of the grid (in
    parallel processes, or resumed later) are put together without scoring anything again. A
    part already saved for the same images and targets is not scored again. With ``replication``
    the finished folders are scored on the seed-1 targets instead (``METHOD.seed1.json``)."""
    opts = RunOptions(limit=limit, batch_size=250, quiet=True)
    # The seed-1 models are trained into ``replication`` first where missing (~35 CPU-minutes).
    targets = retrained_targets(replication) if replication else study_targets()
    for source, methods, sgm in GRID:
        for method in methods:
            if only and f"{source}:{method}" not in only:
                continue
            path = out / source / (f"{method}.seed{SEED}.json" if replication else f"{method}.json")
            if _saved(path, limit, targets):
                print(f"{source} × {method}: saved in {path}")
                continue
            record: dict = {"source": source, "method": method, "limit": limit, "targets": targets}
            plan = study_plan(source, method, sgm, targets)
            try:
                rows, outcomes = (score_finished(plan, out / source, opts) if replication
                                  else _attack_and_score(plan, out / source, opts))
            except UserError as exc:
                if "is not a finished attack folder" in str(exc):  # replication of a part never run
                    print(f"not replicated {source} × {method}: {exc}")
                    continue
                if f": --backward {method} on " not in str(exc):  # e.g. a folder in use: not a result
                    raise
                print(f"skipped {source} × {method}: {exc}")  # the method does not apply
                record["skipped"] = str(exc)
            else:
                record["rows"] = [r.to_json() for r in rows]
                record["outcomes"] = [[*key, [int(v) for v in success.tolist()]]
                                      for key, success in outcomes.items()]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record) + "\n")


def _saved(path: Path, limit: int, targets: list[str]) -> bool:
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    return record.get("limit") == limit and record.get("targets") == targets


def _attack_and_score(plan: TransferPlan, root: Path, opts: RunOptions) -> tuple[list, dict]:
    result = run_transfer(plan, root, opts)
    return result.rows, result.outcomes


def collect(outs: list[Path], suffix: str = "") -> tuple[list, list, list[str]]:
    """Rows, paired effects and skipped cells of every (source, method) saved in one of ``outs``
    (the first folder holding it wins), in GRID order; ``suffix`` ``.seed1`` for the replication."""
    import torch

    from skipgrad.pipeline.report import TransferRow

    rows, effects, skipped = [], [], []
    for source, methods, _ in GRID:
        for method in methods:
            paths = [out / source / f"{method}{suffix}.json" for out in outs]
            path = next((p for p in paths if p.is_file()), None)
            if path is None:
                continue
            record = json.loads(path.read_text())
            if "skipped" in record:
                skipped.append(f"{source} × {method}: {record['skipped']}")
                continue
            seen = {(r.source, r.method, r.target) for r in rows}
            rows += [r for r in map(TransferRow.from_json, record["rows"])
                     if (r.source, r.method, r.target) not in seen]
            outcomes = {tuple(item[:-1]): torch.tensor(item[-1], dtype=torch.bool)
                        for item in record["outcomes"]}
            effects += backward_effects(outcomes)
    return rows, effects, skipped


def tables(rows: list, effects: list, skipped: list[str], command: str) -> str:
    """Success matrix, the compact effect matrices (plain and defended targets, one
    Benjamini-Hochberg family) and the full paired table."""
    return "\n".join([
        f"Generated by `{command}`.", "",
        *([f"Not run: {s}" for s in skipped] + [""] if skipped else []),
        *effect_tables(rows, effects, row=lambda e: (e.method, e.variant),
                       white_box="white-box (source = target)",
                       title="Fashion-MNIST transfer success with backward-pass methods")])


def effect_tables(rows: list, effects: list, *, row, white_box: str, title: str,
                  before_details: tuple[str, ...] = ()) -> list[str]:
    """The lines shared by the method studies: the effect matrices on plain and on defended
    targets (one Benjamini-Hochberg family over both), ``before_details``, then the folded
    success matrix and paired table. ``row`` labels an effect's row; ``white_box`` says what
    the parenthesised cells are."""
    q = transfer_q_values(effects)
    defended = [e for e in effects if _is_defended(e.target)]
    plain = [e for e in effects if not _is_defended(e.target)]
    matrix = lambda part: effects_matrix(part, columns=("method", "attack"), q=q,  # noqa: E731
                                         row=row)
    return [
        "#### Effect of each method: success with it minus without (points), same attack and "
        "SGM setting, same images", "",
        "Bold with `*`: significant after Benjamini-Hochberg correction over all transfer cells "
        f"of both tables below (McNemar exact test, q < 0.05). In parentheses: {white_box}.", "",
        "Plain targets:", "", matrix(plain), "",
        "Defended targets (adversarially trained zoo members; input transformations around the "
        "plain CNN and VGG, see docs/defenses.md):", "", matrix(defended), "",
        *before_details,
        "<details><summary>Transfer success (%), Wilson 95% intervals</summary>", "",
        markdown_table(rows, title), "</details>", "",
        "<details><summary>Every paired comparison (rates, 95% Newcombe interval of the difference, "
        "discordant images, uncorrected McNemar p)</summary>", "",
        effects_markdown(effects), "</details>"]


def _is_defended(target: str) -> bool:
    """A target with an input-transformation defense, or an adversarially trained zoo member."""
    from skipgrad.models.defenses import split_spec
    from skipgrad.models.zoo import AT_NAMES

    base, defenses = split_spec(target)
    return bool(defenses) or base.removeprefix("zoo:fmnist-") in AT_NAMES


def replication_tables(effects: list, command: str) -> str:
    """The effect matrix on the seed-1 retrained targets (their own Benjamini-Hochberg family)."""
    return "\n".join([
        f"Generated by `{command}`: the study's attack folders scored on the seed-1 retrained "
        "targets of docs/study.md (`-seed1`: the zoo recipe with seed 1; the seed-1 copy of a "
        "source is a transfer target, not white-box).", "",
        "Bold with `*`: significant after Benjamini-Hochberg correction over all cells of this "
        "table (McNemar exact test, q < 0.05).", "",
        effects_matrix(effects, columns=("method", "attack"),
                       row=lambda e: (e.method, e.variant))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/backward"))
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--only", default=None,
                        help="comma-separated SOURCE:METHOD cells, e.g. vit:pna,vgg:bpa")
    parser.add_argument("--replication", type=Path, default=None,
                        help="score the finished folders on the seed-1 models in this folder")
    parser.add_argument("--write-docs", action="store_true",
                        help="also rewrite the generated tables of docs/backward.md")
    parser.add_argument("--collect-from", type=Path, action="append", default=[],
                        help="another --out folder whose saved parts are added (repeatable)")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing: put the saved parts together (and --write-docs)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if not args.collect_only:
        run_study(args.out, args.limit, only, args.replication)
    # Every part run so far, this one included (also from --collect-from folders, e.g. a part
    # run on fewer images because the CPU budget ran out).
    suffix = f".seed{SEED}" if args.replication else ""
    rows, effects, skipped = collect([args.out, *args.collect_from], suffix)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"backward_study{suffix}.json").write_text(json.dumps(
        {"limit": args.limit, "gamma": STUDY_GAMMA, "skipped": skipped,
         "rows": [r.to_json() for r in rows], "effects": [e.to_json() for e in effects]},
        indent=1))
    print(effects_matrix(effects, columns=("method", "attack"),
                         row=lambda e: (e.method, e.variant)))
    if args.write_docs:
        command = f"python scripts/backward_study.py --limit {args.limit}" + "".join(
            f" --collect-from {p}" for p in args.collect_from) + (
            f" --replication {args.replication}" if args.replication else "")
        if args.replication:
            replace_section("backward replication tables", replication_tables(effects, command),
                            ROOT / "docs" / "backward.md")
        else:
            replace_section("backward study tables", tables(rows, effects, skipped, command),
                            ROOT / "docs" / "backward.md")


if __name__ == "__main__":
    main()
