"""``skipgrad inspect``: the report on a zoo ResNet, JSON output, and one-line exit-2 errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from skipgrad.cli import main


def _stderr_lines(capsys) -> tuple[str, list[str]]:
    captured = capsys.readouterr()
    return captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_inspect_zoo_resnet_prints_report_and_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "inspect.json"
    code = main(["inspect", "zoo:fmnist-resnet20", "--limit", "4", "--gamma", "0.3",
                 "--json", str(out), "--device", "cpu"])
    stdout, _ = _stderr_lines(capsys)
    assert code == 0
    assert "gamma=0.3" in stdout and "blocks: 9 found, 6 decayed" in stdout
    record = json.loads(out.read_text())
    assert record["spec"] == "zoo:fmnist-resnet20" and record["images"] == 4
    assert record["random_weights"] is False and record["gamma"] == 0.3
    assert record["n_decayed"] == sum(b["decayed"] for b in record["blocks"]) == 6
    for block in record["blocks"]:
        for side in ("plain", "sgm"):
            assert set(block[side]) == {"total_norm", "branch_norm", "skip_norm", "branch_share"}
    # SGM moves the gradient from the residual branches towards the skips.
    assert record["mean_branch_share_sgm"] < record["mean_branch_share_plain"]


@pytest.mark.parametrize("spec, name", [("zoo:fmnist-cnn", "zoo:fmnist-cnn"),
                                        ("tv:vgg11", "tv:vgg11")])
def test_model_without_blocks_is_one_line_exit_2(spec: str, name: str, capsys) -> None:
    # tv:vgg11 has no local weights here: the architecture alone decides, still one line.
    code = main(["inspect", spec, "--limit", "2", "--device", "cpu"])
    stdout, err = _stderr_lines(capsys)
    assert code == 2 and stdout == ""
    assert len(err) == 1 and err[0].startswith("skipgrad: error:") and name in err[0]


def test_missing_hub_weights_fall_back_to_random_with_a_note(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r18.json"
    code = main(["inspect", "tv:resnet18", "--limit", "2", "--json", str(out), "--device", "cpu"])
    stdout, err = _stderr_lines(capsys)
    assert code == 0 and "blocks: 8 found, 4 decayed" in stdout
    assert any("random weights" in line for line in err)
    assert json.loads(out.read_text())["random_weights"] is True


@pytest.mark.parametrize("argv", [["inspect", "zoo:fmnist-resnet20", "--gamma", "0"],
                                  ["inspect", "zoo:nope"],
                                  ["inspect", "zoo:fmnist-resnet20", "--data", "fmnist:val"]])
def test_bad_input_is_one_line_exit_2(argv: list[str], capsys) -> None:
    code = main(argv + ["--device", "cpu"])
    _, err = _stderr_lines(capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("skipgrad: error:")
