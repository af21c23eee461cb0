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
from skipgrad.units import l2_text

CSV_COLUMNS = ("source", "attack", "sgm", "target", "success_rate", "n", "ci95_low", "ci95_high",
               "backward", "clean_accuracy", "clean_correct", "success_rate_on_correct",
               "successes_on_correct", "forward", "mean_l2")


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
    # Mean L2 of the n saved perturbations, in [0, 1] pixel units (None: not recorded); the same
    # for every target of one attack folder.
    mean_l2: float | None = None

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
                   forward=tuple(record.get("forward", ())),
                   mean_l2=None if record.get("mean_l2") is None else float(record["mean_l2"]))


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
                         _csv_count(r.successes_on_correct), "+".join(r.forward),
                         _csv_rate(r.mean_l2)])
    return buffer.getvalue()


def _csv_rate(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _csv_count(value: int | None) -> str:
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[TransferRow], title: str | None = None,
                   fold: bool = True) -> str:
    """Matrix as a Markdown table: success rate (%) with its 95% Wilson interval per cell, a last
    row with each target's clean accuracy, and the success rate on the images each target
    classified correctly when clean (folded unless ``fold`` is off): both denominators, as
    ``evaluate`` prints them."""
    keys, targets, cells = matrix(rows)
    sized = any(r.mean_l2 is not None for r in rows)
    lines = _matrix_lines(keys, targets, cells, _md_cell, sized)
    known = any(r.clean_correct is not None for r in rows)
    if known:
        lines.append("| | *clean accuracy* | " + ("| " if sized else "") + " | ".join(
            _clean_cell([r for r in rows if r.target == t]) for t in targets) + " |")
    n = sorted({r.n for r in rows})
    note = (f"\nSuccess rate = 1 − top-1 accuracy of the target on the adversarial images, all "
            f"images counted (n = {', '.join(map(str, n))}); brackets: Wilson 95% interval.")
    if sized:
        note += (" Mean L2: the mean L2 norm of the saved perturbations, in [0, 1] pixel units "
                 "(levels / 255, over every channel and pixel).")
    if known:
        note += (" Clean accuracy: the target's top-1 accuracy on the clean originals of the same "
                 "images (k/n correct).")
    if any("+smooth:" in t for t in targets):
        note += (" A smoothed target (`+smooth:`) that abstains counts as not fooled on an "
                 "adversarial image and as not correct on a clean one.")
    text = (f"## {title}\n\n" if title else "") + "\n".join(lines) + "\n" + note + "\n"
    return text + (_on_correct_table(keys, targets, cells, fold) if known else "")


@dataclass(frozen=True)
class OnCorrect:
    """One target's two denominators over the rows of a matrix, as display text: ranges
    (``lo–hi``) over the rows, one value when they agree."""

    target: str
    clean: str  # clean accuracy, e.g. ``71.9% (23/32)``
    headline: str  # success on all images (%)
    on_correct: str  # success on the images it classified correctly when clean (%)
    fooled: str  # ``0 of 23`` (empty when the rows have different clean-correct counts)


def on_correct_spans(rows: Sequence[TransferRow]) -> list[OnCorrect]:
    """Per target with clean counts, in matrix order: see :class:`OnCorrect`."""
    found = []
    for target in _ordered(r.target for r in rows):
        own = [r for r in rows if r.target == target]
        known = [r for r in own if r.success_rate_on_correct is not None]
        if not known:
            continue
        counts = {r.clean_correct for r in known}
        fooled = _span([r.successes_on_correct for r in known], "{:d}")
        found.append(OnCorrect(target, _clean_text(own),
                               _span([100 * r.success_rate for r in own]),
                               _span([100 * r.success_rate_on_correct for r in known]),
                               f"{fooled} of {counts.pop()}" if len(counts) == 1 else ""))
    return found


ON_CORRECT_NOTE = ("Success on all images beside success on the images each target classified "
                   "correctly when clean (range over the rows of the matrix); a headline well "
                   "above the second number is mostly the target's own clean errors.")


def on_correct_summary(rows: Sequence[TransferRow], source: str | None = None) -> list[str]:
    """Plain lines, one per target: its clean accuracy, the headline success (all images) and the
    success on the images it classified correctly when clean, each as the range over the rows.
    A target that misclassifies clean images counts them as successes in the headline (an
    adversarially trained model at 28.1% may have fooled none of the images it got right), so
    the two numbers are read together. Empty when no row has clean counts."""
    lines = []
    for span in on_correct_spans(rows):
        of = f" ({span.fooled})" if span.fooled else ""
        role = " (the source: white-box)" if span.target == source else ""
        lines.append(f"- `{short_name(span.target)}`{role}, clean accuracy {span.clean}: "
                     f"{span.headline}% of all images; {span.on_correct}% of the images it "
                     f"classified correctly when clean{of}.")
    return [ON_CORRECT_NOTE + "\n", *lines] if lines else []


def _clean_text(rows: Sequence[TransferRow]) -> str:
    """``71.9% (23/32)``, or the per-n figures of :func:`_clean_cell` when the rows differ."""
    seen = _ordered((r.clean_correct, r.n) for r in rows if r.clean_correct is not None)
    if len(seen) == 1 and seen[0][1]:
        (k, n), = seen
        return f"{100 * k / n:.1f}% ({k}/{n})"
    return f"(%) {_clean_cell(rows)}"


def _span(values: Sequence, fmt: str = "{:.1f}") -> str:
    """``lo–hi`` of the values, or the one value when they agree."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def _clean_cell(rows: Sequence[TransferRow]) -> str:
    """A target's clean accuracy over its rows: one figure when they agree (the same images)."""
    seen = _ordered((r.clean_correct, r.n) for r in rows if r.clean_correct is not None)
    return ", ".join(f"{100 * k / n:.1f} ({k}/{n})" if n else "–" for k, n in seen) or "–"


def _matrix_lines(keys: list, targets: list[str], cells: dict,
                  cell: Callable[[TransferRow | None], str], sized: bool = False) -> list[str]:
    """Header, alignment row and one row per (source, attack) of a source x target matrix; with
    ``sized``, a ``mean L2`` column after the attack (one folder per row: the same for every
    target, the source's white-box cell included)."""
    size = ["mean L2"] if sized else []
    lines = ["| " + " | ".join(["source", "attack", *size, *(f"`{t}`" for t in targets)]) + " |",
             "|" + "---|" * 2 + "---:|" * (len(size) + len(targets))]
    for key in keys:
        row = [cells.get((key, t)) for t in targets]
        size = [l2_text(row_l2(row))] if sized else []
        values = [f"`{key[0]}`", key[1], *size, *map(cell, row)]
        lines.append("| " + " | ".join(values) + " |")
    return lines


def row_l2(cells: Sequence[TransferRow | None]) -> float | None:
    """The mean L2 of one matrix row (one attack folder), from whichever of its cells has it."""
    return next((c.mean_l2 for c in cells if c is not None and c.mean_l2 is not None), None)


def _on_correct_table(keys: list, targets: list[str], cells: dict, fold: bool = True) -> str:
    """The success rate among the images each target classified correctly when clean, with
    that denominator in every cell, folded under a summary line (or under a caption)."""
    lines = "\n".join(_matrix_lines(keys, targets, cells, _on_correct_cell))
    caption = ("Success rate (%) on the images each target classified correctly when clean "
               "(m/k: fooled / clean-correct)")
    if not fold:
        return f"\n{caption}:\n\n{lines}\n"
    return f"\n<details><summary>{caption}</summary>\n\n{lines}\n\n</details>\n"


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
    """Render the matrix as a heatmap with the value printed in every cell; returns PNG bytes.

    Two panels share the colour scale: success over all n images (the headline), and below it
    success over the images each target classified correctly when clean (``m/k`` in each cell;
    the tick labels give each target's clean accuracy). A target that misclassifies many clean
    images shows a headline well above zero that the second panel can reveal as a floor (e.g.
    28.1% of all images against 0 of the 23 it got right). Rows without clean counts (older
    ``transfer.json`` files) draw the first panel only."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and safe in threads/CI
    import matplotlib.pyplot as plt

    keys, targets, cells = matrix(rows)
    sources = _ordered(s for s, _ in keys)
    # One source: named once, in the first panel's title, so each row label is just its attack
    # and the axis label stays short enough for a panel of two rows.
    one = f"; source {short_name(sources[0])}" if len(sources) == 1 else ""
    labels = ([m for _, m in keys] if one else [f"{short_name(s)}  {m}" for s, m in keys])
    n = ", ".join(map(str, sorted({r.n for r in rows})))
    panels = [(_panel_values(keys, targets, cells, lambda r: r.success_rate),
               f"all images (n = {n}): the headline rate{one}", None)]
    if any(r.success_rate_on_correct is not None for r in rows):
        panels.append((_panel_values(keys, targets, cells, lambda r: r.success_rate_on_correct),
                       "only the images the target classified correctly when clean\n"
                       "(cells: % and fooled/correct)",
                       lambda r: f"{r.successes_on_correct}/{r.clean_correct}"))
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, sharex=True, dpi=110,
                             figsize=(2.0 + 1.25 * len(targets),
                                      0.7 + (0.7 + 0.5 * len(keys)) * len(panels)))
    for ax, (values, subtitle, counts) in zip(axes[:, 0], panels):
        image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        _annotate(ax, values, [[cells.get((k, t)) for t in targets] for k in keys], counts)
        ax.set_yticks(range(len(keys)), labels, fontsize=9)
        ax.set_title(subtitle, fontsize=9.5, loc="left")
        ax.set_ylabel("attack" if one else "source, attack")
        # One bar per panel, the same 0-100 scale: a bar shared by both would crowd the titles.
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label("success (%)")
    bottom = axes[-1, 0]
    bottom.set_xticks(range(len(targets)), [_target_label(t, rows, len(panels) > 1)
                                            for t in targets], rotation=30, ha="right", fontsize=9)
    bottom.set_xlabel("target model")
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(hspace=0.3)  # room for the second panel's two-line title
    buffer = io.BytesIO()
    # A tight bounding box instead of tight_layout: long spec labels widen the canvas, never clip.
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return buffer.getvalue()


def _panel_values(keys: list, targets: list[str], cells: dict,
                  rate: Callable[[TransferRow], float | None]) -> np.ndarray:
    """Percentages of one panel, NaN where a cell or its rate is missing."""
    def value(row: TransferRow | None) -> float:
        found = None if row is None else rate(row)
        return np.nan if found is None else 100 * found
    return np.array([[value(cells.get((k, t))) for t in targets] for k in keys], dtype=float)


def _target_label(target: str, rows: Sequence[TransferRow], with_clean: bool) -> str:
    """A target's tick label; with its clean accuracy when all its rows share one (same images)."""
    seen = {(r.clean_correct, r.n) for r in rows if r.target == target and r.clean_correct is not None}
    if not with_clean or len(seen) != 1:
        return short_name(target)
    (k, n), = seen
    return f"{short_name(target)} (clean {100 * k / n:.1f}%)" if n else short_name(target)


def _annotate(ax, values: np.ndarray, cells: list[list[TransferRow | None]],
              counts: Callable[[TransferRow], str] | None) -> None:
    # Dark text on the bright end of viridis, white on the dark end, so every value stays legible.
    for (i, j), value in np.ndenumerate(values):
        if value == value:  # skip NaN (missing cells)
            text = f"{value:.1f}" + (f"\n{counts(cells[i][j])}" if counts else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8.5 if counts else 9,
                    linespacing=1.1, color="black" if value > 60 else "white")


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


def effects_table(effects: Sequence[SGMEffect | BackwardEffect],
                  q_values: dict[int, float] | None = None) -> tuple[list[str], list[list[str]]]:
    """The paired-effects table as (header, rows of cell text): percentage points, 95% interval,
    McNemar p, and with ``q_values`` (from :func:`transfer_q_values`) the Benjamini-Hochberg q
    (``-`` for white-box cells, outside the family). Markdown and HTML render these same cells."""
    sgm = all(isinstance(e, SGMEffect) for e in effects)
    what = "SGM" if sgm else "method"
    header = ["source", "attack", "γ" if sgm else "method", "target", f"without {what}",
              f"with {what}", "Δ (points)", "95% CI (Newcombe)", "only w/o / only with",
              "McNemar p"] + (["BH q"] if q_values is not None else [])
    rows = []
    for e in effects:
        c = e.comparison
        lo, hi = c.ci95
        key = f"{e.gamma:g}" if isinstance(e, SGMEffect) else e.method
        rows.append([short_name(e.source), e.variant, key, short_name(e.target),
                     f"{100 * c.rate_a:.1f}", f"{100 * c.rate_b:.1f}", f"{100 * c.difference:+.1f}",
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}]", f"{c.only_a} / {c.only_b}",
                     f"{c.p_value:.2g}"] + _q_cell(q_values, e))
    return header, rows


# Column alignment of :func:`effects_table` (True: numeric, right-aligned), BH q last.
EFFECT_NUMERIC = (False, False, True, False, True, True, True, False, True, True, True)


def effects_markdown(effects: Sequence[SGMEffect | BackwardEffect],
                     q_values: dict[int, float] | None = None) -> str:
    """:func:`effects_table` as a Markdown table."""
    header, rows = effects_table(effects, q_values)
    rule = "|" + "".join("---:|" if EFFECT_NUMERIC[i] else "---|" for i in range(len(header)))
    return "\n".join(["| " + " | ".join(header) + " |", rule,
                      *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"


def _q_cell(q_values: dict[int, float] | None, effect: object) -> list[str]:
    if q_values is None:
        return []
    q = q_values.get(id(effect))
    return [f"{q:.2g}" if q is not None else "-"]


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
