"""``skipgrad sweep``: files and their schema, gamma 1.0 as the no-SGM run, best gamma, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from skipgrad.cli import main
from skipgrad.analysis.selection import best_gamma, sweep_gammas
from tests.browser import check_page

SOURCE = "zoo:fmnist-resnet20"
TARGET = "zoo:fmnist-cnn"
CHEAP = ["--data", "fmnist:test", "--limit", "8", "--steps", "2", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    code = main(["sweep", "--source", SOURCE, "--attack", "ifgsm", "--gammas", "0.5,0.2",
                 "--target", TARGET, "--target", SOURCE, "--out", str(out), *CHEAP])
    assert code == 0
    return out


def test_sweep_json_schema(sweep_dir: Path) -> None:
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["source"] == SOURCE and record["attack"] == "ifgsm"
    assert record["data"] == "fmnist:test"
    assert record["gammas"] == [0.2, 0.5, 1.0]  # sorted; 1.0 (no SGM) always included
    assert set(record["targets"]) == {TARGET, SOURCE}
    for curve in record["targets"].values():
        assert set(curve) == {"0.2", "0.5", "1"}
        for point in curve.values():
            assert point["n"] == 8 and 0 <= point["success_rate"] <= 1
            lo, hi = point["ci95"]
            assert lo <= point["success_rate"] <= hi
    # The mean is over transfer targets only: the source's white-box row is left out.
    assert record["mean_over"] == [TARGET]
    assert record["mean"] == {g: p["success_rate"] for g, p in record["targets"][TARGET].items()}


def test_best_gamma_matches_curves(sweep_dir: Path) -> None:
    record = json.loads((sweep_dir / "sweep.json").read_text())
    for target, curve in record["targets"].items():
        top = max(p["success_rate"] for p in curve.values())
        expected = max(float(g) for g, p in curve.items() if p["success_rate"] == top)
        assert record["best"]["targets"][target] == expected
    top = max(record["mean"].values())
    assert record["best"]["mean"] == max(float(g) for g, v in record["mean"].items() if v == top)


def test_sweep_png_and_gamma_one_is_the_baseline_folder(sweep_dir: Path) -> None:
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folders = sorted(p.name.split("__")[-1] for p in (sweep_dir / "attacks").iterdir())
    assert folders == ["nosgm", "sgm0.2", "sgm0.5"]  # no separate sgm1 run
    assert (sweep_dir / "transfer.json").is_file()


def test_report_html_shows_curves_and_heatmap_in_chromium(sweep_dir: Path) -> None:
    assert check_page(sweep_dir / "report.html") == {"images": 2, "broken": [], "errors": []}
    text = (sweep_dir / "report.html").read_text()
    assert "success (%) on the images each target classified correctly when clean" in text


def test_best_gamma_ties_go_to_the_largest() -> None:
    assert best_gamma({0.2: 0.5, 0.5: 0.7, 1.0: 0.7}) == 1.0
    assert best_gamma({0.2: 0.9, 0.5: 0.7, 1.0: 0.7}) == 0.2
    with pytest.raises(ValueError):
        best_gamma({})


def test_sweep_gammas_validates() -> None:
    assert sweep_gammas([0.5, 0.5, 0.1]) == (0.1, 0.5, 1.0)
    with pytest.raises(ValueError):
        sweep_gammas([1.5])


@pytest.mark.parametrize("extra", [["--gammas", "0,0.5"], ["--gammas", "0.5,x"],
                                   ["--source-weights", "nope.safetensors"]])
def test_bad_sweep_input_is_one_line_exit_2(extra: list[str], tmp_path: Path, capsys) -> None:
    code = main(["sweep", "--source", SOURCE, "--target", TARGET, "--out", str(tmp_path / "o"),
                 *extra, *CHEAP])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("skipgrad: error:")


def test_source_without_blocks_is_refused(tmp_path: Path, capsys) -> None:
    code = main(["sweep", "--source", TARGET, "--target", SOURCE, "--gammas", "0.5",
                 "--out", str(tmp_path / "o"), *CHEAP])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "zoo:fmnist-cnn" in err[0]


def test_each_gamma_carries_the_mean_l2_of_its_folder_in_json_and_summary(
        sweep_dir: Path, capsys) -> None:
    import csv

    record = json.loads((sweep_dir / "sweep.json").read_text())
    sizes = {}
    for folder in (sweep_dir / "attacks").iterdir():
        with open(folder / "manifest.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        part = folder.name.split("__")[-1]
        sizes["1" if part == "nosgm" else part.removeprefix("sgm")] = (
            sum(float(r["l2"]) for r in rows) / len(rows))
    for curve in record["targets"].values():
        for gamma, point in curve.items():
            assert point["mean_l2"] == pytest.approx(sizes[gamma], rel=1e-12)
    capsys.readouterr()  # the same command again: every folder reused, the summary printed
    assert main(["sweep", "--source", SOURCE, "--attack", "ifgsm", "--gammas", "0.5,0.2",
                 "--target", TARGET, "--target", SOURCE, "--out", str(sweep_dir),
                 *[a for a in CHEAP if a != "--quiet"]]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("mean L2"))
    assert line.split()[2:] == [f"{sizes[g]:#.3g}" for g in ("0.2", "0.5", "1")]
