"""One frozen dataclass (AttackSpec) carries the attack parameters from the command line and the
plans through runner.AttackJob to the attack loop."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import skipgrad
from skipgrad.attacks.loop import attack_with
from skipgrad.errors import UserError
from skipgrad.pipeline.settings import ATTACK_SETTINGS, attack_from_settings, attack_settings
from skipgrad.pipeline.job import AttackJob, job_record
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
    spec = attack_from_settings("di+mi+ti", 0.2, settings)
    assert (spec.update, spec.input_diversity, spec.sgm) == ("mi", True, 0.2)
    assert spec.eps == pytest.approx(8 / 255) and spec.step_size == pytest.approx(1.5 / 255)
    record = attack_settings(spec)
    assert record["attack"] == "mi+di+ti"
    assert {k: record[k] for k in settings} == settings  # levels back exactly, not 7.999...


def test_run_json_config_keeps_the_keys_older_folders_hold() -> None:
    """Folders made before the spec existed must still resume: same keys, levels, names; the
    settings of parts an attack lacks are left out (and ignored in old records:
    test_an_old_folder_recording_unused_settings_resumes_and_compares_equal)."""
    record = job_record(AttackJob(sources=("zoo:fmnist-resnet20",), data="fmnist:test"))
    assert record == {
        "sources": ["zoo:fmnist-resnet20"], "data": "fmnist:test", "attack": "ifgsm",
        "sgm": None, "weights": [], "eps": 16.0, "step_size": 2.0,
        "steps": 10, "norm": "linf", "loss": "ce", "targeted": False, "seed": 0,
        "channels": None, "class_map": None, "amp": "off", "channels_last": False,
        "compile": False}
    full = job_record(AttackJob(sources=("zoo:fmnist-resnet20",), data="fmnist:test",
                                attack=skipgrad.AttackSpec.parse("mi+di+ti", sgm=0.5)))
    assert {k: full[k] for k in ("sgm_official", "decay", "di_prob", "di_scale", "ti_kernel")} == {
        "sgm_official": False, "decay": 1.0, "di_prob": 0.5, "di_scale": 1.1, "ti_kernel": 7}


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


# ---------------------------------------------------------------- issue 24, item 4: unused settings

def test_settings_of_absent_parts_make_the_same_bytes_and_the_same_identity(
        tiny_resnet, tiny_batch) -> None:
    """The premise of leaving them out: they change nothing (same seed, same ids)."""
    images, labels = tiny_batch
    unused = dict(decay=0.5, di_prob=0.9, di_scale=1.3, ti_kernel=15, sgm_official=True)
    for name in ("ifgsm", "pgd"):
        plain = skipgrad.AttackSpec.parse(name, steps=3, seed=2)
        loaded = skipgrad.AttackSpec.parse(name, steps=3, seed=2, **unused)
        assert torch.equal(attack_with(tiny_resnet, images, labels, plain),
                           attack_with(tiny_resnet, images, labels, loaded))
        assert attack_settings(loaded) == attack_settings(plain)
        assert not set(unused) & set(attack_settings(loaded))
    mi = attack_settings(skipgrad.AttackSpec.parse("mi", **unused))
    assert mi["decay"] == 0.5 and "di_prob" not in mi and "sgm_official" not in mi
    sgm = attack_settings(skipgrad.AttackSpec.parse("ti", sgm=(None, 0.2), **unused))
    assert (sgm["ti_kernel"], sgm["sgm_official"]) == (15, True) and "decay" not in sgm


def test_the_part_table_is_the_one_home_of_which_setting_belongs_where() -> None:
    from skipgrad.attacks.config import PART_SETTINGS, unused_settings

    assert set(s for settings in PART_SETTINGS.values() for s in settings) <= set(ATTACK_SETTINGS)
    companions = ("si_copies", "vt_neighbours", "vt_beta", "admix_scales", "admix_mixes",
                  "admix_eta", "sia_copies", "sia_blocks", "bsr_copies", "bsr_blocks",
                  "bsr_max_angle")
    assert unused_settings({"ifgsm"}) == ("decay", "di_prob", "di_scale", "ti_kernel",
                                          "sgm_official", *companions)
    assert unused_settings({"ni", "di", "sgm"}) == ("ti_kernel", *companions)
    assert unused_settings({"ni", "di", "ti", "sgm", "si", "vt", "admix", "sia", "bsr"}) == ()
    assert skipgrad.AttackSpec.parse("pgd").parts == {"pgd", "ifgsm"}


@pytest.mark.parametrize("argv, named", [
    (["--attack", "ifgsm", "--decay", "0.5", "--di-prob", "0.9", "--ti-kernel", "15"],
     ["--decay (a setting of mi and ni)", "--di-prob (a setting of di)",
      "--ti-kernel (a setting of ti)", "the attack ifgsm has no mi or ni or di or ti"]),
    (["--attack", "mi+di", "--di-scale", "1.2", "--ti-kernel", "3"], ["--ti-kernel", "no ti"]),
    (["--sgm-official"], ["--sgm-official (a setting of SGM)", "--sgm GAMMA"]),
])
def test_a_setting_of_a_part_not_in_the_attack_is_refused_in_one_line(
        argv: list[str], named: list[str], tmp_path: Path, capsys) -> None:
    from skipgrad.cli import main

    code = main(["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--limit", "2",
                 "--out", str(tmp_path / "a"), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in named) and "would change nothing" in err
    assert not (tmp_path / "a").exists()  # refused before anything was made


def test_sweep_refuses_a_setting_of_a_part_not_in_its_attack(tmp_path: Path, capsys) -> None:
    from skipgrad.cli import main

    assert main(["sweep", "--source", "zoo:fmnist-resnet20", "--target", "zoo:fmnist-cnn",
                 "--data", "fmnist:test", "--limit", "2", "--attack", "mi", "--ti-kernel", "5",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--ti-kernel (a setting of ti) would change nothing: the attack mi has no ti" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, shown", [
    (["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--out", "o",
      "--attack", "mi", "--attack", "ifgsm"], "--attack mi and --attack ifgsm"),
    (["evaluate", "o", "--target", "zoo:fmnist-cnn", "--json", "a.json", "--json", "b.json"],
     "--json a.json and --json b.json"),
    (["sweep", "--source", "zoo:fmnist-resnet20", "--target", "zoo:fmnist-cnn", "--data",
      "fmnist:test", "--out", "o", "--eps", "8", "--eps", "4"], "--eps 8 and --eps 4"),
])
def test_a_repeated_single_valued_option_is_refused_in_one_line(argv: list[str], shown: str,
                                                                 capsys) -> None:
    from skipgrad.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"given twice ({shown})" in err, err


def test_repeatable_options_still_repeat_and_the_namespace_stays_clean() -> None:
    from skipgrad.cli.parser import build_parser

    args = build_parser().parse_args(["attack", "--source", "a", "--source", "b", "--data", "d",
                                      "--out", "o", "--sgm", "0.2", "--sgm", "none"])
    assert args.source == ["a", "b"] and args.sgm == [0.2, None]
    assert not [k for k in vars(args) if k.startswith("_")]


def test_a_plan_refuses_a_setting_no_attack_uses_and_keeps_it_out_of_other_rows() -> None:
    from skipgrad.pipeline.settings import refuse_unused_settings
    from skipgrad.pipeline.plans import transfer_plan

    flags = {"source": ["zoo:fmnist-resnet20"], "target": ["zoo:fmnist-cnn"],
             "data": "fmnist:test", "out": Path("o"), "attack": ["ifgsm", "mi"], "decay": 0.5}
    plan, _, _ = transfer_plan(flags, {})
    rows = {a: job_record(cell_job(plan.template, ModelRef("zoo:fmnist-resnet20"), a, None))
            for a in plan.attacks}
    assert rows["mi"]["decay"] == 0.5 and "decay" not in rows["ifgsm"]
    with pytest.raises(UserError, match=r"--ti-kernel .*no attack of this run \(ifgsm, mi\) has ti"):
        transfer_plan({**flags, "ti_kernel": 3}, {})
    with pytest.raises(UserError, match="--sgm-official"):  # the baseline alone: no SGM anywhere
        transfer_plan(flags, {"sgm_official": True})
    transfer_plan(flags, {"sgm_official": True, "sgm": [0.5]})  # SGM rows use it
    refuse_unused_settings({"sgm_official": True}, ["ifgsm"], sgm=True)


def _old_style(folder: Path, **settings: object) -> None:
    """Rewrite run.json's config as skipgrad wrote it before: every part's setting recorded."""
    path = folder / "run.json"
    run = json.loads(path.read_text())
    run["config"].update({"sgm_official": False, "decay": 1.0, "di_prob": 0.5, "di_scale": 1.1,
                          "ti_kernel": 7, **settings})
    path.write_text(json.dumps(run, indent=2))


def test_an_old_folder_recording_unused_settings_resumes_and_compares_equal(
        tmp_path: Path, capsys) -> None:
    from skipgrad.cli import main

    base = ["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--steps", "1",
            "--batch-size", "2", "--quiet"]
    old, new = tmp_path / "old", tmp_path / "new"
    assert main([*base, "--limit", "2", "--out", str(old)]) == 0
    assert main([*base, "--limit", "4", "--out", str(new)]) == 0
    # made by `--attack ifgsm --decay 0.5 --ti-kernel 15` before: the same images as plain ifgsm
    _old_style(old, decay=0.5, ti_kernel=15)
    assert main([*base, "--limit", "4", "--out", str(old)]) == 0  # resumed, not refused
    assert json.loads((old / "run.json").read_text())["config"] == \
        json.loads((new / "run.json").read_text())["config"]
    for name in ("images/test_00002.png", "images/test_00003.png"):
        assert (old / name).read_bytes() == (new / name).read_bytes()
    _old_style(old, decay=0.5)
    capsys.readouterr()
    assert main(["compare", str(old), str(new), "--target", "zoo:fmnist-vgg", "--quiet"]) == 0
    assert "settings that differ: none" in capsys.readouterr().out
    _old_style(old, steps=3)  # a setting that does define the run still differs
    assert main([*base, "--limit", "4", "--out", str(old)]) == 2
    assert "steps: 3 there vs 1 now" in capsys.readouterr().err
