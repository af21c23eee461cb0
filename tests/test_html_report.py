"""report.html (skipgrad.pipeline.html_report) and the second denominator in every figure and
summary: self-contained, escaped, the same effect rows as the Markdown tables, settings and weights
from run.json, and a page Chromium opens without an error or a broken image."""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.browser import check_page
from skipgrad.analysis.effects import backward_effects, sgm_effects, transfer_q_values
from skipgrad.analysis.stats import wilson_interval
from skipgrad.pipeline.html_report import write_html_report
from skipgrad.pipeline.report import (TransferRow, effects_markdown, effects_table, heatmap_png,
                                      on_correct_summary)
from skipgrad.store.records import shown

HOSTILE = 'zoo:<img src=x onerror="alert(1)">&'
SHA = "ab" * 32


class Page(HTMLParser):
    """Every start tag with its attributes, and the text of every table cell by table."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _row(source: str, gamma, target: str, fooled: int, correct: int, fooled_correct: int,
         n: int = 32) -> TransferRow:
    return TransferRow(source, "ifgsm", gamma, target, fooled / n, n, wilson_interval(fooled, n),
                       (), correct, fooled_correct)


def _rows() -> list[TransferRow]:
    # The floor of issue #24: an adversarially trained target at 9/32 = 28.1% that fooled none
    # of the 23 images it classified correctly; 9 = its clean errors.
    return [_row("zoo:fmnist-resnet20", g, t, *counts)
            for g in (None, 0.5)
            for t, counts in (("zoo:fmnist-cnn-at", (9, 23, 0)), ("zoo:fmnist-vgg", (7, 28, 3)),
                              (HOSTILE, (20, 30, 18)))]


def _outcomes() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {("zoo:fmnist-resnet20", "ifgsm", g, b, t): torch.rand(32, generator=generator) < 0.4
            for g in (None, 0.5) for b in (None, "linbp")
            for t in ("zoo:fmnist-cnn-at", "zoo:fmnist-vgg", "zoo:fmnist-resnet20")}


def _folder(root: Path, name: str, sgm) -> Path:
    folder = root / "attacks" / name
    folder.mkdir(parents=True)
    config = {"sources": [HOSTILE], "data": "fmnist:test", "attack": "ifgsm", "sgm": sgm,
              "eps": 16.0, "targeted": False, "class_map": None, "weights_sha256": [SHA]}
    (folder / "run.json").write_text(json.dumps(
        {"format": 1, "config": config, "environment": {"eps_unit": "pixel levels out of 255"}}))
    return folder


@pytest.fixture()
def page(tmp_path: Path) -> tuple[Path, str]:
    figure = tmp_path / "transfer_heatmap.png"
    figure.write_bytes(heatmap_png(_rows(), "matrix"))
    folders = [_folder(tmp_path, "a__nosgm", None), _folder(tmp_path, "a__sgm0.5", 0.5)]
    path = write_html_report(tmp_path, title=f"report of {HOSTILE}", rows=_rows(),
                             outcomes=_outcomes(), folders=folders,
                             target_weights={"zoo:fmnist-vgg": "cd" * 32, "zoo:fmnist-cnn+jpeg:75": None},
                             figures=[(figure, f"heatmap <{HOSTILE}>")], intro=[HOSTILE],
                             summary=f"best γ {HOSTILE}", source="zoo:fmnist-resnet20")
    return path, path.read_text(encoding="utf-8")


def test_the_page_loads_nothing_from_outside_and_embeds_its_figures(page) -> None:
    _, text = page
    parsed = Page(text)
    names = {tag for tag, _ in parsed.tags}
    assert not names & {"script", "link", "iframe", "object", "embed", "base"}
    images = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 1 and images[0].startswith("data:image/png;base64,")
    png = base64.b64decode(images[0].removeprefix("data:image/png;base64,"))
    assert png == (Path(page[0]).parent / "transfer_heatmap.png").read_bytes()
    for tag, attrs in parsed.tags:
        for key in ("href", "src", "action", "srcset"):
            assert attrs.get(key) is None or attrs[key].startswith("data:"), (tag, attrs)
    csp = [a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv")]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]


def test_every_string_is_escaped(page) -> None:
    _, text = page
    assert "<img src=x" not in text and 'onerror="alert' not in text
    assert text.count("zoo:&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;") >= 6
    # The parser sees a single <img> (the figure), never one made of a spec.
    assert [t for t, _ in Page(text).tags].count("img") == 1


@pytest.mark.parametrize("family", [sgm_effects, backward_effects])
def test_effect_tables_hold_the_rows_of_the_markdown_tables(page, family) -> None:
    _, text = page
    effects = family(_outcomes())
    header, rows = effects_table(effects, transfer_q_values(effects))
    assert len(rows) == len(effects) == 6  # 3 targets x 2 (with and without the other change)
    tables = [t for t in Page(text).tables if t and t[0] == header]
    assert len(tables) == 1 and tables[0][1:] == rows
    markdown = [[c.strip() for c in line.strip("|").split(" | ")]
                for line in effects_markdown(effects, transfer_q_values(effects)).splitlines()]
    assert markdown[0] == header and markdown[2:] == rows
    assert any(r[-1] == "-" for r in rows) and any(r[-1] != "-" for r in rows)  # white-box: no q


def test_settings_and_weights_come_from_run_json(page) -> None:
    _, text = page
    tables = Page(text).tables
    shared = next(t for t in tables if t[0][:2] == ["setting", "value (every folder)"])
    pairs = {row[i]: row[i + 1] for row in shared[1:] for i in range(0, len(row), 2) if row[i]}
    assert pairs == {"sources": shown([HOSTILE]), "data": "fmnist:test", "attack": "ifgsm",
                     "eps": "16", "targeted": "false", "class_map": "none"}
    per_folder = next(t for t in tables if t[0][0] == "folder")
    assert per_folder == [["folder", "sgm"], ["a__nosgm", "none"], ["a__sgm0.5", "0.5"]]
    weights = next(t for t in tables if t[0] == ["model", "role", "weights sha256"])
    assert weights[1:] == [[HOSTILE, "source", SHA], ["zoo:fmnist-vgg", "target", "cd" * 32],
                           ["zoo:fmnist-cnn+jpeg:75", "target", "none"]]
    assert "pixel levels out of 255" in text


def test_the_summary_puts_the_clean_correct_rate_beside_the_headline(page) -> None:
    lines = on_correct_summary(_rows(), "zoo:fmnist-resnet20")
    at = next(line for line in lines if "fmnist-cnn-at" in line)
    assert at == ("- `fmnist-cnn-at`, clean accuracy 71.9% (23/32): 28.1% of all images; 0.0% "
                  "of the images it classified correctly when clean (0 of 23).")
    table = next(t for t in Page(page[1]).tables if t[0][0] == "target")
    assert table[1:3] == [["fmnist-cnn-at", "71.9% (23/32)", "28.1", "0.0", "0 of 23"],
                          ["fmnist-vgg", "87.5% (28/32)", "21.9", "10.7", "3 of 28"]]
    spread = [_row("s", None, "t", 5, 20, 1), _row("s", 0.5, "t", 8, 20, 4)]
    assert on_correct_summary(spread)[1].endswith(
        ": 15.6–25.0% of all images; 5.0–20.0% of the images it classified correctly when clean "
        "(1–4 of 20).")
    unknown = [TransferRow("s", "ifgsm", None, "t", 0.5, 10, (0.2, 0.8))]
    assert on_correct_summary(unknown) == []


def test_the_heatmap_adds_the_clean_correct_panel() -> None:
    """The second panel is drawn: a taller image whose 0% cells (cnn-at fooled 0 of 23 on the
    clean-correct images; no headline cell is below 21.9%) fill with viridis' darkest colour."""
    import numpy as np

    def measure(rows) -> tuple[int, int]:
        with Image.open(io.BytesIO(heatmap_png(rows))) as image:
            pixels = np.asarray(image.convert("RGB")).astype(int)
        darkest = (np.abs(pixels - (68, 1, 84)).sum(-1) <= 6).sum()  # viridis(0)
        return pixels.shape[0], int(darkest)

    rows = _rows()
    headline_only = [TransferRow(r.source, r.attack, r.sgm, r.target, r.success_rate, r.n, r.ci95)
                     for r in rows]
    (tall, dark), (short, dark_before) = measure(rows), measure(headline_only)
    assert tall > short + 150
    assert dark > dark_before + 2 * 60 * 40  # two cells of at least 60 x 40 pixels


def test_chromium_opens_the_page_without_errors(page) -> None:
    verdict = check_page(page[0])
    assert verdict == {"images": 1, "broken": [], "errors": []}


def test_the_browser_check_sees_broken_images_and_blocked_resources(page, tmp_path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text(page[1].replace("</body>", '<img src="data:image/png;base64,AAAA" alt="corrupt">'
                                              '<img src="https://example.invalid/x.png" alt="far">'
                                              "</body>"), encoding="utf-8")
    verdict = check_page(bad)
    assert verdict["images"] == 3 and verdict["broken"] == ["corrupt", "far"]
    assert any("blocked by CSP: https://example.invalid/x.png" in e for e in verdict["errors"])
