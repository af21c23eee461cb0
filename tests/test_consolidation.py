"""The wrong results that copies of one concept caused (issue #21), each checked where it was
wrong: the success rule, SGM applicability with --sgm-official, unverified scores, --sgm auto
numerics, and the smaller contract breaches."""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import skipgrad
from skipgrad.analysis.success import succeeded
from skipgrad.cli import main
from skipgrad.models.defenses import ABSTAIN
from skipgrad.pipeline import autogamma
from skipgrad.pipeline.job import AttackJob, RunOptions
from skipgrad.pipeline.settings import attack_from_settings
from skipgrad.pipeline.transfer import ModelRef, TransferPlan, preflight


def test_an_abstention_is_never_a_success() -> None:
    preds = torch.tensor([3, ABSTAIN, 1, ABSTAIN])
    labels = torch.tensor([1, 1, 1, 2])
    assert succeeded(preds, labels).tolist() == [True, False, False, False]
    assert succeeded(preds, labels, torch.tensor([3, 1, 0, 2])).tolist() == [True, False,
                                                                               False, False]


class _Abstaining(nn.Module):
    """A target that abstains on every image (a smoothed model whose vote has no winner)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 10)

    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), ABSTAIN)


def test_sgm_auto_counts_an_abstention_as_a_failure(tiny_resnet) -> None:
    # autogamma counted a smoothed target's abstention as the attack's success; evaluate did not.
    split = autogamma.calibration_split("fmnist:test", 4, 4)
    job = AttackJob(sources=("zoo:fmnist-resnet20",), data="fmnist:test",
                    attack=attack_from_settings("ifgsm", settings={"steps": 1}))
    source = nn.Sequential(nn.Upsample(size=(12, 12)), tiny_resnet)
    outcomes = autogamma.transfer_outcomes(job, [source], {"abstains": _Abstaining()}, split,
                                           [0.5, 1.0], torch.device("cpu"))
    assert not any(v.any() for v in outcomes["abstains"].values())


def test_sgm_auto_attacks_with_the_runs_numerics(monkeypatch, tiny_resnet) -> None:
    entered = []
    real = autogamma.numerics
    monkeypatch.setattr(autogamma, "numerics",
                        lambda job, device: entered.append(job.amp) or real(job, device))
    split = autogamma.calibration_split("fmnist:test", 2, 2)
    job = AttackJob(sources=("zoo:fmnist-resnet20",), data="fmnist:test", amp="bf16",
                    attack=attack_from_settings("ifgsm", settings={"steps": 1}))
    source = nn.Sequential(nn.Upsample(size=(12, 12)), tiny_resnet)
    autogamma.attack_at(job, [source], split, 0.5, torch.device("cpu"))
    assert entered == ["bf16"]


def test_sgm_auto_refuses_compile_in_one_line(tmp_path: Path, capsys) -> None:
    code = main(["attack", "--source", "zoo:fmnist-resnet20", "--data", "fmnist:test", "--limit",
                 "4", "--sgm", "auto", "--compile", "--out", str(tmp_path / "a"), "--quiet"])
    assert code == 2
    assert "--sgm auto cannot calibrate a --compile run" in capsys.readouterr().err


def test_preflight_knows_the_official_placement(tmp_path: Path) -> None:
    # The zoo's ResNet is not a torchvision ResNet: the authors' placement cannot change it. The
    # transfer and sweep copies of the check ignored sgm_official and failed after the baselines.
    template = AttackJob(sources=(), data="fmnist:test",
                         attack=attack_from_settings(settings={"sgm_official": True, "steps": 1}))
    plan = TransferPlan((ModelRef("zoo:fmnist-resnet20"),), ("ifgsm",), (0.2,),
                        (ModelRef("zoo:fmnist-cnn"),), template)
    with pytest.raises(skipgrad.InputError, match=r"SGM cannot change it \(official=True"):
        preflight(plan, tmp_path / "out", RunOptions(limit=4), log=lambda _m: None)


def test_sweep_refuses_official_on_an_unsupported_source(tmp_path: Path, capsys) -> None:
    code = main(["sweep", "--source", "zoo:fmnist-resnet20", "--target", "zoo:fmnist-cnn",
                 "--data", "fmnist:test", "--limit", "4", "--sgm-official", "--gammas", "0.5",
                 "--out", str(tmp_path / "s"), "--quiet"])
    assert code == 2 and "official=True" in capsys.readouterr().err
    assert not (tmp_path / "s" / "attacks").exists()  # refused before any attack


def test_unverified_scores_are_marked_where_stored_and_shown(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--limit", "4",
                 "--steps", "1", "--quiet", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--target", "zoo:fmnist-vgg", "--quiet"]) == 0
    assert main(["evaluate", str(out), "--target", "zoo:fmnist-resnet20", "--quiet",
                 "--no-verify"]) == 0
    record = json.loads((out / "evaluations.json").read_text())["targets"]
    assert record["zoo:fmnist-vgg"]["verified"] is True
    assert record["zoo:fmnist-resnet20"]["verified"] is False
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert any("zoo:fmnist-resnet20" in line and "NOT verified" in line for line in shown)
    assert not any("zoo:fmnist-vgg" in line and "NOT verified" in line for line in shown)


def test_compare_passes_prefetch_on(monkeypatch, tmp_path: Path) -> None:
    import skipgrad.pipeline.compare as compare

    seen = []
    monkeypatch.setattr(compare, "compare_folders",
                        lambda *a, **k: seen.append(k["prefetch"]) or (_ for _ in ()).throw(
                            KeyboardInterrupt))
    main(["compare", str(tmp_path), str(tmp_path), "--target", "zoo:fmnist-cnn",
          "--prefetch", "3"])
    assert seen == [3]


@pytest.mark.parametrize("name", ["linear_backprop", "backward_propagation_attack",
                                  "pay_no_attention", "token_gradient_regularization"])
def test_method_modules_import_as_modules(name: str) -> None:
    module = importlib.import_module(f"skipgrad.backward.{name}")
    assert type(module).__name__ == "module"


def test_a_non_module_source_is_an_input_error(tiny_batch) -> None:
    images, labels = tiny_batch
    with pytest.raises(skipgrad.InputError, match="nn.Module"):
        skipgrad.attack(lambda x: x, images, labels, "ifgsm", steps=1)
    with pytest.raises(skipgrad.InputError, match="nn.Module"):
        skipgrad.attack([nn.Identity(), "model"], images, labels, "ifgsm", steps=1)


def test_int32_labels_work_with_every_loss(tiny_resnet, tiny_batch) -> None:
    images, labels = tiny_batch
    for loss in ("ce", "margin"):
        wide = skipgrad.attack(tiny_resnet, images, labels, "ifgsm", steps=2, loss=loss)
        narrow = skipgrad.attack(tiny_resnet, images, labels.int(), "ifgsm", steps=2, loss=loss)
        assert torch.equal(wide, narrow)  # the same computation: labels are only widened


def test_non_finite_positions_belong_to_each_error() -> None:
    first = skipgrad.NonFiniteGradientError("a", [1, 2])
    second = skipgrad.NonFiniteGradientError("b")
    first.positions.append(3)
    assert second.positions == [] and first.positions == [1, 2, 3]


def test_the_plan_schema_knows_every_setting() -> None:
    from skipgrad.pipeline.settings import ATTACK_SETTINGS, JOB_SETTINGS
    from skipgrad.pipeline.plans import PLAN_SCHEMA, RUN_KEYS, STRUCTURE_KEYS

    assert set(ATTACK_SETTINGS + JOB_SETTINGS + RUN_KEYS + STRUCTURE_KEYS) <= set(PLAN_SCHEMA)


def test_gamma_has_one_rule_everywhere() -> None:
    from skipgrad.analysis.selection import sweep_gammas
    from skipgrad.gamma import check_gamma, parse_gamma
    from skipgrad.pipeline.transfer import gammas_with_baseline

    for bad in (0, 1.5, float("nan"), True):
        for check in (check_gamma, lambda g: sweep_gammas([g]),
                      lambda g: gammas_with_baseline([g], True),
                      lambda g: skipgrad.AttackSpec(sgm=g)):
            with pytest.raises(skipgrad.InputError, match=r"SGM gamma must be a number in \(0, 1\]"):
                check(bad)
    assert parse_gamma(" None ") is None and parse_gamma("0.2") == 0.2
    assert dataclasses.replace(skipgrad.AttackSpec(), sgm=0.5).sgm == 0.5
