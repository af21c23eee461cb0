"""`skipgrad demo` end to end on a small slice: every output file, in the documented schema."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from skipgrad.cli import main
from skipgrad.data.fmnist import load_fmnist
from skipgrad.models.loading import zoo_specs
from skipgrad.pipeline.demo import DEMO_ATTACKS, DEMO_DEFENDED, DEMO_GAMMA, DEMO_SOURCE
from tests.browser import check_page


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    targets = zoo_specs(present=True) + list(DEMO_DEFENDED)  # the zoo, one AT and one JPEG-defended target
    assert main(["demo", "--out", str(out), "--limit", "100", "--quiet"]) == 0
    return out, targets


def test_demo_writes_every_documented_file(demo_out):
    demo_out, _ = demo_out
    for name in ("report.md", "report.html", "transfer.json", "transfer_heatmap.png",
                 "examples.png", "sgm_effects.json"):
        assert (demo_out / name).stat().st_size > 0, name
    for name in ("transfer_heatmap.png", "examples.png"):
        with Image.open(demo_out / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    report = (demo_out / "report.md").read_text()
    assert "McNemar" in report and "examples.png" in report and "transfer_heatmap.png" in report


def test_report_md_reads_each_target_on_its_clean_correct_images(demo_out):
    demo_out, targets = demo_out
    report = (demo_out / "report.md").read_text()
    rows = json.loads((demo_out / "transfer.json").read_text())["rows"]
    for target in targets:
        own = [r for r in rows if r["target"] == target]
        k = own[0]["clean_correct"]
        fooled = sorted(r["successes_on_correct"] for r in own)
        counts = str(fooled[0]) if fooled[0] == fooled[-1] else f"{fooled[0]}–{fooled[-1]}"
        assert f"it classified correctly when clean ({counts} of {k})." in report, target
    assert "<details>" not in report.split("## What SGM changed")[0]  # shown, not folded


def test_report_html_shows_heatmap_and_examples_in_chromium(demo_out):
    demo_out, _ = demo_out
    assert check_page(demo_out / "report.html") == {"images": 2, "broken": [], "errors": []}


def test_transfer_json_schema_covers_every_attack_and_target(demo_out):
    demo_out, targets = demo_out
    rows = json.loads((demo_out / "transfer.json").read_text())["rows"]
    keys = {"source", "attack", "sgm", "target", "success_rate", "n", "ci95", "backward",
            "forward", "clean_correct", "successes_on_correct", "clean_accuracy", "success_rate_on_correct",
                "mean_l2"}
    assert all(set(row) == keys for row in rows)
    assert all(0 < row["clean_correct"] <= row["n"] for row in rows)
    assert {(r["attack"], r["sgm"]) for r in rows} == {(a, g) for a in DEMO_ATTACKS
                                                      for g in (None, DEMO_GAMMA)}
    assert {r["target"] for r in rows} == set(targets) and DEMO_SOURCE in targets
    for row in rows:
        assert row["n"] == 100 and 0 <= row["ci95"][0] <= row["success_rate"] <= row["ci95"][1] <= 1
    white_box = [r for r in rows if r["target"] == DEMO_SOURCE]
    assert min(r["success_rate"] for r in white_box) > 0.9


def test_eps_bound_holds_on_the_saved_images(demo_out):
    demo_out, _ = demo_out
    clean, _ = load_fmnist("test", limit=100)
    folders = sorted((demo_out / "attacks").iterdir())
    assert len(folders) == 2 * len(DEMO_ATTACKS)
    for folder in folders:
        files = sorted((folder / "images").glob("test_*.png"))
        assert len(files) == 100
        for path in files:
            index = int(path.stem.split("_")[1])
            adv = torch.from_numpy(np.array(Image.open(path))).float()
            assert (adv - clean[index, 0] * 255).abs().max() <= 16, path


def test_demo_source_must_be_a_zoo_model_with_blocks(tmp_path, capsys) -> None:
    from skipgrad.cli import main

    assert main(["demo", "--source", "tv:resnet18", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "bundled zoo model" in capsys.readouterr().err
    assert main(["demo", "--source", "zoo:fmnist-vgg", "--limit", "2", "--out",
                 str(tmp_path / "b"), "--quiet"]) == 2
    assert "no residual or dense blocks" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before any attack
    assert main(["demo", "--sgm", "1.5", "--out", str(tmp_path / "c"), "--quiet"]) == 2
