"""The companion parts from the command line: their settings are flags (and plan keys) that
define the run only when their part is in the attack, and run.json records the compute."""
from __future__ import annotations

import json
from pathlib import Path

from skipgrad.cli import main

CHEAP = ["--source", "zoo:fmnist-resnet20", "--data", "fmnist:test", "--limit", "2", "--steps",
         "2", "--quiet"]


def _run(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_a_companion_setting_defines_the_run_and_its_compute_is_recorded(tmp_path: Path) -> None:
    assert main(["attack", *CHEAP, "--attack", "mi+si", "--si-copies", "3",
                 "--out", str(tmp_path / "si")]) == 0
    run = _run(tmp_path / "si")
    assert run["config"]["attack"] == "mi+si" and run["config"]["si_copies"] == 3
    assert run["environment"]["gradient_evaluations_per_image"] == 2 * 3  # steps x copies
    assert main(["attack", *CHEAP, "--out", str(tmp_path / "plain")]) == 0
    plain = _run(tmp_path / "plain")
    assert "si_copies" not in plain["config"]  # a part the attack lacks leaves no trace
    assert plain["environment"]["gradient_evaluations_per_image"] == 2


def test_a_companion_setting_without_its_part_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["attack", *CHEAP, "--attack", "mi", "--vt-beta", "2",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--vt-beta" in err and "vt" in err and not (tmp_path / "x" / "run.json").exists()


def test_vmi_from_the_command_line_counts_its_neighbours(tmp_path: Path) -> None:
    assert main(["attack", *CHEAP, "--attack", "vmi", "--vt-neighbours", "2",
                 "--out", str(tmp_path / "v")]) == 0
    run = _run(tmp_path / "v")
    assert run["config"]["attack"] == "mi+vt" and run["config"]["vt_neighbours"] == 2
    # every step: 1 gradient + 2 neighbours, except the last step's unused neighbours
    assert run["environment"]["gradient_evaluations_per_image"] == 2 * 3 - 2
