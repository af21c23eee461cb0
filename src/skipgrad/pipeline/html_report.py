"""``report.html``: one self-contained page per experiment folder (``demo``, ``transfer``, ``sweep``).

The page needs nothing but itself: every figure is embedded as a ``data:`` URI, the CSS is inline,
there is no script, and a Content-Security-Policy forbids any other resource, so it opens the same
from a laptop, a mail attachment or an archive. It shows

- the figures (the transfer heatmap with both denominators, the sweep curves, the demo's examples),
- each target's success on all images beside its success on the images it classified correctly
  when clean (:func:`skipgrad.pipeline.report.on_correct_summary`), and the matrix as a table,
- the paired-effect tables, from the same cells as the Markdown ones
  (:func:`skipgrad.pipeline.report.effects_table`),
- the settings of the attack folders (their ``run.json`` config, values as
  :func:`skipgrad.store.records.shown` prints them) and the weights used (spec and sha256).

Every string that reaches the page goes through :func:`html.escape`.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

from skipgrad.analysis.effects import backward_effects, sgm_effects, transfer_q_values
from skipgrad.pipeline.report import (EFFECT_NUMERIC, ON_CORRECT_NOTE, TransferRow, effects_table,
                                      matrix, on_correct_spans, row_l2, short_name)
from skipgrad.store.atomic import atomic_write_text
from skipgrad.units import l2_text
from skipgrad.store.records import read_run, shown

# Nothing but embedded images and the inline style may load; a stray external reference fails
# in the browser instead of silently fetching.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1f24;
       margin: 0 auto; padding: 1.2em 1.6em 3em; max-width: 1180px; }
h1 { font-size: 1.55em; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.2em; margin: 1.8em 0 0.5em; padding-bottom: 0.2em; border-bottom: 1px solid #d0d7de; }
p.lead { color: #3d444d; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.9em; margin-top: 0.3em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.55em; vertical-align: top; }
td { white-space: nowrap; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td .second { display: block; color: #57606a; font-size: 0.92em; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em; }
td.mono { word-break: break-all; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
ul.summary li { margin: 0.15em 0; }
details summary { cursor: pointer; color: #0969da; }
"""


def e(value: object) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape(str(value), quote=True)


def write_html_report(out: Path, *, title: str, rows: Sequence[TransferRow],
                      outcomes: dict | None = None, folders: Sequence[Path] = (),
                      target_weights: dict[str, str | None] | None = None,
                      figures: Sequence[tuple[Path, str]] = (), intro: Sequence[str] = (),
                      summary: str | None = None, source: str | None = None,
                      readings: dict[str, Sequence[str]] | None = None,
                      later: Sequence[tuple[str, Path, str]] = ()) -> Path:
    """Write ``out/report.html`` and return its path.

    ``figures``: (PNG file, caption) pairs of the success section, embedded in order; ``intro``:
    plain-text paragraphs under the title; ``summary``: preformatted text (e.g. the sweep's
    best-gamma table); ``outcomes``: per-image success by cell, for the paired-effect tables;
    ``readings``: plain sentences over an effects table, by family (``SGM``, ``backward-pass
    methods``); ``later``: (heading, PNG, caption) sections after the effects (the demo's
    examples); ``folders``: the attack folders, whose run.json gives the settings and the source
    weights; ``target_weights``: target spec -> sha256 of its weights; ``source``: the single
    source, marked white-box in the summary.
    """
    page = render_page(title, [
        *(f"<p class=\"lead\">{e(text)}</p>" for text in intro),
        section("Success: all images and clean-correct images", [
            *(figure_html(path, caption) for path, caption in figures),
            summary_html(rows, source),
            f"<pre>{e(summary)}</pre>" if summary else "",
            matrix_html(rows)]),
        *effect_sections(outcomes or {}, readings or {}),
        *(section(heading, [figure_html(path, caption)]) for heading, path, caption in later),
        section("Settings", [settings_html(folders)]),
        section("Weights", [weights_html(folders, target_weights or {})])])
    path = Path(out) / "report.html"
    atomic_write_text(path, page)
    return path


def render_page(title: str, parts: Iterable[str]) -> str:
    """A whole HTML document: ``parts`` are HTML fragments, already escaped."""
    from skipgrad import __version__

    return "\n".join([
        "<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{e(CSP)}\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>{e(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{e(title)}</h1>", *parts,
        f"<p class=\"lead\"><small>Written by skipgrad {e(__version__)}.</small></p>",
        "</body>", "</html>", ""])


def section(heading: str, parts: Iterable[str]) -> str:
    """An <h2> section of HTML fragments (empty ones dropped)."""
    return f"<h2>{e(heading)}</h2>\n" + "\n".join(p for p in parts if p)


def figure_html(path: Path, caption: str) -> str:
    """The PNG at ``path`` embedded as a data: URI, with its caption as alt text too."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{e(caption)}\">"
            f"<figcaption>{e(caption)}</figcaption></figure>")


def summary_html(rows: Sequence[TransferRow], source: str | None) -> str:
    """Each target's success on all images beside its success on the clean-correct images."""
    spans = on_correct_spans(rows)
    if not spans:
        return ""
    body = [[short_name(s.target) + (" (source, white-box)" if s.target == source else ""),
             s.clean, s.headline, s.on_correct, s.fooled] for s in spans]
    return f"<p>{e(ON_CORRECT_NOTE)}</p>" + table_html(
        ["target", "clean accuracy", "success, all images (%)",
         "success, clean-correct images (%)", "fooled of clean-correct"],
        body, ["", "num", "num", "num", "num"])


def matrix_html(rows: Sequence[TransferRow]) -> str:
    """The matrix, folded: per cell the success with its Wilson interval, and under it the
    success on the clean-correct images (fooled/correct)."""
    if not rows:
        return ""
    keys, targets, cells = matrix(rows)
    sized = any(r.mean_l2 is not None for r in rows)  # one folder per row: its mean L2
    body = [[e(short_name(s)), e(m),
             *([e(l2_text(row_l2([cells.get(((s, m), t)) for t in targets])))] if sized else []),
             *(_matrix_cell(cells.get(((s, m), t))) for t in targets)] for s, m in keys]
    head = ["source", "attack", *(["mean L2"] if sized else []), *map(short_name, targets)]
    table = table_html(head, body, ["", ""] + ["num"] * (len(head) - 2), escaped=True)
    size = ("; mean L2: of the saved perturbations, in [0, 1] pixel units" if sized else "")
    return ("<details><summary>The matrix as a table (success % [Wilson 95% interval]; below: "
            f"% of the images the target classified correctly when clean, fooled/correct{size})"
            f"</summary>{table}</details>")


def _matrix_cell(row: TransferRow | None) -> str:
    if row is None:
        return "–"
    lo, hi = row.ci95
    text = e(f"{100 * row.success_rate:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
    if row.success_rate_on_correct is not None:
        text += _second(f"{100 * row.success_rate_on_correct:.1f} "
                       f"({row.successes_on_correct}/{row.clean_correct})")
    return text


def _second(text: str) -> str:
    return f"<span class=\"second\">{e(text)}</span>"


def effect_sections(outcomes: dict, readings: dict[str, Sequence[str]]) -> list[str]:
    """One section per family of paired effects (SGM; backward-pass methods) in ``outcomes``,
    each under its ``readings`` (plain sentences, a list)."""
    sections = []
    for name, effects in (("SGM", sgm_effects(outcomes)),
                          ("backward-pass methods", backward_effects(outcomes))):
        if not effects:
            continue
        header, cells = effects_table(effects, transfer_q_values(effects))
        items = "".join(f"<li>{e(line.removeprefix('- '))}</li>" for line in readings.get(name, ()))
        sections.append(section(f"Paired effects of {name} (same images)", [
            f"<ul class=\"summary\">{items}</ul>" if items else "",
            table_html(header, cells, ["num" if n else "" for n in EFFECT_NUMERIC[:len(header)]]),
            "<p>Δ is success with minus without, in percentage points; 95% CI (Newcombe): "
            "Newcombe's hybrid score interval for paired proportions; McNemar's exact test on the "
            "images fooled by one variant only; BH q: Benjamini-Hochberg over the transfer "
            "comparisons of the table (white-box cells: -).</p>"]))
    return sections


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]],
               classes: Sequence[str] = (), escaped: bool = False) -> str:
    """A table; ``classes`` per column (``num``: right-aligned figures, ``mono``: hashes); cells
    are escaped here unless ``escaped`` says the caller built them as HTML."""
    opening = [f"<td class=\"{e(c)}\">" if c else "<td>"
               for c in list(classes) or [""] * len(header)]
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"{opening[i]}{cell if escaped else e(cell)}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return (f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _configs(folders: Sequence[Path]) -> list[tuple[Path, dict]]:
    found = []
    for folder in folders:
        run = read_run(Path(folder))
        if run is not None:
            found.append((Path(folder), run))
    return found


def settings_html(folders: Sequence[Path]) -> str:
    """The folders' run.json config: the settings every folder shares, then per folder those
    that differ (weights hashes are in the weights section)."""
    runs = _configs(folders)
    if not runs:
        return "<p>No attack folder with a run.json.</p>"
    configs = [{k: v for k, v in run.get("config", {}).items() if k != "weights_sha256"}
               for _, run in runs]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    shared = [k for k in keys if all(k in c and c[k] == configs[0][k] for c in configs)]
    differ = [k for k in keys if k not in shared]
    unit = runs[0][1].get("environment", {}).get("eps_unit")
    parts = [f"<p>{len(runs)} attack folder{'s' if len(runs) > 1 else ''} under "
             f"<code>attacks/</code>" + (f"; eps and step_size in {e(unit)}" if unit else "")
             + ".</p>",
             _pairs_table([(k, shown(configs[0][k])) for k in shared])]
    if differ:
        parts.append(table_html(["folder", *differ],
                                [[folder.name, *(shown(c.get(k)) for k in differ)]
                                 for (folder, _), c in zip(runs, configs)]))
    return "\n".join(parts)


def _pairs_table(pairs: Sequence[tuple[str, str]], per_row: int = 3) -> str:
    """Settings every folder shares, ``per_row`` (setting, value) pairs a row, so the table stays
    short."""
    rows = [[cell for pair in pairs[i:i + per_row] for cell in pair]
            for i in range(0, len(pairs), per_row)]
    rows = [row + [""] * (2 * per_row - len(row)) for row in rows]
    return table_html(["setting", "value (every folder)"] + ["setting", "value"] * (per_row - 1),
                      rows, ["", "mono"] * per_row)


def weights_html(folders: Sequence[Path], target_weights: dict[str, str | None]) -> str:
    """Spec, role and sha256 of every model used: sources from the folders' run.json, targets
    as loaded for the evaluation."""
    roles: dict[tuple[str, str], list[str]] = {}
    for _, run in _configs(folders):
        config = run.get("config", {})
        hashes = config.get("weights_sha256") or [None] * len(config.get("sources", []))
        for spec, sha in zip(config.get("sources", []), hashes):
            roles.setdefault((spec, shown(sha)), []).append("source")
    for spec, sha in target_weights.items():
        roles.setdefault((spec, shown(sha)), []).append("target")
    rows = [[spec, ", ".join(dict.fromkeys(r)), sha] for (spec, sha), r in roles.items()]
    if not rows:
        return "<p>No weights recorded.</p>"
    return (table_html(["model", "role", "weights sha256"], rows, ["mono", "", "mono"])
            + "<p>sha256 of the weights file (none: random or built-in weights).</p>")
