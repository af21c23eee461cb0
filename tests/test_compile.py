"""``--compile``: SGM's hooks still shape the compiled gradient, and where torch.compile cannot
run the option is refused in one line before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skipgrad.attacks.compiled import compiled_sources
from skipgrad.attacks.config import AttackSpec
from skipgrad.attacks.loop import input_gradient
from skipgrad.attacks.randomness import PerImageRandom
from skipgrad.cli import main


def _gradient(sources, images, labels, spec) -> torch.Tensor:
    return input_gradient(sources, images, labels, spec,
                          PerImageRandom(spec.seed, list(range(len(images)))))


@pytest.mark.slow  # torch.compile of even a tiny net takes minutes on a loaded 2-core machine
def test_compiled_gradient_equals_eager_sgm_and_differs_from_plain(tiny_resnet, tiny_batch) -> None:
    import skipgrad

    images, labels = tiny_batch
    plain_spec, sgm_spec = AttackSpec(), AttackSpec(sgm=0.5)
    plain = _gradient([tiny_resnet], images, labels, plain_spec)
    with skipgrad.skip_gradient(tiny_resnet, 0.5):
        eager = _gradient([tiny_resnet], images, labels, plain_spec)
    with compiled_sources([tiny_resnet], sgm_spec) as (sources, spec):
        assert spec.sgm is None  # attached once for the run, not again per call
        compiled = [_gradient(sources, images, labels, spec) for _ in range(2)]
    scale = eager.abs().max()
    for gradient in compiled:
        assert (gradient - eager).abs().max() <= 1e-5 * scale
    assert (plain - eager).abs().max() > 1e-2 * scale  # SGM really changed the gradient
    assert not tiny_resnet._forward_pre_hooks and all(  # every hook gone after the run
        not m._forward_pre_hooks and not m._forward_hooks for m in tiny_resnet.modules())


@pytest.mark.slow
def test_attack_with_compile_records_it_and_reports_compile_time(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["attack", "--source", "zoo:fmnist-resnet20", "--sgm", "0.5", "--data",
                 "fmnist:test", "--limit", "6", "--batch-size", "4", "--steps", "2", "--quiet",
                 "--compile", "--out", str(out)]) == 0
    assert "s compiling" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["config"]["compile"] is True
    assert len(list((out / "images").glob("*.png"))) == 6


def test_compile_without_a_compiler_is_one_line_before_any_file(tmp_path: Path, capsys,
                                                                monkeypatch) -> None:
    monkeypatch.setattr("skipgrad.attacks.compiled.shutil.which", lambda _name: None)
    monkeypatch.delenv("CXX", raising=False)
    out = tmp_path / "run"
    assert main(["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--limit", "2",
                 "--quiet", "--compile", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile" in err[0] and "C++ compiler" in err[0]
    assert not out.exists()
