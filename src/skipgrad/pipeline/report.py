"""Transfer matrices as JSON, CSV, Markdown and a heatmap PNG (like Table 1 of Wu et al., 2020).

``transfer.json`` follows docs/design.md, "Output contracts"::

    {"rows": [{"source": SPEC, "attack": "ifgsm", "sgm": null | gamma, "target": SPEC,
               "success_rate": r, "n": n, "ci95": [lo, hi], "backward": [NAME, ...],
               "forward": [NAME, ...], "clean_correct": k, "successes_on_correct": m,
               "clean_accuracy": k / n, "success_rate_on_correct": m / k}, ...]}

``backward`` lists the backward-pass methods of the attack (``[]`` for none), each as its
``METHOD[:key=value]`` label with the settings that differ from the defaults; ``forward`` lists
the forward methods (``--forward``: Ghost networks, IAA) that modified the source the same way. The last four keys
are the second denominator, as ``evaluate`` reports it: ``k`` of the ``n`` clean originals the
target classified correctly (a smoothed target's abstention is not correct), and ``m`` of those
``k`` it got wrong after the attack (null where unknown, e.g. rows read from an older file).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from skipgrad.analysis.effects import BackwardEffect, SGMEffect, transfer_q_values
from skipgrad.store.atomic import atomic_write_bytes, atomic_write_text

CSV_COLUMNS = ("source", "attack", "sgm", "target", "success_rate", "n", "ci95_low", "ci95_high",
               "backward", "clean_accuracy", "clean_correct", "success_rate_on_correct",
               "successes_on_correct", "forward")


@dataclass(frozen=True)
class TransferRow:
    """One cell of a transfer matrix: attack from ``source`` evaluated on ``target``."""

    source: str
    attack: str
    sgm: float | None
    target: str
    success_rate: float
    n: int
    ci95: tuple[float, float]
    backward: tuple[str, ...] = ()
    # The target on the clean originals of the same n images: how many it classified correctly
    # (an abstention is not correct), and how many of those the attack then fooled.
    clean_correct: int | None = None
    successes_on_correct: int | None = None
    forward: tuple[str, ...] = ()  # forward methods that modified the source (--forward)

    @property
    def clean_accuracy(self) -> float | None:
        """Clean top-1 accuracy of the target on the n images (None: not recorded)."""
        return None if self.clean_correct is None or not self.n else self.clean_correct / self.n

    @property
    def success_rate_on_correct(self) -> float | None:
        """Success among the images the target classified correctly when clean (None: not
        recorded, or no such image)."""
        if not self.clean_correct or self.successes_on_correct is None:
            return None
        return self.successes_on_correct / self.clean_correct

    @property
    def method(self) -> str:
        """Row label of the matrix: the attack, its backward-pass and forward methods, its SGM
        gamma if any."""
        label = "+".join((self.attack, *self.backward, *self.forward))
        return label if self.sgm is None else f"{label}+sgm (γ={self.sgm:g})"

    def to_json(self) -> dict:
        record = asdict(self)
        record["ci95"] = list(self.ci95)
        record["backward"] = list(self.backward)
        record["forward"] = list(self.forward)
        record["clean_accuracy"] = self.clean_accuracy
        record["success_rate_on_correct"] = self.success_rate_on_correct
        return record

    @classmethod
    def from_json(cls, record: dict) -> "TransferRow":
        counts = (record.get("clean_correct"), record.get("successes_on_correct"))
        return cls(record["source"], record["attack"], record["sgm"], record["target"],
                   float(record["success_rate"]), int(record["n"]), tuple(record["ci95"]),
                   tuple(record.get("backward", ())),
                   *(None if c is None else int(c) for c in counts),
                   forward=tuple(record.get("forward", ())))


def short_name(spec: str) -> str:
    """Compact display name: no family prefix, no torchvision weight tag."""
    name = spec.split(":", 1)[-1]
    if spec.startswith("file:"):
        return Path(name).stem
    if spec.startswith("tv:"):
        name = name.split(".", 1)[0]
    return name


def _ordered(values: Iterable) -> list:
    seen: list = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def matrix(rows: Sequence[TransferRow]) -> tuple[list[tuple[str, str]], list[str], dict]:
    """(row keys (source, method), target columns, {(row key, target): TransferRow}) in first-seen
    order, so the caller's order of sources, attacks and targets is kept."""
    keys = _ordered((r.source, r.method) for r in rows)
    targets = _ordered(r.target for r in rows)
    cells = {((r.source, r.method), r.target): r for r in rows}
    return keys, targets, cells


def transfer_json(rows: Sequence[TransferRow]) -> dict:
    """The ``transfer.json`` document."""
    return {"rows": [r.to_json() for r in rows]}


def read_transfer_json(path: Path) -> list[TransferRow]:
    """Rows back from a ``transfer.json`` file."""
    return [TransferRow.from_json(r) for r in json.loads(Path(path).read_text())["rows"]]


def csv_text(rows: Sequence[TransferRow]) -> str:
    """Long format, one line per (source, attack, sgm, target)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r.source, r.attack, "" if r.sgm is None else r.sgm, r.target,
                         f"{r.success_rate:.6f}", r.n, f"{r.ci95[0]:.6f}", f"{r.ci95[1]:.6f}",
                         "+".join(r.backward), _csv_rate(r.clean_accuracy),
                         _csv_count(r.clean_correct), _csv_rate(r.success_rate_on_correct),
                         _csv_count(r.successes_on_correct), "+".join(r.forward)])
    return buffer.getvalue()


def _csv_rate(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _csv_count(value: int | None) -> str:
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[TransferRow], title: str | None = None) -> str:
    """Matrix as a Markdown table: success rate (%) with its 95% Wilson interval per cell, a last
    row with each target's clean accuracy, and (folded) the success rate on the images each
    target classified correctly when clean: both denominators, as ``evaluate`` prints them."""
    keys, targets, cells = matrix(rows)
    lines = _matrix_lines(keys, targets, cells, _md_cell)
    known = any(r.clean_correct is not None for r in rows)
    if known:
        lines.append("| | *clean accuracy* | " + " | ".join(
            _clean_cell([r for r in rows if r.target == t]) for t in targets) + " |")
    n = sorted({r.n for r in rows})
    note = (f"\nSuccess rate = 1 − top-1 accuracy of the target on the adversarial images, all "
            f"images counted (n = {', '.join(map(str, n))}); brackets: Wilson 95% interval.")
    if known:
        note += (" Clean accuracy: the target's top-1 accuracy on the clean originals of the same "
                 "images (k/n correct).")
    if any("+smooth:" in t for t in targets):
        note += (" A smoothed target (`+smooth:`) that abstains counts as not fooled on an "
                 "adversarial image and as not correct on a clean one.")
    text = (f"## {title}\n\n" if title else "") + "\n".join(lines) + "\n" + note + "\n"
    return text + (_on_correct_table(keys, targets, cells) if known else "")


def _clean_cell(rows: Sequence[TransferRow]) -> str:
    """A target's clean accuracy over its rows: one figure when they agree (the same images)."""
    seen = _ordered((r.clean_correct, r.n) for r in rows if r.clean_correct is not None)
    return ", ".join(f"{100 * k / n:.1f} ({k}/{n})" if n else "–" for k, n in seen) or "–"


def _matrix_lines(keys: list, targets: list[str], cells: dict,
                  cell: Callable[[TransferRow | None], str]) -> list[str]:
    """Header, alignment row and one row per (source, attack) of a source x target matrix."""
    lines = ["| source | attack | " + " | ".join(f"`{t}`" for t in targets) + " |",
             "|" + "---|" * 2 + "---:|" * len(targets)]
    for source, method in keys:
        values = [cell(cells.get(((source, method), t))) for t in targets]
        lines.append(f"| `{source}` | {method} | " + " | ".join(values) + " |")
    return lines


def _on_correct_table(keys: list, targets: list[str], cells: dict) -> str:
    """The success rate among the images each target classified correctly when clean, with
    that denominator in every cell, folded under a summary line."""
    lines = _matrix_lines(keys, targets, cells, _on_correct_cell)
    return ("\n<details><summary>Success rate (%) on the images each target classified correctly "
            "when clean (m/k: fooled / clean-correct)</summary>\n\n" + "\n".join(lines)
            + "\n\n</details>\n")


def _on_correct_cell(row: TransferRow | None) -> str:
    if row is None or row.success_rate_on_correct is None:
        return "–"
    return f"{100 * row.success_rate_on_correct:.1f} ({row.successes_on_correct}/{row.clean_correct})"


def _md_cell(row: TransferRow | None) -> str:
    if row is None:
        return "–"
    lo, hi = row.ci95
    return f"{100 * row.success_rate:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def heatmap_png(rows: Sequence[TransferRow], title: str = "Transfer success rate (%)") -> bytes:
    """Render the matrix as a heatmap with the value printed in every cell; returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and safe in threads/CI
    import matplotlib.pyplot as plt

    keys, targets, cells = matrix(rows)
    values = np.array([[100 * cells[(k, t)].success_rate if (k, t) in cells else np.nan
                        for t in targets] for k in keys])
    fig, ax = plt.subplots(figsize=(2.0 + 1.25 * len(targets), 1.2 + 0.5 * len(keys)), dpi=110)
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    _annotate(ax, values)
    ax.set_xticks(range(len(targets)), [short_name(t) for t in targets],
                  rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(keys)), [f"{short_name(s)}  {m}" for s, m in keys], fontsize=9)
    ax.set_xlabel("target model")
    ax.set_ylabel("source model, attack")
    ax.set_title(title, fontsize=11)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label("success rate (%)")
    buffer = io.BytesIO()
    # A tight bounding box instead of tight_layout: long spec labels widen the canvas, never clip.
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return buffer.getvalue()


def _annotate(ax, values) -> None:
    # Dark text on the bright end of viridis, white on the dark end, so every value stays legible.
    for (i, j), value in np.ndenumerate(values):
        if value == value:  # skip NaN (missing cells)
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=9,
                    color="black" if value > 60 else "white")


def write_transfer_report(rows: Sequence[TransferRow], out: Path,
                          title: str = "Transfer success rate") -> dict[str, Path]:
    """Write transfer.json, transfer.csv, transfer.md and transfer_heatmap.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "transfer.json", "csv": out / "transfer.csv",
             "markdown": out / "transfer.md", "heatmap": out / "transfer_heatmap.png"}
    atomic_write_text(paths["json"], json.dumps(transfer_json(rows), indent=2) + "\n")
    atomic_write_text(paths["csv"], csv_text(rows))
    atomic_write_text(paths["markdown"], markdown_table(rows, title))
    atomic_write_bytes(paths["heatmap"], heatmap_png(rows, f"{title} (%)"))
    return paths


def effects_markdown(effects: Sequence[SGMEffect | BackwardEffect],
                     q_values: dict[int, float] | None = None) -> str:
    """A table of paired effects (SGM, or a backward-pass method): percentage points, 95%
    interval, McNemar p, and with ``q_values`` (from :func:`transfer_q_values`) the
    Benjamini-Hochberg q (``-`` for white-box cells, outside the family)."""
    sgm = all(isinstance(e, SGMEffect) for e in effects)
    what = "SGM" if sgm else "method"
    q_head, q_rule = (" BH q |", "---:|") if q_values is not None else ("", "")
    lines = [f"| source | attack | {'γ' if sgm else 'method'} | target | without {what} | "
             f"with {what} | Δ (points) | 95% CI (Newcombe) | only w/o / only with "
             f"| McNemar p |{q_head}",
             f"|---|---|---:|---|---:|---:|---:|---|---:|---:|{q_rule}"]
    for e in effects:
        c = e.comparison
        lo, hi = c.ci95
        key = f"{e.gamma:g}" if isinstance(e, SGMEffect) else e.method
        lines.append(f"| {short_name(e.source)} | {e.variant} | {key} | {short_name(e.target)} "
                     f"| {100 * c.rate_a:.1f} | {100 * c.rate_b:.1f} | {100 * c.difference:+.1f} "
                     f"| [{100 * lo:+.1f}, {100 * hi:+.1f}] | {c.only_a} / {c.only_b} "
                     f"| {c.p_value:.2g} |" + _q_cell(q_values, e))
    return "\n".join(lines) + "\n"


def _q_cell(q_values: dict[int, float] | None, effect: object) -> str:
    if q_values is None:
        return ""
    q = q_values.get(id(effect))
    return f" {q:.2g} |" if q is not None else " - |"


def summarise_effects(effects: Sequence[SGMEffect | BackwardEffect], source: str) -> list[str]:
    """Plain sentences: per attack and change (SGM, or a backward-pass method), on how many
    transfer targets it helped or hurt significantly, by McNemar's test and after
    Benjamini-Hochberg correction over all the transfer comparisons given."""
    transfer = [e for e in effects if e.target != source]
    q_values = transfer_q_values(transfer)
    sentences = []
    for variant, change in dict.fromkeys((e.variant, e.change) for e in transfer):
        rows = [e for e in transfer if (e.variant, e.change) == (variant, change)]
        better = [e for e in rows if e.comparison.difference > 0 and e.comparison.p_value < 0.05]
        worse = [e for e in rows if e.comparison.difference < 0 and e.comparison.p_value < 0.05]
        mean = 100 * sum(e.comparison.difference for e in rows) / len(rows)
        sentences.append(
            f"- {variant} + {change} vs {variant}: mean change {mean:+.1f} points over "
            f"{len(rows)} transfer targets; significantly better on {len(better)} "
            f"({sum(q_values[id(e)] < 0.05 for e in better)} corrected), significantly worse on "
            f"{len(worse)} ({sum(q_values[id(e)] < 0.05 for e in worse)} corrected).")
    if sentences:
        sentences.append(f"Significant: McNemar's exact test p < 0.05; corrected: Benjamini-Hochberg "
                         f"q < 0.05 over all {len(transfer)} transfer comparisons above.")
    return sentences
