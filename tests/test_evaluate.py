"""Scoring rules, the evaluate JSON schema, and the transfer report files."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from skipgrad.pipeline.evaluate import TargetResult, format_table, results_json, score
from skipgrad.pipeline.report import TransferRow, read_transfer_json, write_transfer_report
from skipgrad.analysis.stats import wilson_interval


def _output(labels: list[int], targets: list[int] | None = None) -> SimpleNamespace:
    samples = [SimpleNamespace(id=i, label=y, target=None if targets is None else targets[i])
               for i, y in enumerate(labels)]
    return SimpleNamespace(samples=samples, targeted=targets is not None)


def test_untargeted_success_counts_every_image() -> None:
    labels = [0, 1, 2, 3]
    clean = torch.tensor([0, 1, 9, 9])  # target right on the first two images only
    adv = torch.tensor([5, 1, 9, 3])    # fooled on 0, not on 1; 2 stays wrong; 3 becomes right
    result = score("t", _output(labels), clean, adv)
    assert (result.n, result.successes, result.clean_correct) == (4, 2, 2)
    assert result.success_rate == 0.5
    assert result.clean_accuracy == 0.5
    assert result.success_rate_on_correct == 0.5
    assert result.ci95 == wilson_interval(2, 4)


def test_targeted_success_means_reaching_the_target() -> None:
    result = score("t", _output([0, 1], targets=[7, 8]), torch.tensor([0, 1]), torch.tensor([7, 3]))
    assert result.successes == 1 and result.success_rate_on_correct == 0.5


def test_json_schema_is_exactly_the_documented_one() -> None:
    doc = results_json({"zoo:fmnist-vgg": TargetResult("zoo:fmnist-vgg", 10, 7, 9, 6)})
    entry = doc["targets"]["zoo:fmnist-vgg"]
    assert set(doc) == {"targets"}
    assert set(entry) == {"success_rate", "n", "ci95", "clean_accuracy", "success_rate_on_correct",
                          "clean_correct", "successes_on_correct", "mean_l2", "max_linf"}
    assert (entry["clean_correct"], entry["successes_on_correct"]) == (9, 6)
    assert entry["n"] == 10 and entry["success_rate"] == 0.7 and len(entry["ci95"]) == 2
    assert entry["ci95"][0] < 0.7 < entry["ci95"][1]
    json.dumps(doc)  # serialisable


def test_table_prints_percentages_and_dashes() -> None:
    text = format_table({"a": TargetResult("a", 4, 1, 0, 0)})
    assert "25.0%" in text and "0.0%" in text and text.rstrip().endswith("-")


def _rows() -> list[TransferRow]:
    rows = []
    for gamma in (None, 0.2):
        for target, rate in (("tv:vgg19.IMAGENET1K_V1", 0.46), ("timm:inception_v3.tf_adv_in1k", 0.2)):
            rate += 0.3 if gamma else 0.0
            rows.append(TransferRow("tv:resnet152.IMAGENET1K_V1", "ifgsm", gamma, target, rate, 500,
                                    wilson_interval(int(rate * 500), 500)))
    return rows


def test_transfer_report_files(tmp_path: Path) -> None:
    paths = write_transfer_report(_rows(), tmp_path, "Table 1")
    doc = json.loads(paths["json"].read_text())
    assert [set(r) for r in doc["rows"]] == [
        {"source", "attack", "sgm", "target", "success_rate", "n", "ci95", "backward", "forward",
         "clean_correct", "successes_on_correct", "clean_accuracy", "success_rate_on_correct",
         "mean_l2"}] * 4
    assert doc["rows"][0]["clean_accuracy"] is None  # rows made without clean counts say so
    assert doc["rows"][0]["sgm"] is None and doc["rows"][2]["sgm"] == 0.2
    assert read_transfer_json(paths["json"]) == _rows()
    with open(paths["csv"], newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    markdown = paths["markdown"].read_text()
    assert "ifgsm+sgm (γ=0.2)" in markdown and "76.0 [" in markdown and "46.0 [" in markdown


def test_heatmap_is_a_real_image_sized_to_the_matrix(tmp_path: Path) -> None:
    paths = write_transfer_report(_rows(), tmp_path)
    with Image.open(paths["heatmap"]) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width > 300 and height > 150
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # drawn, not blank


@pytest.mark.parametrize("n, k", [(0, 0), (1, 1), (5000, 2500)])
def test_intervals_are_valid(n: int, k: int) -> None:
    lo, hi = TargetResult("t", n, k, n, k).ci95
    assert 0.0 <= lo <= hi <= 1.0


def test_each_image_is_decoded_once_for_all_targets(tmp_path: Path, monkeypatch) -> None:
    """Two targets, one pass over the files: every adversarial PNG is decoded once and every
    clean batch loaded once, and the scores equal evaluating each target on its own."""
    import skipgrad.pipeline.evaluate as evaluate
    from skipgrad.cli import main

    out = tmp_path / "run"
    assert main(["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--limit", "10",
                 "--steps", "2", "--quiet", "--out", str(out)]) == 0
    targets = ["zoo:fmnist-cnn", "zoo:fmnist-vgg"]
    alone = {t: evaluate.evaluate_folder(out, [t], quiet=True, batch_size=4)[t] for t in targets}
    decoded, real_read = [], evaluate.read_image
    monkeypatch.setattr(evaluate, "read_image",
                        lambda p, c, *data: decoded.append(p) or real_read(p, c, *data))
    together = evaluate.evaluate_folder(out, targets, quiet=True, batch_size=4)
    assert sorted(decoded) == sorted((out / "images").glob("*.png"))  # 10 files, each once
    assert together == alone and all(r.n == 10 for r in together.values())


# ---------------------------------------------------------------- issue 24, item 6: --limit

@pytest.fixture(scope="module")
def short_and_long(tmp_path_factory) -> tuple[Path, Path]:
    """A 4-image run (1 step) and an 8-image run (3 steps) of the same data."""
    from skipgrad.cli import main

    root = tmp_path_factory.mktemp("limit")
    base = ["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--batch-size", "4",
            "--quiet"]
    assert main([*base, "--limit", "4", "--steps", "1", "--out", str(root / "short")]) == 0
    assert main([*base, "--limit", "8", "--steps", "3", "--out", str(root / "long")]) == 0
    return root / "short", root / "long"


def _evaluated(folder: Path, path: Path, *extra: str) -> dict:
    from skipgrad.cli import main

    assert main(["evaluate", str(folder), "--target", "zoo:fmnist-vgg", "--quiet", "--json",
                 str(path), *extra]) == 0
    return json.loads(path.read_text())


def test_evaluate_limit_scores_the_first_n_images_of_the_folder(short_and_long, tmp_path,
                                                                 capsys) -> None:
    from skipgrad.cli import main

    _, long = short_and_long
    everything = _evaluated(long, tmp_path / "all.json")
    first = _evaluated(long, tmp_path / "first.json", "--limit", "4")
    assert everything["image_ids"] == list(range(8)) and first["image_ids"] == [0, 1, 2, 3]
    bits = lambda doc: doc["targets"]["zoo:fmnist-vgg"]["per_image_success"]  # noqa: E731
    assert bits(first) == bits(everything)[:4]
    assert first["targets"]["zoo:fmnist-vgg"]["n"] == 4
    capsys.readouterr()
    assert main(["evaluate", str(long), "--target", "zoo:fmnist-vgg", "--limit", "9"]) == 2
    err = capsys.readouterr().err
    assert "holds 8 finished images, fewer than --limit 9" in err and len(err.splitlines()) == 1


def test_compare_limit_pairs_a_short_run_with_the_start_of_a_long_one(short_and_long, tmp_path,
                                                                     capsys) -> None:
    from skipgrad.cli import main

    short, long = short_and_long
    command = ["compare", str(short), str(long), "--target", "zoo:fmnist-vgg", "--quiet"]
    assert main(command) == 2
    assert "--limit N (4 in common)" in capsys.readouterr().err
    assert main([*command, "--limit", "5"]) == 2
    assert "4 finished images in common, fewer than --limit 5" in capsys.readouterr().err
    assert main([*command, "--limit", "4", "--json", str(tmp_path / "c.json")]) == 0
    compared = json.loads((tmp_path / "c.json").read_text())["targets"]["zoo:fmnist-vgg"]
    # each side is what evaluate gives on those same four images
    a = _evaluated(short, tmp_path / "a.json")["targets"]["zoo:fmnist-vgg"]
    b = _evaluated(long, tmp_path / "b.json", "--limit", "4")["targets"]["zoo:fmnist-vgg"]
    assert compared["n"] == 4
    assert (compared["success_a"], compared["success_b"]) == (a["success_rate"], b["success_rate"])
    only_a = sum(x == 1 and y == 0 for x, y in zip(_bits(a), _bits(b)))
    only_b = sum(x == 0 and y == 1 for x, y in zip(_bits(a), _bits(b)))
    assert (compared["only_a"], compared["only_b"]) == (only_a, only_b)


def _bits(record: dict) -> list[int]:
    """Per-image outcomes of an evaluate record: a list of 0/1 (or, in older records, a string)."""
    return [int(c) for c in record["per_image_success"]]


# ---------------------------------------------------------------- issue 24, item 7: the JSON record

def test_evaluate_json_and_the_folder_record_hold_outcome_lists_and_both_counts(
        short_and_long, tmp_path) -> None:
    from skipgrad.pipeline.evaluate import bits_outcomes
    from skipgrad.store.records import read_evaluations

    from skipgrad.data.fmnist import load_fmnist
    from skipgrad.models import load_model

    short, _ = short_and_long
    doc = _evaluated(short, tmp_path / "e.json")
    recorded = read_evaluations(short)["zoo:fmnist-vgg"]
    images, labels = load_fmnist("test", limit=4)  # the clean side, computed here
    with torch.no_grad():
        correct = (load_model("zoo:fmnist-vgg")(images).argmax(1) == labels).tolist()
    for entry in (doc["targets"]["zoo:fmnist-vgg"], recorded):
        bits = entry["per_image_success"]
        assert isinstance(bits, list) and set(bits) <= {0, 1} and len(bits) == entry["n"] == 4
        assert sum(bits) == round(entry["success_rate"] * 4)
        assert entry["clean_correct"] == sum(correct)
        assert entry["successes_on_correct"] == sum(b and c for b, c in zip(bits, correct))
    # records written before held a string of 0/1: read the same
    assert torch.equal(bits_outcomes("0110"), bits_outcomes([0, 1, 1, 0]))
    assert bits_outcomes([0, 1, 1, 0]).tolist() == [False, True, True, False]
