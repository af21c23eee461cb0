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

from skipgrad.analysis.effects import SGMEffect, sgm_effects, transfer_q_values  # noqa: E402
from skipgrad.models.loading import zoo_specs  # noqa: E402
from skipgrad.pipeline.report import effects_markdown, markdown_table, short_name  # noqa: E402
from skipgrad.pipeline.job import AttackJob, RunOptions  # noqa: E402
from skipgrad.pipeline.transfer import (ModelRef, TransferPlan, cell_folder, evaluate_cells,  # noqa: E402
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


def grid_cells(out: Path, targets: list[str], quick: bool = False, only: set[str] | None = None):
    """Per grid row: its source, transfer plan (on ``targets``), output folder and the attack folder
    of each cell."""
    for name, attacks, gammas, folder in GRID:
        if only and folder not in only:
            continue
        source = f"zoo:fmnist-{name}"
        plan = TransferPlan(sources=(ModelRef(source),), attacks=attacks,
                            gammas=(None,) + (gammas[:1] if quick else gammas),
                            targets=tuple(ModelRef(t) for t in targets),
                            template=AttackJob(sources=(), data="fmnist:test"))
        root = out / "matrix" / folder
        yield source, plan, root, [(s, a, g, b, cell_folder(root, s, a, g, b))
                                   for s, a, g, b in plan.cells()]


def run_grid(out: Path, limit: int, quick: bool, evaluate_only: bool, targets: list[str],
             only: set[str] | None = None) -> tuple[list, list[SGMEffect]]:
    """Attack (or, with ``evaluate_only``, just re-score the finished folders) and evaluate every
    grid row on ``targets``."""
    opts = RunOptions(limit=limit, batch_size=250, quiet=True)
    rows, effects = [], []
    for source, plan, root, folders in grid_cells(out, targets, quick, only):
        finished = all((f / "run.json").exists() for *_, f in folders)
        if not zoo_weights_exist(source) or (evaluate_only and not finished):
            print(f"skipping {source}: no weights or no finished attack folders")
            continue
        if evaluate_only:
            new_rows, new_outcomes = evaluate_cells(plan, folders, opts, print)
        else:
            result = run_transfer(plan, root, opts)
            new_rows, new_outcomes = result.rows, result.outcomes
        # A baseline already reported by an earlier row is not repeated in the tables; SGM cells are
        # always paired with the baseline of their own folder (same run, same grouping).
        seen = {(r.source, r.attack, r.sgm, r.target) for r in rows}
        rows += [r for r in new_rows if (r.source, r.attack, r.sgm, r.target) not in seen]
        effects += sgm_effects(new_outcomes)
    return sorted(rows, key=_order(rows, lambda r: (r.source, r.attack, r.sgm))), \
        sorted(effects, key=_order(effects, lambda e: (e.source, e.attack, e.gamma)))


def _order(items: list, key):
    """Sort key: source in first-seen order, then I-FGSM, MI, DI, then gamma (no SGM first)."""
    sources = list(dict.fromkeys(key(i)[0] for i in items))
    attacks = {"ifgsm": 0, "mi": 1, "di": 2}

    def rank(item) -> tuple:
        source, attack, gamma = key(item)
        return (sources.index(source), attacks.get(attack, 3), -1.0 if gamma is None else gamma)
    return rank


def zoo_weights_exist(spec: str) -> bool:
    return spec in zoo_specs(present=True)


def effects_matrix(effects: list, alpha: float = 0.05, columns: tuple[str, ...] = ("attack", "γ"),
                   row=lambda e: (e.attack, f"{e.gamma:g}"), q: dict | None = None) -> str:
    """Effect in points (variant minus baseline), one row per (source, *row(effect)), one column
    per target; by default SGM effects, one row per (source, attack, gamma). ``row`` and
    ``columns`` give other effects their row labels (scripts/backward_study.py).

    ``*``: significant after Benjamini-Hochberg correction over every cell of the table (q < alpha);
    ``(white-box)`` cells are the source attacking itself and are left out of the correction.
    ``q`` (``id(effect)`` -> q-value) corrects over a larger family instead, so that one family
    can be shown as several tables.
    """
    q = transfer_q_values(effects) if q is None else q
    targets = list(dict.fromkeys(e.target for e in effects))
    keys = list(dict.fromkeys((e.source, *row(e)) for e in effects))
    cell = {(e.source, *row(e), e.target): e for e in effects}
    lines = ["| source | " + " | ".join(columns) + " | "
             + " | ".join(f"`{short_name(t)}`" for t in targets) + " |",
             "|---|" + "---|" * (len(columns) - 1) + "---:|" + "---:|" * len(targets)]
    for key in keys:
        values = []
        for target in targets:
            e = cell.get((*key, target))
            if e is None:
                values.append("")
                continue
            text = f"{100 * e.comparison.difference:+.1f}"
            if target == key[0]:
                text = f"({text})"
            elif q[id(e)] < alpha:
                text = f"**{text}\\***"
            values.append(text)
        lines.append(f"| {short_name(key[0])} | " + " | ".join(key[1:]) + " | "
                     + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


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


def gradient_analysis(gammas: tuple[float, ...] = (0.2, 0.5, 0.8), images: int = 256) -> str:
    """Per residual source: what SGM decays and how it moves the input gradient (the quantities of
    ``skipgrad inspect``), on the first ``images`` test images."""
    from skipgrad.backward.inspect import inspect_model
    from skipgrad.data.fmnist import load_fmnist
    from skipgrad.models import load_model

    x, y = load_fmnist("test", limit=images)
    lines = ["| source | blocks found / decayed | γ | mean branch share, plain → SGM | "
             "‖∇x‖ SGM / plain | cosine(∇x plain, ∇x SGM) |", "|---|---|---:|---|---:|---:|"]
    for name in dict.fromkeys(row[0] for row in GRID):
        spec = f"zoo:fmnist-{name}"
        if not zoo_weights_exist(spec):
            continue
        model = load_model(spec)
        for gamma in gammas:
            r = inspect_model(model, gamma, x, y)
            lines.append(f"| {short_name(spec)} | {len(r.blocks)} / {r.n_decayed} | {gamma:g} | "
                         f"{100 * r.mean_branch_share(False):.1f}% → "
                         f"{100 * r.mean_branch_share(True):.1f}% | "
                         f"{r.input_grad_norm_sgm / r.input_grad_norm_plain:.3f} | "
                         f"{r.input_grad_cosine:.3f} |")
    return "\n".join(lines) + "\n"


def replace_section(marker: str, body: str, page: Path = ROOT / "docs" / "study.md") -> None:
    """Put ``body`` between ``<!-- MARKER: begin -->`` and ``<!-- MARKER: end -->`` in ``page``."""
    begin, end = f"<!-- {marker}: begin -->", f"<!-- {marker}: end -->"
    text = page.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{page} has no {begin} ... {end} markers")
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    page.write_text(f"{head}{begin}\n\n{body.strip()}\n\n{end}{tail}")


def effects_section(rows: list, effects: list[SGMEffect], command: str) -> str:
    """Success matrix, the compact SGM-effect matrix and (folded) the full paired-effect table."""
    return "\n".join([
        f"Generated by `{command}`.", "",
        "#### Transfer success (%), Wilson 95% intervals", "",
        markdown_table(rows, "Fashion-MNIST transfer success"), "",
        "#### SGM effect: success with SGM minus without (points), same attack, same images", "",
        "Bold with `*`: significant after Benjamini-Hochberg correction over all transfer cells of "
        "this table (McNemar exact test, q < 0.05). In parentheses: white-box (source = target).", "",
        effects_matrix(effects), "",
        "<details><summary>Every paired comparison (rates, 95% Newcombe interval of the difference, "
        "discordant images, uncorrected McNemar p)</summary>", "",
        effects_markdown(effects), "</details>"])


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
    rows, effects = run_grid(args.out, args.limit, args.quick, args.evaluate_only, zoo_specs(present=True),
                             only)
    (args.out / "study.json").write_text(json.dumps(
        {"rows": [r.to_json() for r in rows], "effects": [e.to_json() for e in effects]}, indent=1))
    print(effects_matrix(effects))
    if only or args.quick:  # a partial grid: the published page keeps the full study
        return
    gamma_plot(effects, rows, ROOT / "docs" / "study_gamma.png")
    command = f"python scripts/fmnist_study.py --out runs/study --limit {args.limit}"
    replace_section("generated tables", effects_section(rows, effects, command))
    replace_section("gradient analysis", f"Generated by `{command}` (first 256 test images).\n\n"
                    + gradient_analysis())


if __name__ == "__main__":
    main()
