"""One frozen dataclass (AttackSpec) carries the attack parameters from the command line and the
plans through runner.AttackJob to the attack loop."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import skipgrad
from skipgrad.attacks.loop import attack_with
from skipgrad.errors import UserError
from skipgrad.pipeline.job import (ATTACK_SETTINGS, AttackJob, attack_from_settings, attack_settings, job_record)
from skipgrad.pipeline.plans import template_from
from skipgrad.pipeline.transfer import ModelRef, cell_job


def test_attack_job_holds_the_parameters_only_inside_its_attack_spec() -> None:
    spec_fields = {f.name for f in dataclasses.fields(skipgrad.AttackSpec)}
    job_fields = {f.name for f in dataclasses.fields(AttackJob)}
    assert not (spec_fields & job_fields), "attack parameters duplicated on AttackJob"
    assert isinstance(AttackJob(sources=("a",), data="d").attack, skipgrad.AttackSpec)
    assert set(ATTACK_SETTINGS) <= spec_fields


def test_command_line_units_become_the_spec_and_come_back_unchanged() -> None:
    settings = {"eps": 8.0, "step_size": 1.5, "steps": 4, "decay": 0.9, "di_prob": 0.7,
                "ti_kernel": 5, "seed": 3, "targeted": True, "sgm_official": True}
    spec = attack_from_settings("di+mi", 0.2, settings)
    assert (spec.update, spec.input_diversity, spec.sgm) == ("mi", True, 0.2)
    assert spec.eps == pytest.approx(8 / 255) and spec.step_size == pytest.approx(1.5 / 255)
    record = attack_settings(spec)
    assert record["attack"] == "mi+di"
    assert {k: record[k] for k in settings} == settings  # levels back exactly, not 7.999...


def test_run_json_config_keeps_the_keys_older_folders_hold() -> None:
    """Folders made before the spec existed must still resume: same keys, levels, names."""
    record = job_record(AttackJob(sources=("zoo:fmnist-resnet20",), data="fmnist:test"))
    assert record == {
        "sources": ["zoo:fmnist-resnet20"], "data": "fmnist:test", "attack": "ifgsm",
        "sgm": None, "sgm_official": False, "weights": [], "eps": 16.0, "step_size": 2.0,
        "steps": 10, "norm": "linf", "loss": "ce", "targeted": False, "seed": 0, "decay": 1.0,
        "di_prob": 0.5, "di_scale": 1.1, "ti_kernel": 7, "channels": None, "class_map": None,
        "amp": "off", "channels_last": False, "compile": False}


def test_a_plan_template_carries_its_settings_into_every_cell() -> None:
    template = template_from({"eps": 4, "ti_kernel": 3, "amp": "bf16"}, "fmnist:test")
    job = cell_job(template, ModelRef("zoo:fmnist-resnet20", "w.safetensors"), "mi+ti", 0.5)
    assert job.attack == skipgrad.AttackSpec.parse("mi+ti", eps=4 / 255, ti_kernel=3, sgm=0.5)
    assert (job.sources, job.weights, job.amp) == (("zoo:fmnist-resnet20",), ("w.safetensors",),
                                                   "bf16")


@pytest.mark.parametrize("settings, message", [
    ({"steps": "16"}, "steps must be a positive integer"),
    ({"ti_kernel": 4}, "ti_kernel must be a positive odd integer"),
    ({"eps": 300.0}, "larger than 255"),
])
def test_bad_settings_are_user_errors(settings: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        attack_from_settings("ifgsm", None, settings)


def test_spec_takes_one_gamma_per_source_and_checks_the_count(tiny_batch) -> None:
    spec = skipgrad.AttackSpec(sgm=[0.5, None])  # a list (from JSON/TOML) is stored as a tuple
    assert spec.sgm == (0.5, None) and hash(spec)
    assert spec.sgm_per_source(2) == (0.5, None)
    with pytest.raises(ValueError, match="2 entries for 3 source"):
        spec.sgm_per_source(3)
    with pytest.raises(ValueError, match="SGM gamma"):
        skipgrad.AttackSpec(sgm=(0.5, 0.0))


def test_attack_with_a_spec_equals_the_keyword_api(tiny_resnet, tiny_batch) -> None:
    images, labels = tiny_batch
    kwargs = dict(sgm=0.5, eps=8 / 255, step_size=2 / 255, steps=3, seed=4, di_prob=1.0)
    by_keywords = skipgrad.attack(tiny_resnet, images, labels, "mi+di", **kwargs)
    by_spec = attack_with(tiny_resnet, images, labels, skipgrad.AttackSpec.parse("mi+di", **kwargs))
    assert torch.equal(by_keywords, by_spec)
