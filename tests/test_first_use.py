"""What a new user tripped over (issue #24, item 7): a pipe closed early, the time record of a
resumed run, backward settings as Python dicts, help texts, the demo's message."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skipgrad.cli import EXIT_BROKEN_PIPE, main

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = ["--data", "fmnist:test", "--steps", "1", "--quiet"]


def _folder(tmp_path: Path) -> Path:
    """An attack folder as run.json describes it (show reads records only)."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"format": 1, "config": {"attack": "ifgsm"},
                                                 "environment": {}}))
    return folder


def test_show_into_a_closed_pipe_ends_quietly_with_141(tmp_path: Path) -> None:
    """`skipgrad show DIR | head`: the reader is gone before anything is written."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "skipgrad", "show", str(_folder(tmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader went away
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_broken_pipe_inside_main_is_not_a_bug(tmp_path: Path, monkeypatch) -> None:
    class Closed(io.StringIO):
        def write(self, _text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["show", str(_folder(tmp_path))]) == EXIT_BROKEN_PIPE


def test_a_resumed_run_keeps_the_time_of_the_groups_finished_before_an_interruption(
        tmp_path: Path, monkeypatch) -> None:
    from skipgrad.store import outdir
    from skipgrad.store.records import read_manifest

    out = tmp_path / "run"
    argv = ["attack", "--source", "zoo:fmnist-cnn", "--limit", "8", "--batch-size", "2",
            "--out", str(out), *SMALL]
    real = outdir.check_stop

    def stop_after_two_groups() -> None:  # Ctrl-C once four images are saved
        if len(read_manifest(out)) >= 4:
            raise KeyboardInterrupt
        real()

    monkeypatch.setattr(outdir, "check_stop", stop_after_two_groups)
    assert main(argv) == 130
    monkeypatch.setattr(outdir, "check_stop", real)
    interrupted = json.loads((out / "run.json").read_text())["environment"]
    assert len(read_manifest(out)) == 4 and interrupted["total_elapsed_seconds"] > 0
    assert "finished" not in interrupted  # the run has not finished
    assert main(argv) == 0
    env = json.loads((out / "run.json").read_text())["environment"]
    assert env["images"] == 8
    assert env["total_elapsed_seconds"] == pytest.approx(
        interrupted["total_elapsed_seconds"] + env["elapsed_seconds"], abs=2e-3)
    assert env["total_elapsed_seconds"] > env["elapsed_seconds"]


def test_backward_settings_read_as_the_backward_grammar_in_show_and_compare(
        tmp_path: Path, capsys) -> None:
    plain, linbp = tmp_path / "plain", tmp_path / "linbp"
    base = ["attack", "--source", "zoo:fmnist-resnet20", "--limit", "2", *SMALL]
    assert main([*base, "--out", str(plain)]) == 0
    assert main([*base, "--backward", "linbp", "--out", str(linbp)]) == 0
    label = "linbp:start=net.layer2.1,branch_scale=1"  # run.json: {"method": "linbp", ...}
    record = json.loads((linbp / "run.json").read_text())["config"]["backward"]
    assert record[0][0]["settings"] == {"start": "net.layer2.1", "branch_scale": 1.0}
    capsys.readouterr()
    assert main(["show", str(linbp)]) == 0
    settings = next(line for line in capsys.readouterr().out.splitlines() if "settings:" in line)
    assert f"backward {label}," in settings and "{" not in settings
    assert main(["compare", str(plain), str(linbp), "--target", "zoo:fmnist-cnn", "--quiet"]) == 0
    differ = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("settings that differ"))
    assert f"backward: none (A) vs {label} (B)" in differ and "{" not in differ


def test_compare_help_describes_its_batch_size_as_a_prediction_batch(capsys) -> None:
    assert main(["compare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE images per prediction batch" in text
    assert "attacked together" not in text


@pytest.mark.parametrize("command", ["transfer", "models"])
def test_preset_help_names_every_preset(command: str, capsys) -> None:
    from skipgrad.models.presets import PRESETS

    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert set(PRESETS) == {"wu2020", "fmnist", "fmnist-defended"}
    assert all(f"{name}:" in text for name in PRESETS)


def test_demo_refuses_a_method_its_source_cannot_take_in_demo_terms(tmp_path: Path,
                                                                    capsys) -> None:
    assert main(["demo", "--backward", "pna", "--limit", "2", "--out", str(tmp_path / "d"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transfer" not in err[0]
    assert err[0].startswith("skipgrad: error: the demo cannot run --backward pna on "
                             "zoo:fmnist-preact-resnet20: pna found no self-attention module")
    assert "--source" in err[0] and not (tmp_path / "d").exists()
