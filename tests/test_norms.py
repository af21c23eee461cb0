"""The perturbation size beside every success rate (#23): each image's L2 and L-inf in manifest.csv,
measured on the saved PNG; the mean L2 in evaluate, transfer, compare, sweep and report.html; and a
long (300-step) attack that resumes to the bytes of an uninterrupted run."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipgrad.cli import main
from skipgrad.data.fmnist import load_fmnist
from skipgrad.pipeline.compare import FolderComparison, comparison_markdown
from skipgrad.pipeline.html_report import matrix_html
from skipgrad.pipeline.report import TransferRow, csv_text, markdown_table
from skipgrad.store import outdir
from skipgrad.store.records import read_manifest

SOURCE = "zoo:fmnist-cnn"
LIMIT = 4
# Two groups of two images under an L-inf 16/255 ball, in steps of one level.
ATTACK = ["attack", "--source", SOURCE, "--data", "fmnist:test", "--limit", str(LIMIT),
          "--batch-size", "2", "--step-size", "1", "--eps", "16", "--quiet"]


def _attack(out: Path, steps: int, *extra: str) -> int:
    return main([*ATTACK, "--steps", str(steps), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("norms") / "run"
    assert _attack(out, 20) == 0
    return out


def _manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _independent_norms(folder: Path, row: dict[str, str]) -> tuple[float, float]:
    """L2 and L-inf in [0, 1] units from the PNG read back with PIL and the clean dataset levels."""
    clean, _ = load_fmnist("test", limit=LIMIT)
    clean_levels = clean[int(row["id"]), 0].mul(255).round().numpy().astype(np.float64)
    saved = np.asarray(Image.open(folder / row["file"]), dtype=np.float64)
    diff = (saved - clean_levels) / 255
    return float(np.sqrt((diff ** 2).sum())), float(np.abs(diff).max())


def test_manifest_norms_are_those_of_the_saved_files_within_eps(run: Path) -> None:
    rows = _manifest(run)
    assert len(rows) == LIMIT and {"l2", "linf"} <= set(rows[0])
    for row in rows:
        l2, linf = _independent_norms(run, row)
        torch.testing.assert_close(float(row["l2"]), l2, rtol=1e-12, atol=0)
        torch.testing.assert_close(float(row["linf"]), linf, rtol=1e-12, atol=0)
        assert 0 < float(row["linf"]) <= 16 / 255 + 1e-12
        # 20 one-level steps under a 16-level ball: the perturbation reaches the ball's edge.
        assert round(float(row["linf"]) * 255) == 16


@pytest.mark.slow  # three 300-step runs of two groups: about a minute on a busy 2-core machine
def test_a_300_step_attack_interrupted_after_its_first_group_resumes_to_the_same_bytes(
        tmp_path: Path, monkeypatch) -> None:
    """Nothing caps --steps: a 300-step run stopped after its first group and resumed writes the
    bytes (and manifest rows) of an uninterrupted one."""
    long_run, out = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert _attack(long_run, 300) == 0
    real = outdir.check_stop

    def stop_after_first_group() -> None:  # Ctrl-C once the first group of two is saved
        if len(read_manifest(out)) >= 2:
            raise KeyboardInterrupt
        real()

    monkeypatch.setattr(outdir, "check_stop", stop_after_first_group)
    assert _attack(out, 300) == 130
    assert len(read_manifest(out)) == 2
    monkeypatch.setattr(outdir, "check_stop", real)
    assert _attack(out, 300) == 0
    assert json.loads((out / "run.json").read_text())["config"]["steps"] == 300
    pngs = sorted(p.relative_to(long_run) for p in long_run.rglob("*.png"))
    assert pngs == sorted(p.relative_to(out) for p in out.rglob("*.png")) and len(pngs) == LIMIT
    for path in pngs:
        assert (out / path).read_bytes() == (long_run / path).read_bytes()
    assert _manifest(out) == _manifest(long_run)  # hashes and norms included


def _evaluate_json(folder: Path, report: Path, capsys) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["evaluate", str(folder), "--target", SOURCE, "--json", str(report),
                 "--quiet"]) == 0
    return json.loads(report.read_text())["targets"][SOURCE], capsys.readouterr().out


def test_evaluate_reports_the_mean_l2_of_the_manifest_beside_the_rate(
        run: Path, tmp_path: Path, capsys) -> None:
    entry, printed = _evaluate_json(run, tmp_path / "eval.json", capsys)
    rows = _manifest(run)
    mean = sum(float(r["l2"]) for r in rows) / len(rows)
    torch.testing.assert_close(entry["mean_l2"], mean, rtol=1e-12, atol=0)
    assert entry["max_linf"] == max(float(r["linf"]) for r in rows)
    header, line = (x for x in printed.splitlines() if x.startswith(("target ", SOURCE)))
    assert "95% CI  mean L2  clean acc" in header and f" {mean:#.3g} " in line, printed
    recorded = json.loads((run / "evaluations.json").read_text())["targets"][SOURCE]
    assert recorded["mean_l2"] == entry["mean_l2"]
    capsys.readouterr()
    assert main(["show", str(run)]) == 0
    assert f"mean L2 {mean:#.3g}" in capsys.readouterr().out
    assert _attack(run, 20) == 0  # resumed, nothing to do: the summary line names it too
    summary = capsys.readouterr().out.rstrip()
    assert "white-box success on the source: " in summary
    assert summary.endswith(f"%; mean L2 {mean:#.3g}"), summary


def _without_norm_columns(folder: Path) -> None:
    """Rewrite manifest.csv as a skipgrad from before the norm columns wrote it."""
    rows = _manifest(folder)
    columns = [c for c in rows[0] if c not in ("l2", "linf")]
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in rows)


def test_a_folder_without_the_norm_columns_evaluates_with_the_mean_l2_of_its_files(
        run: Path, tmp_path: Path, capsys) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "evaluations.json").unlink(missing_ok=True)
    _without_norm_columns(old)
    entry, _ = _evaluate_json(old, tmp_path / "old.json", capsys)
    rows = _manifest(run)
    torch.testing.assert_close(entry["mean_l2"], sum(float(r["l2"]) for r in rows) / len(rows),
                               rtol=1e-12, atol=0)
    assert "l2" not in _manifest(old)[0]  # evaluating never rewrites the manifest


def test_an_old_folder_resumes_keeping_its_rows_and_measures_the_new_ones(
        run: Path, tmp_path: Path, capsys) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old)
    _without_norm_columns(old)
    kept = _manifest(old)
    (old / kept[-1]["file"]).unlink()  # the last image is redone on resumption
    capsys.readouterr()
    assert _attack(old, 20) == 0
    assert "mean L2" not in capsys.readouterr().out  # three of its rows were never measured
    rows = _manifest(old)
    assert [{k: r[k] for k in kept[0]} for r in rows[:-1]] == kept[:-1]
    assert all(r["l2"] == r["linf"] == "" for r in rows[:-1])  # not measured then: left empty
    assert rows[-1] == _manifest(run)[-1]  # the redone image: same bytes, measured


def _row(mean_l2: float | None, target: str = "zoo:fmnist-vgg", sgm: float | None = None
         ) -> TransferRow:
    return TransferRow(SOURCE, "ifgsm", sgm, target, 0.5, 4, (0.15, 0.85), (), 3, 1,
                       mean_l2=mean_l2)


def test_transfer_rows_round_trip_with_and_without_mean_l2() -> None:
    for row in (_row(1.8765), _row(None)):
        assert TransferRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    old = {k: v for k, v in _row(2.0).to_json().items() if k != "mean_l2"}  # an older file
    assert TransferRow.from_json(old).mean_l2 is None
    (line,) = csv.DictReader(csv_text([_row(1.8765)]).splitlines())
    assert float(line["mean_l2"]) == 1.8765


def test_markdown_and_html_matrices_show_each_rows_mean_l2() -> None:
    rows = [_row(1.8765), _row(1.8765, SOURCE), _row(2.5, sgm=0.2), _row(2.5, SOURCE, sgm=0.2)]
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == f"| source | attack | mean L2 | `zoo:fmnist-vgg` | `{SOURCE}` |"
    assert lines[2].startswith(f"| `{SOURCE}` | ifgsm | 1.88 | 50.0 [15.0, 85.0] |")
    assert lines[3].startswith(f"| `{SOURCE}` | ifgsm+sgm (γ=0.2) | 2.50 | 50.0")
    assert lines[4].startswith("| | *clean accuracy* | | 75.0 (3/4) |")
    assert "mean L2" not in markdown_table([_row(None)])  # older rows: no column
    html = matrix_html(rows)
    assert "<th>mean L2</th>" in html.replace(' class="num"', "") and ">1.88<" in html


def test_compare_prints_both_folders_mean_l2() -> None:
    from skipgrad.analysis.stats import paired_comparison

    c = paired_comparison(torch.tensor([True, False, True, False]),
                          torch.tensor([True, True, True, False]))
    text = comparison_markdown(FolderComparison(Path("a"), Path("b"), {}, {}, {"t": c},
                                                {"t": 1.0}, 1.234, 0.5))
    assert "| target | A | mean L2 A | B | mean L2 B |" in text
    assert "| t | 50.0 | 1.23 | 75.0 | 0.500 |" in text


def test_transfer_and_compare_print_the_measured_mean_l2(run: Path, tmp_path: Path,
                                                         capsys) -> None:
    out = tmp_path / "transfer"
    assert main(["transfer", "--source", SOURCE, "--attack", "ifgsm", "--target", SOURCE,
                 "--data", "fmnist:test", "--limit", str(LIMIT), "--batch-size", "2",
                 "--steps", "2", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (row,) = json.loads((out / "transfer.json").read_text())["rows"]
    (folder,) = (out / "attacks").iterdir()
    manifest = _manifest(folder)
    mean = sum(float(r["l2"]) for r in manifest) / len(manifest)
    torch.testing.assert_close(row["mean_l2"], mean, rtol=1e-12, atol=0)
    # The white-box cell's row (the source is the only target) carries it.
    assert f"| `{SOURCE}` | ifgsm | {mean:#.3g} | " in printed, printed
    assert main(["compare", str(folder), str(run), "--target", SOURCE, "--quiet"]) == 0
    long_rows = _manifest(run)
    long_mean = sum(float(r["l2"]) for r in long_rows) / len(long_rows)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"| {SOURCE} "))
    cells = [c.strip() for c in line.split("|")]
    assert (cells[3], cells[5]) == (f"{mean:#.3g}", f"{long_mean:#.3g}")
