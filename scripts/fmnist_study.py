"""The Fashion-MNIST SGM study behind docs/study.md: for each residual source of the bundled zoo,
I-FGSM (and MI/DI where the budget allows) with and without SGM over a gamma grid, evaluated on every
zoo model, with paired per-image statistics (McNemar's exact test) against the no-SGM baseline.

    python scripts/fmnist_study.py --out runs/study [--limit 1000] [--quick]

Each (source, attack, gamma) is an ordinary attack folder under OUT/attacks/, so re-running resumes
and re-evaluates (e.g. once more zoo models exist). Writes OUT/study.json, docs/study_gamma.png and
the tables of docs/study.md (between the generated-table markers).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from skipgrad.demo import SGMEffect, effects_markdown, sgm_effects, zoo_targets  # noqa: E402
from skipgrad.report import markdown_table, short_name  # noqa: E402
from skipgrad.runner import AttackJob, RunOptions  # noqa: E402
from skipgrad.transfer import (ModelRef, TransferPlan, cell_folder, evaluate_cells,  # noqa: E402
                               run_transfer)

ROOT = Path(__file__).resolve().parents[1]
# (source, attacks, gammas, folder): the grid is densest where it is cheapest (I-FGSM); the no-SGM
# baseline is always included. Rows added after the runner began grouping images by index have
# their own folder, so that every folder holds one consistent run.
GRID = [
    ("resnet20", ("ifgsm",), (0.2, 0.5, 0.8), "resnet20"),
    ("resnet20", ("mi", "di"), (0.5,), "resnet20"),
    ("preact-resnet20", ("ifgsm",), (0.5,), "preact-resnet20"),
    ("preact-resnet20", ("mi", "di"), (0.5,), "preact-resnet20-b"),
    ("preact-resnet20", ("ifgsm",), (0.2, 0.8), "preact-resnet20-b"),
    ("densenet", ("ifgsm",), (0.5,), "densenet"),
    ("mobilenetv2", ("ifgsm",), (0.5,), "mobilenetv2"),
    # The gamma grid widened to 0.1-0.8 for every residual source, MI/DI for every source.
    ("resnet20", ("ifgsm",), (0.1, 0.3), "resnet20-c"),
    ("preact-resnet20", ("ifgsm",), (0.1, 0.3), "preact-resnet20-c"),
    ("resnet56", ("ifgsm",), (0.1, 0.2, 0.3, 0.5, 0.8), "resnet56"),
    ("resnet56", ("mi", "di"), (0.5,), "resnet56"),
    ("densenet", ("ifgsm",), (0.1, 0.2, 0.3, 0.8), "densenet-b"),
    ("densenet", ("mi", "di"), (0.5,), "densenet-b"),
    ("mobilenetv2", ("ifgsm",), (0.1, 0.2, 0.3, 0.8), "mobilenetv2-b"),
    ("mobilenetv2", ("mi", "di"), (0.5,), "mobilenetv2-b"),
    ("vit", ("ifgsm",), (0.1, 0.2, 0.3, 0.5, 0.8), "vit"),
    ("vit", ("mi", "di"), (0.5,), "vit"),
]


def run_grid(out: Path, limit: int, quick: bool, evaluate_only: bool,
             only: set[str] | None = None) -> tuple[list, list[SGMEffect]]:
    """Attack (or, with ``evaluate_only``, just re-score the finished folders) and evaluate every
    grid row on every zoo model that has weights."""
    targets = zoo_targets()
    opts = RunOptions(limit=limit, batch_size=250, quiet=True)
    rows, effects = [], []
    for name, attacks, gammas, folder in GRID:
        source = f"zoo:fmnist-{name}"
        if only and folder not in only:
            continue
        plan = TransferPlan(sources=(ModelRef(source),), attacks=attacks,
                            gammas=(None,) + (gammas[:1] if quick else gammas),
                            targets=tuple(ModelRef(t) for t in targets),
                            template=AttackJob(sources=(), data="fmnist:test"))
        folders = [(s, a, g, cell_folder(out / "matrix" / folder, s, a, g))
                   for s, a, g in plan.cells()]
        if source not in targets or (evaluate_only and not all(f.exists() for *_, f in folders)):
            print(f"skipping {source}: no weights or no finished attack folders")
            continue
        if evaluate_only:
            new_rows, new_outcomes = evaluate_cells(plan, folders, opts, print)
        else:
            result = run_transfer(plan, out / "matrix" / folder, opts)
            new_rows, new_outcomes = result.rows, result.outcomes
        # A baseline already reported by an earlier row is not repeated in the tables; SGM cells are
        # always paired with the baseline of their own folder (same run, same grouping).
        seen = {(r.source, r.attack, r.sgm, r.target) for r in rows}
        rows += [r for r in new_rows if (r.source, r.attack, r.sgm, r.target) not in seen]
        effects += sgm_effects(new_outcomes)
    return rows, effects


def gamma_plot(effects: list[SGMEffect], rows: list, path: Path) -> None:
    """I-FGSM transfer success vs gamma (gamma 1 = no SGM), one panel per source."""
    sources = list(dict.fromkeys(r.source for r in rows if r.attack == "ifgsm"))
    columns = min(3, len(sources))
    rows_n = -(-len(sources) // columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 3.4 * rows_n), squeeze=False)
    for ax in axes.flat[len(sources):]:
        ax.axis("off")
    for ax, source in zip(axes.flat, sources):
        cells = [r for r in rows if r.source == source and r.attack == "ifgsm"]
        for target in dict.fromkeys(r.target for r in cells):
            points = sorted((1.0 if r.sgm is None else r.sgm, 100 * r.success_rate)
                            for r in cells if r.target == target)
            style = "--" if target == source else "-"
            ax.plot(*zip(*points), style, marker="o", label=short_name(target))
        ax.set_title(f"source {short_name(source)}", fontsize=10)
        ax.set_xlabel("γ (1 = no SGM)")
        ax.set_ylabel("I-FGSM success (%)")
        ax.grid(alpha=0.3)
    axes[0, columns - 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(rows: list, effects: list[SGMEffect], limit: int) -> None:
    page = ROOT / "docs" / "study.md"
    begin, end = "<!-- generated tables: begin -->", "<!-- generated tables: end -->"
    generated = "\n".join([
        begin, "",
        f"Generated by `python scripts/fmnist_study.py --out runs/study --limit {limit}`.", "",
        "### Transfer success (%), Wilson 95% intervals", "",
        markdown_table(rows, "Fashion-MNIST transfer success"), "",
        "### Paired effect of SGM against the same attack without SGM", "",
        effects_markdown(effects), "", "![I-FGSM transfer vs gamma](study_gamma.png)", "", end])
    text = page.read_text() if page.exists() else f"# SGM on Fashion-MNIST\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    page.write_text(head + generated + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="first gamma of each grid row only")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-score finished attack folders on every zoo model with weights")
    parser.add_argument("--sources", default=None,
                        help="comma-separated grid folders: run only these grid rows")
    args = parser.parse_args()
    only = set(args.sources.split(",")) if args.sources else None
    rows, effects = run_grid(args.out, args.limit, args.quick, args.evaluate_only, only)
    (args.out / "study.json").write_text(json.dumps(
        {"rows": [r.to_json() for r in rows], "effects": [e.to_json() for e in effects]}, indent=1))
    gamma_plot(effects, rows, ROOT / "docs" / "study_gamma.png")
    write_docs(rows, effects, args.limit)
    print(effects_markdown(effects))


if __name__ == "__main__":
    main()
