"""Tables and figures of docs/protocol.md from the saved records of scripts/protocol_study.py and
scripts/companion_study.py (nothing is attacked or scored here).

    python scripts/protocol_report.py --protocol runs/protocol --companions runs/companions \
        [--replication] [--write-docs]

Writes docs/protocol_iterations.png (transfer and white-box success against iterations) and
docs/protocol_compute.png (transfer against gradient evaluations per image), and the generated
sections of docs/protocol.md (between their markers).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import companion_study  # noqa: E402
import protocol_study  # noqa: E402
from fmnist_replication import SEED  # noqa: E402
from fmnist_study import replace_section  # noqa: E402

from skipgrad.analysis.effects import transfer_q_values  # noqa: E402
from skipgrad.pipeline.report import TransferRow, effects_markdown, short_name  # noqa: E402
from skipgrad.units import l2_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "protocol.md"
ALPHA = 0.05
METHOD_ORDER = ("plain", "SGM", "LinBP", "BPA")


def method_of(row: TransferRow) -> str:
    """The protocol study's name of a row's attack: plain, SGM, LinBP or BPA."""
    if row.backward:
        return {"linbp": "LinBP", "bpa": "BPA"}[row.backward[0]]
    return "plain" if row.sgm is None else "SGM"


def effect_method(effect) -> str:
    return "SGM" if hasattr(effect, "backward") else {"linbp": "LinBP", "bpa": "BPA"}[effect.method]


def is_transfer(source: str, target: str) -> bool:
    """A transfer cell: the target is not the source itself (the source's seed-1 copy, with
    other weights, is a transfer target, as in docs/backward.md's replication)."""
    return short_name(target) != short_name(source)


def summarise(rows: list[TransferRow]) -> dict[str, dict]:
    """Per method: white-box rate, mean transfer rate over the other targets, mean L2."""
    out: dict[str, dict] = {}
    for method in METHOD_ORDER:
        mine = [r for r in rows if method_of(r) == method]
        if not mine:
            continue
        transfer = [r.success_rate for r in mine if is_transfer(r.source, r.target)]
        white = [r.success_rate for r in mine if short_name(r.target) == short_name(r.source)]
        sizes = [r.mean_l2 for r in mine if getattr(r, "mean_l2", None) is not None]
        out[method] = {"transfer": sum(transfer) / len(transfer) if transfer else None,
                       "white_box": white[0] if white else None,
                       "l2": sizes[0] if sizes else None}
    return out


def protocol_records(out: Path, suffix: str) -> list[tuple]:
    """(setting, source, rows, effects) of every saved record."""
    found = []
    for setting, record in protocol_study.collect(out, suffix):
        rows = [TransferRow.from_json(r) for r in record["rows"]]
        found.append((setting, record["source"], record["images"], rows,
                      protocol_study.effects_of(record)))
    return found


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def protocol_tables(records: list[tuple]) -> str:
    """One table per source: a row per (eps, step rule, T); per method the white-box rate, the
    mean transfer rate, its change against plain and the count of significant cells."""
    all_effects = [e for *_, effects in records for e in effects]
    q = transfer_q_values(all_effects)
    parts = []
    for source in protocol_study.SOURCES:
        mine = [r for r in records if r[1] == source]
        if not mine:
            continue
        methods = [m for m in METHOD_ORDER if m != "SGM" or source in protocol_study.RESIDUAL]
        head = "| ε | step | T | images | " + " | ".join(
            f"{m}: white-box / transfer / L2" if m == "plain" else
            f"{m}: white-box / transfer (Δ, sig. +/−) / L2" for m in methods) + " |"
        lines = [f"**{source}**", "", head, "|---:|---|---:|---:|" + "---|" * len(methods)]
        for setting, _, images, rows, effects in mine:
            summary = summarise(rows)
            cells = []
            for method in methods:
                s = summary.get(method)
                if s is None:
                    cells.append("–")
                    continue
                text = f"{_pct(s['white_box'])} / {_pct(s['transfer'])}"
                if method != "plain" and "plain" in summary and s["transfer"] is not None:
                    delta = s["transfer"] - summary["plain"]["transfer"]
                    mine_e = [e for e in effects if effect_method(e) == method
                              and is_transfer(e.source, e.target)]
                    up = sum(q[id(e)] < ALPHA and e.comparison.difference > 0 for e in mine_e)
                    down = sum(q[id(e)] < ALPHA and e.comparison.difference < 0 for e in mine_e)
                    text += f" ({100 * delta:+.1f}, {up}/{down})"
                cells.append(f"{text} / {l2_text(s['l2'])}")
            rule = "ε/T" if setting.rule == "eps/T" else "1"
            lines.append(f"| {setting.eps} | {rule} | {setting.steps} | {images} | "
                         + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def not_run(records: list[tuple]) -> str:
    """The (protocol, source) cells of the full grid that have no record, one line per source."""
    done = {(setting, source) for setting, source, *_ in records}
    lines = []
    for source in protocol_study.SOURCES:
        missing = [s.label for s in protocol_study.all_settings() if (s, source) not in done]
        if missing:
            lines.append(f"- {source}: " + "; ".join(missing))
    return ("Not run (the session's CPU budget ran out first):\n\n" + "\n".join(lines)
            if lines else "")


def iterations_figure(records: list[tuple], path: Path) -> None:
    """Mean transfer (solid) and white-box (thin) success against T, per source and eps; step
    eps/T left, fixed 1 level right."""
    colours = {"plain": "tab:gray", "SGM": "tab:blue", "LinBP": "tab:red", "BPA": "tab:green"}
    sources = [s for s in protocol_study.SOURCES if any(r[1] == s for r in records)]
    fig, axes = plt.subplots(len(sources), 4, figsize=(16, 3.6 * len(sources)), squeeze=False,
                             sharex=True, sharey=True)
    for i, source in enumerate(sources):
        for j, (eps, rule) in enumerate(((16, "eps/T"), (16, "1"), (8, "eps/T"), (8, "1"))):
            ax = axes[i][j]
            curves: dict[str, list] = defaultdict(list)
            for setting, src, _, rows, _ in records:
                if src != source or setting.eps != eps or setting.rule != rule:
                    continue
                for method, s in summarise(rows).items():
                    curves[method].append((setting.steps, s["transfer"], s["white_box"]))
            for method, points in curves.items():
                points.sort()
                ts = [p[0] for p in points]
                ax.plot(ts, [100 * p[1] for p in points], "o-", color=colours[method],
                        label=f"{method} transfer")
                ax.plot(ts, [100 * p[2] for p in points], ":", color=colours[method], lw=1,
                        label=f"{method} white-box")
            ax.set_xscale("log")
            ax.set_xticks(protocol_study.ITERATIONS, [str(t) for t in protocol_study.ITERATIONS])
            ax.set_title(f"{source}: ε {eps}, step {'ε/T' if rule == 'eps/T' else '1 level'}",
                         fontsize=10)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("success (%)")
            if i == len(sources) - 1:
                ax.set_xlabel("iterations T")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle("I-FGSM on the Fashion-MNIST zoo: mean transfer over the other 7 plain targets "
                 "(solid) and white-box (dotted)", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def companion_records(out: Path, suffix: str) -> list[dict]:
    import json

    found = []
    for budget in (companion_study.BUDGET, None):
        path = out / f"{companion_study.folder_name(budget)}{suffix}.json"
        if path.is_file():
            found.append(json.loads(path.read_text()))
    return found


def companion_table(records: list[dict]) -> str:
    """Per budget and attack: iterations, gradient evaluations, white-box and mean transfer with
    and without SGM, SGM's change, the change against MI, and the mean L2."""
    paired = [companion_study.effects_of(record) for record in records]
    q = transfer_q_values([e for against_mi, sgm in paired for e in against_mi + sgm])
    lines = ["| budget | attack | T | grad. evals / image | no SGM: white-box / transfer / L2 | "
             "vs MI (Δ, sig. +/−) | SGM: white-box / transfer / L2 | SGM's Δ (sig. +/−) | "
             "vs MI+SGM (Δ, sig. +/−) |",
             "|---|---|---:|---:|---|---|---|---|---|"]
    for record, (against_mi, sgm) in zip(records, paired):
        rows = [TransferRow.from_json(r) for r in record["rows"]]
        budget = ("10 iterations" if record["budget"] is None
                  else f"≈{record['budget']} evaluations")
        for attack in companion_study.ATTACKS:
            cost = record["cost"][attack]
            cells = []
            for gamma in (None, companion_study.GAMMA):
                mine = [r for r in rows if r.attack == attack and r.sgm == gamma]
                transfer = [r.success_rate for r in mine if is_transfer(r.source, r.target)]
                white = [r.success_rate for r in mine
                         if short_name(r.target) == short_name(r.source)]
                size = next((r.mean_l2 for r in mine if getattr(r, "mean_l2", None)), None)
                mean = sum(transfer) / len(transfer) if transfer else None
                cells.append((white[0] if white else None, mean, size))
            vs_mi = [_counted([e for e in against_mi if e.method == attack and e.gamma == g], q)
                     if attack != "mi" else "–" for g in (None, companion_study.GAMMA)]
            sgm_delta = _counted([e for e in sgm if e.attack == attack], q)
            (w0, t0, l0), (w1, t1, l1) = cells
            lines.append(f"| {budget} | {attack} | {cost['steps']} | {cost['gradient_evaluations']} "
                         f"| {_pct(w0)} / {_pct(t0)} / {l2_text(l0)} | {vs_mi[0]} | "
                         f"{_pct(w1)} / {_pct(t1)} / {l2_text(l1)} | {sgm_delta} | {vs_mi[1]} |")
    return "\n".join(lines)


def _counted(effects: list, q: dict) -> str:
    """Mean change over the transfer targets (points) and significant gains/losses."""
    transfer = [e for e in effects if is_transfer(e.source, e.target)]
    if not transfer:
        return "–"
    delta = sum(e.comparison.difference for e in transfer) / len(transfer)
    up = sum(q[id(e)] < ALPHA and e.comparison.difference > 0 for e in transfer)
    down = sum(q[id(e)] < ALPHA and e.comparison.difference < 0 for e in transfer)
    return f"{100 * delta:+.1f} ({up}/{down})"


def compute_figure(companions: list[dict], protocol: list[tuple], path: Path) -> None:
    """Mean transfer against gradient evaluations per image: each companion at 10 iterations and
    at the common budget (joined), with and without SGM; I-FGSM's curve from the protocol study
    (same source, eps 16, step eps/T) for scale."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    cmap = plt.get_cmap("tab10")
    for k, (ax, gamma) in enumerate(zip(axes, (None, companion_study.GAMMA))):
        for i, attack in enumerate(companion_study.ATTACKS):
            points = []
            for record in companions:
                rows = [TransferRow.from_json(r) for r in record["rows"]]
                rates = [r.success_rate for r in rows if r.attack == attack and r.sgm == gamma
                         and is_transfer(r.source, r.target)]
                if rates:
                    points.append((record["cost"][attack]["gradient_evaluations"],
                                   100 * sum(rates) / len(rates), record["budget"]))
            points.sort()
            if points:  # at the common budget (square) and at 10 iterations (circle), joined
                ax.plot([p[0] for p in points], [p[1] for p in points], "-", color=cmap(i),
                        label=attack)
                for x, y, budget in points:
                    ax.plot([x], [y], "s" if budget else "o", color=cmap(i))
        ifgsm = sorted((setting.steps, summarise(rows).get("SGM" if gamma else "plain"))
                       for setting, source, _, rows, _ in protocol
                       if f"zoo:fmnist-{source}" == companion_study.SOURCE and setting.eps == 16
                       and setting.rule == "eps/T")
        ifgsm = [(t, s) for t, s in ifgsm if s]
        if ifgsm:
            ax.plot([t for t, _ in ifgsm], [100 * s["transfer"] for _, s in ifgsm], "s--",
                    color="black", lw=1, label="I-FGSM (protocol grid)")
        ax.set_xscale("log")
        ax.set_xlabel("gradient evaluations per image")
        ax.set_title(f"{short_name(companion_study.SOURCE)}, ε 16, step ε/T, "
                     + ("no SGM" if gamma is None else f"SGM γ={gamma:g}")
                     + f"\n● 10 iterations   ■ ≈{companion_study.BUDGET} evaluations",
                     fontsize=10)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.set_ylabel("mean transfer success over 7 plain targets (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", type=Path, default=Path("runs/protocol"))
    parser.add_argument("--companions", type=Path, default=Path("runs/companions"))
    parser.add_argument("--replication", action="store_true",
                        help="the seed-1 records (written by the studies' --replication)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    suffix = f".seed{SEED}" if args.replication else ""
    protocol = protocol_records(args.protocol, suffix)
    companions = companion_records(args.companions, suffix)
    tables = protocol_tables(protocol)
    companion = companion_table(companions) if companions else ""
    details = "\n".join(["<details><summary>Every paired comparison (rates, 95% Newcombe "
                         "interval, discordant images, uncorrected McNemar p)</summary>", "",
                         effects_markdown([e for *_, effects in protocol for e in effects]),
                         "</details>"])
    print(tables, "\n", companion, sep="")
    if not args.write_docs:
        return
    name = "protocol replication" if args.replication else "protocol"
    replace_section(f"{name} tables", f"{not_run(protocol)}\n\n{tables}\n\n{details}", PAGE)
    if not args.replication:
        iterations_figure(protocol, ROOT / "docs" / "protocol_iterations.png")
        if companions:
            replace_section("companion tables", companion, PAGE)
            compute_figure(companions, protocol, ROOT / "docs" / "protocol_compute.png")
    else:
        replace_section("companion replication tables", companion, PAGE)


if __name__ == "__main__":
    main()
