"""The Fashion-MNIST study of the backward-pass family behind docs/backward.md: each method on the
zoo sources it applies to, alone and with SGM at the study's gamma (docs/study.md), with I-FGSM
and MI, each against the same attack without the method on the same images, scored on every zoo
model, with paired McNemar tests and Benjamini-Hochberg correction (as docs/study.md does).

    python scripts/backward_study.py --out runs/backward [--limit 500] [--only SOURCE:METHOD,...]

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
from fmnist_study import effects_matrix, replace_section  # noqa: E402

from skipgrad.demo import backward_effects, effects_markdown, zoo_targets  # noqa: E402
from skipgrad.errors import UserError  # noqa: E402
from skipgrad.report import markdown_table  # noqa: E402
from skipgrad.runner import AttackJob, RunOptions  # noqa: E402
from skipgrad.transfer import ModelRef, TransferPlan, run_transfer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY_GAMMA = 0.5  # docs/study.md: the gamma of its MI/DI rows, the best or near it for most sources
ATTACKS = ("ifgsm", "mi")
# (zoo source, its methods, whether SGM applies), in the order they are run: the residual sources
# for LinBP/BPA, the ViT for PNA/TGR, the plain VGG (no skips: no SGM) for LinBP/BPA.
GRID = [
    ("preact-resnet20", ("linbp", "bpa"), True),
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


def run_study(out: Path, limit: int, only: set[str] | None) -> None:
    """Run every selected (source, method) and save each one's rows and per-image outcomes in
    ``OUT/SOURCE/METHOD.json`` (or why it did not run), so that runs of parts of the grid (in
    parallel processes, or resumed later) are put together without scoring anything again."""
    opts = RunOptions(limit=limit, batch_size=250, quiet=True)
    targets = zoo_targets()
    for source, methods, sgm in GRID:
        for method in methods:
            if only and f"{source}:{method}" not in only:
                continue
            record: dict = {"source": source, "method": method, "limit": limit}
            try:
                result = run_transfer(study_plan(source, method, sgm, targets), out / source, opts)
            except UserError as exc:
                if not str(exc).startswith("--backward"):  # e.g. a folder in use: not a result
                    raise
                print(f"skipped {source} × {method}: {exc}")  # the method does not apply
                record["skipped"] = str(exc)
            else:
                record["rows"] = [r.to_json() for r in result.rows]
                record["outcomes"] = [[*key, [int(v) for v in success.tolist()]]
                                      for key, success in result.outcomes.items()]
            (out / source).mkdir(parents=True, exist_ok=True)
            (out / source / f"{method}.json").write_text(json.dumps(record) + "\n")


def collect(outs: list[Path]) -> tuple[list, list, list[str]]:
    """Rows, paired effects and skipped cells of every (source, method) saved in one of ``outs``
    (the first folder holding it wins), in GRID order."""
    import torch

    from skipgrad.report import TransferRow

    rows, effects, skipped = [], [], []
    for source, methods, _ in GRID:
        for method in methods:
            paths = [out / source / f"{method}.json" for out in outs]
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
    """Success matrix, the compact effect matrix (BH-corrected) and the full paired table."""
    return "\n".join([
        f"Generated by `{command}`.", "",
        *([f"Not run: {s}" for s in skipped] + [""] if skipped else []),
        "#### Effect of each method: success with it minus without (points), same attack and "
        "SGM setting, same images", "",
        "Bold with `*`: significant after Benjamini-Hochberg correction over all transfer cells "
        "of this table (McNemar exact test, q < 0.05). In parentheses: white-box (source = "
        "target).", "",
        effects_matrix(effects, columns=("method", "attack"), row=lambda e: (e.method, e.variant)),
        "",
        "<details><summary>Transfer success (%), Wilson 95% intervals</summary>", "",
        markdown_table(rows, "Fashion-MNIST transfer success with backward-pass methods"),
        "</details>", "",
        "<details><summary>Every paired comparison (rates, 95% interval of the difference, "
        "discordant images, uncorrected McNemar p)</summary>", "",
        effects_markdown(effects), "</details>"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/backward"))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--only", default=None,
                        help="comma-separated SOURCE:METHOD cells, e.g. vit:pna,vgg:bpa")
    parser.add_argument("--write-docs", action="store_true",
                        help="also rewrite the generated tables of docs/backward.md")
    parser.add_argument("--collect-from", type=Path, action="append", default=[],
                        help="another --out folder whose saved parts are added (repeatable)")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing: put the saved parts together (and --write-docs)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if not args.collect_only:
        run_study(args.out, args.limit, only)
    # Every part run so far, this one included (also from --collect-from folders, e.g. a part
    # run on fewer images because the CPU budget ran out).
    rows, effects, skipped = collect([args.out, *args.collect_from])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backward_study.json").write_text(json.dumps(
        {"limit": args.limit, "gamma": STUDY_GAMMA, "skipped": skipped,
         "rows": [r.to_json() for r in rows], "effects": [e.to_json() for e in effects]},
        indent=1))
    print(effects_matrix(effects, columns=("method", "attack"),
                         row=lambda e: (e.method, e.variant)))
    if args.write_docs:
        command = f"python scripts/backward_study.py --limit {args.limit}" + "".join(
            f" --collect-from {p}" for p in args.collect_from)
        replace_section("backward study tables", tables(rows, effects, skipped, command),
                        ROOT / "docs" / "backward.md")


if __name__ == "__main__":
    main()
