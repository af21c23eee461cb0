"""``--sgm auto``: the chosen gamma is the grid's best on the recorded calibration curve, that curve
is reproduced by an independent computation, calibration images are disjoint from the attacked
ones, everything lands in run.json, and the choice is deterministic."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import skipgrad
from skipgrad import AttackSpec
from skipgrad.pipeline.autogamma import calibrate_gamma, calibration_split
from skipgrad.cli import main
from skipgrad.data.fmnist import load_fmnist
from skipgrad.models import load_model
from skipgrad.pipeline.job import AttackJob

SOURCE = "zoo:fmnist-resnet20"
HELD_OUT = "zoo:fmnist-cnn"
GRID = "0.3,0.6,1"
AUTO = ["--source", SOURCE, "--sgm", "auto", "--calibrate-on", HELD_OUT, "--calibrate-images",
        "16", "--calibrate-gammas", GRID, "--steps", "3", "--limit", "8", "--quiet",
        "--device", "cpu"]


def _attack(out: Path, data: str = "fmnist:test", extra: tuple[str, ...] = ()) -> int:
    return main(["attack", *AUTO, "--data", data, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("auto")
    assert _attack(out) == 0
    return json.loads((out / "run.json").read_text())


def test_choice_is_the_best_grid_gamma_of_the_recorded_curve(auto_run: dict) -> None:
    record = auto_run["sgm_auto"]
    scores = record["scores"][HELD_OUT]
    assert set(scores) == {"0.3", "0.6", "1"} and record["held_out"] == [HELD_OUT]
    mean = {float(g): sum(record["scores"][t][g] for t in record["held_out"])
            / len(record["held_out"]) for g in scores}
    top = max(mean.values())
    expected = max(g for g, v in mean.items() if v == top)  # ties -> the largest gamma
    assert record["chosen_gamma"] == expected == auto_run["config"]["sgm"]


def test_recorded_curve_matches_an_independent_computation(auto_run: dict) -> None:
    record = auto_run["sgm_auto"]
    assert record["calibration_data"] == "fmnist:train" and record["n"] == 16
    images, labels = load_fmnist("train", limit=16)
    source, target = load_model(SOURCE), load_model(HELD_OUT)
    for g, recorded in record["scores"][HELD_OUT].items():
        gamma = float(g)
        adv = skipgrad.attack(source, images, labels, "ifgsm", sgm=None if gamma == 1 else gamma,
                              eps=16 / 255, step_size=2 / 255, steps=3, seed=0,
                              ids=list(range(16)))
        adv = (adv * 255).round() / 255  # scored on 8-bit levels, like the saved PNGs
        with torch.no_grad():
            success = (target(adv).argmax(1) != labels).double().mean().item()
        assert recorded == pytest.approx(success)


def test_calibration_is_disjoint_from_attacked_images(tmp_path: Path) -> None:
    # Same data for both: calibration takes the images after the attacked range.
    assert _attack(tmp_path, "fmnist:train") == 0
    run = json.loads((tmp_path / "run.json").read_text())
    with open(tmp_path / "manifest.csv", newline="") as handle:
        attacked = {int(row["id"]) for row in csv.DictReader(handle)}
    calibrated = set(run["sgm_auto"]["calibration_ids"])
    assert attacked == set(range(8)) and calibrated == set(range(8, 24))
    assert run["sgm_auto"]["calibration_data"] == run["config"]["data"] == "fmnist:train"


def test_calibration_is_deterministic() -> None:
    job = AttackJob(sources=(SOURCE,), data="fmnist:test", attack=AttackSpec(steps=3))
    split = calibration_split("fmnist:test", 8, 16)
    runs = [calibrate_gamma(job, [(HELD_OUT, None)], split, (0.3, 0.6, 1.0),
                            torch.device("cpu")) for _ in range(2)]
    assert runs[0] == runs[1]


def test_resume_reuses_the_recorded_calibration(auto_run: dict, tmp_path: Path, capsys) -> None:
    assert _attack(tmp_path) == 0
    first = json.loads((tmp_path / "run.json").read_text())["sgm_auto"]
    capsys.readouterr()
    assert main(["attack", *[a for a in AUTO if a != "--quiet"], "--data", "fmnist:test",
                 "--out", str(tmp_path)]) == 0
    assert "reusing gamma" in capsys.readouterr().err
    again = json.loads((tmp_path / "run.json").read_text())["sgm_auto"]
    assert again == first == auto_run["sgm_auto"]


@pytest.mark.parametrize("argv, words", [
    (["--source", HELD_OUT, "--sgm", "auto", "--calibrate-on", SOURCE, "--data", "fmnist:test",
      "--limit", "4"], "zoo:fmnist-cnn"),
    (["--source", SOURCE, "--sgm", "auto", "--data", "fmnist:train"], "--limit"),
    (["--source", SOURCE, "--sgm", "auto", "--data", "fmnist:test", "--limit", "4",
      "--calibrate-gammas", "0,1"], "gamma"),
])
def test_auto_errors_are_one_line_exit_2(argv: list[str], words: str, tmp_path: Path,
                                         capsys) -> None:
    code = main(["attack", *argv, "--out", str(tmp_path / "o"), "--steps", "2", "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and words in err[0], err


def test_an_auto_folder_recording_unused_settings_resumes_and_reuses_its_gamma(
        auto_run: dict, tmp_path: Path, capsys) -> None:
    """Before the settings of absent parts left the identity, `--attack ifgsm --decay 0.5` wrote
    decay 0.5 into the config and the calibration record; the images were plain I-FGSM's."""
    assert _attack(tmp_path) == 0
    path = tmp_path / "run.json"
    run = json.loads(path.read_text())
    old = {"decay": 0.5, "di_prob": 0.5, "di_scale": 1.1, "ti_kernel": 7}
    run["config"].update(old)
    run["sgm_auto"]["settings"]["attack"].update(old)
    path.write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["attack", *[a for a in AUTO if a != "--quiet"], "--data", "fmnist:test",
                 "--out", str(tmp_path)]) == 0
    assert "reusing gamma" in capsys.readouterr().err
    assert "decay" not in json.loads(path.read_text())["config"]
    assert json.loads(path.read_text())["config"]["sgm_official"] is False  # SGM's: kept
