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


def test_model_that_nothing_applies_to_is_one_line_exit_2(capsys) -> None:
    # No local weights here: the architecture alone decides, still one line. GoogLeNet has no
    # residual block or attention, its ReLUs are functional calls (nothing for LinBP) and its
    # max-pools use ceil_mode, which BPA refuses. (Inception-v3's floor-mode pools are BPA's.)
    code = main(["inspect", "tv:googlenet", "--limit", "2", "--device", "cpu"])
    stdout, err = _stderr_lines(capsys)
    assert code == 2 and stdout == ""
    assert len(err) == 1 and err[0].startswith("skipgrad: error: tv:googlenet")
    assert "no backward-pass method applies to it" in err[0]


def test_plain_cnn_lists_the_methods_that_apply_and_says_sgm_has_nothing(tmp_path: Path,
                                                                          capsys) -> None:
    out = tmp_path / "cnn.json"
    code = main(["inspect", "zoo:fmnist-cnn", "--limit", "2", "--device", "cpu",
                 "--json", str(out)])
    stdout, err = _stderr_lines(capsys)
    assert code == 0 and not err
    assert "linbp: LinBP" in stdout and "net.features.4  ReLU linear in backward" in stdout
    assert "SGM: zoo:fmnist-cnn has no residual or dense block" in stdout
    record = json.loads(out.read_text())
    (linbp,) = [m for m in record["backward"] if m["method"] == "linbp"]
    assert linbp["applies"] and linbp["settings"]["start"] == "net.features.4"
    assert [c["module"] for c in linbp["changes"]] == ["net.features.4", "net.features.7"]
    assert "blocks" not in record


def test_inspect_backward_lists_the_chosen_method_and_refuses_one_that_cannot_apply(
        capsys) -> None:
    code = main(["inspect", "zoo:fmnist-resnet20", "--limit", "2", "--device", "cpu",
                 "--backward", "linbp:start=net.layer3.0,branch_scale=0.5"])
    stdout, _ = _stderr_lines(capsys)
    assert code == 0
    assert "settings: start=net.layer3.0, branch_scale=0.5; 3 module(s) changed" in stdout
    code = main(["inspect", "zoo:fmnist-vit", "--limit", "2", "--device", "cpu",
                 "--backward", "linbp"])
    stdout, err = _stderr_lines(capsys)
    assert code == 2 and stdout == "" and len(err) == 1
    assert err[0].startswith("skipgrad: error: --backward linbp on zoo:fmnist-vit: linbp cannot")


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
