"""``--backward`` on the command line: per-source counts, run.json record and resume, refusal
before any work, transfer folders and rows, inspect. Toy methods stand in for the real ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from skipgrad.cli import main
from skipgrad.pipeline.plans import per_source_backward
from skipgrad.errors import UserError

from tests.backward_toys import toy_methods  # noqa: F401 - fixture

CNN = "zoo:fmnist-cnn"        # plain ReLU CNN: scalerelu applies, attnonly does not
RESNET = "zoo:fmnist-resnet20"
FAST = ["--data", "fmnist:test", "--limit", "4", "--steps", "2", "--batch-size", "4", "--quiet"]


def _attack(out: Path, *extra: str, source: str = CNN) -> int:
    return main(["attack", "--source", source, "--out", str(out), *FAST, *extra])


def _run(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_per_source_counts(toy_methods):
    assert per_source_backward(None, 2) is None
    assert per_source_backward(["scalerelu"], 3) == "scalerelu"
    assert per_source_backward(["scalerelu", None], 2) == ("scalerelu", None)
    assert per_source_backward([None, None], 2) is None
    assert per_source_backward(["scalerelu:skip=1", "attnonly"], 1) == "scalerelu:skip=1+attnonly"
    with pytest.raises(UserError, match="^2 --backward for 3 --source; give one for all sources "
                                        "or one per --source, in order"):
        per_source_backward(["scalerelu", "none"], 3)


def test_bad_backward_text_is_one_line_exit_2(toy_methods, tmp_path, capsys):
    assert _attack(tmp_path / "o", "--backward", "nosuch") == 2
    err = capsys.readouterr().err
    assert "unknown backward method 'nosuch' (known: attnonly, " in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert _attack(tmp_path / "o", "--backward", "scalerelu:gamma=1") == 2
    assert "scalerelu has no setting 'gamma' (known: scale (float)" in capsys.readouterr().err
    assert _attack(tmp_path / "o", "--backward", "scalerelu", "--backward", "none") == 0


def test_method_that_cannot_apply_is_refused_before_any_work(toy_methods, tmp_path, capsys):
    out = tmp_path / "o"
    assert _attack(out, "--backward", "attnonly") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("skipgrad: error: --backward attnonly on zoo:fmnist-cnn: attnonly found no "
                   "attention layer in zoo:fmnist-cnn; it applies to transformers")
    assert not out.exists()


def test_run_json_records_the_methods_and_resume_checks_them(toy_methods, tmp_path, capsys):
    out = tmp_path / "o"
    assert _attack(out, "--backward", "scalerelu:skip=1") == 0
    (record,) = _run(out)["config"]["backward"]
    assert record[0]["method"] == "scalerelu"
    assert record[0]["settings"] == {"scale": 0.5, "start": None, "skip": 1}
    relus = record[0]["modules"]
    assert relus and all(name.startswith("net.") for name in relus)
    assert _run(out)["config"]["backward"] == [[record[0]]]
    capsys.readouterr()
    # The same method with its defaults spelled out is the same run: resumed, nothing redone.
    assert _attack(out, "--backward", "scalerelu:scale=0.5,skip=1") == 0
    assert "4 already done, 0 attacked" in capsys.readouterr().out
    assert _attack(out, "--backward", "scalerelu:skip=2") == 2
    assert "holds another run (backward:" in capsys.readouterr().err
    assert _attack(out) == 2  # without the method: another run as well
    plain = tmp_path / "plain"
    assert _attack(plain) == 0 and "backward" not in _run(plain)["config"]


def test_per_source_backward_in_an_ensemble(toy_methods, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["attack", "--source", CNN, "--source", RESNET, "--out", str(out), *FAST,
                 "--backward", "none", "--backward", "scalerelu"]) == 0
    first, second = _run(out)["config"]["backward"]
    assert first == [] and second[0]["method"] == "scalerelu"
    assert main(["attack", "--source", CNN, "--source", RESNET, "--out", str(tmp_path / "p"),
                 *FAST, "--backward", "scalerelu", "--backward", "none", "--backward",
                 "none"]) == 2
    assert "3 --backward for 2 --source" in capsys.readouterr().err


# ---------------------------------------------------------------- transfer, plans, sweep, demo

def _transfer(out: Path, *extra: str) -> int:
    return main(["transfer", "--attack", "ifgsm", "--target", "zoo:fmnist-vgg", "--out", str(out),
                 *FAST, *extra])


def test_transfer_runs_each_source_with_and_without_its_method(toy_methods, tmp_path):
    out = tmp_path / "t"
    assert _transfer(out, "--source", CNN, "--source", RESNET, "--backward", "none",
                     "--backward", "scalerelu:skip=2") == 0
    folders = sorted(p.name for p in (out / "attacks").iterdir())
    assert folders == ["zoo-fmnist-cnn__ifgsm__nosgm", "zoo-fmnist-resnet20__ifgsm__nosgm",
                       "zoo-fmnist-resnet20__ifgsm__nosgm__scalerelu-skip=2"]
    rows = json.loads((out / "transfer.json").read_text())["rows"]
    assert sorted((r["source"], tuple(r["backward"])) for r in rows) == [
        (CNN, ()), (RESNET, ()), (RESNET, ("scalerelu:skip=2",))]
    with_method = out / "attacks" / folders[2]
    assert _run(with_method)["config"]["backward"][0][0]["settings"]["skip"] == 2
    assert "ifgsm+scalerelu:skip=2" in (out / "transfer.md").read_text()
    assert "scalerelu:skip=2" in (out / "transfer.csv").read_text().splitlines()[-1]


def test_transfer_plan_file_takes_backward_and_no_baseline(toy_methods, tmp_path, capsys):
    plan = tmp_path / "plan.toml"
    plan.write_text(f'sources = ["{RESNET}"]\nbackward = "scalerelu"\nbaseline = false\n')
    out = tmp_path / "t"
    assert _transfer(out, "--config", str(plan)) == 0
    assert [p.name for p in (out / "attacks").iterdir()] == [
        "zoo-fmnist-resnet20__ifgsm__nosgm__scalerelu"]
    plan.write_text(f'sources = ["{RESNET}"]\nbackward = ["scalerelu", "none"]\n')
    assert _transfer(tmp_path / "u", "--config", str(plan)) == 2
    assert "backward in the plan has 2 entries for 1 sources" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_transfer_refuses_a_method_that_cannot_apply_before_any_attack(toy_methods, tmp_path,
                                                                       capsys):
    out = tmp_path / "t"
    assert _transfer(out, "--source", RESNET, "--source", CNN, "--backward", "scalerelu",
                     "--backward", "attnonly") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backward attnonly on zoo:fmnist-cnn: attnonly found no " in err[0]
    assert not (out / "attacks").exists()


def test_sweep_adds_the_method_to_every_gamma(toy_methods, tmp_path):
    out = tmp_path / "s"
    assert main(["sweep", "--source", RESNET, "--gammas", "0.5", "--target", "zoo:fmnist-vgg",
                 "--out", str(out), "--backward", "scalerelu", *FAST]) == 0
    assert sorted(p.name for p in (out / "attacks").iterdir()) == [
        "zoo-fmnist-resnet20__ifgsm__nosgm__scalerelu",
        "zoo-fmnist-resnet20__ifgsm__sgm0.5__scalerelu"]
    assert json.loads((out / "sweep.json").read_text())["attack"] == "ifgsm+scalerelu"


@pytest.mark.slow  # twelve attack folders scored on every zoo model: minutes on a shared CPU
def test_demo_adds_the_method_with_and_without_sgm(toy_methods, tmp_path):
    from skipgrad.pipeline.demo import DEMO_ATTACKS, run_demo

    out = tmp_path / "d"
    run_demo(out, limit=8, quiet=True, backward="scalerelu", log=lambda _m: None)
    rows = json.loads((out / "transfer.json").read_text())["rows"]
    cells = {(r["attack"], r["sgm"], tuple(r["backward"])) for r in rows}
    assert cells == {(a, g, b) for a in DEMO_ATTACKS for g in (None, 0.5)
                     for b in ((), ("scalerelu",))}
    effects = json.loads((out / "backward_effects.json").read_text())["effects"]
    assert {(e["attack"], e["sgm"]) for e in effects} == {(a, g) for a in DEMO_ATTACKS
                                                          for g in (None, 0.5)}
    sgm = json.loads((out / "sgm_effects.json").read_text())["effects"]
    assert {e["backward"] for e in sgm} == {None, "scalerelu"}  # SGM paired within each
    report = (out / "report.md").read_text()
    assert "## What scalerelu changed (paired, same images)" in report
    assert "- mi+sgm 0.5 + scalerelu vs mi+sgm 0.5: mean change" in report
    assert "| without method | with method |" in report


# ---------------------------------------------------------------- the real methods

@pytest.mark.parametrize("method, source, reason", [
    ("linbp", "zoo:fmnist-vit", "linbp cannot rewire"),
    ("pna", CNN, "pna found no self-attention module"),
    ("tgr", RESNET, "tgr found no"),
])
def test_a_method_that_cannot_apply_is_refused_before_any_work(method, source, reason, tmp_path,
                                                               capsys):
    out = tmp_path / "o"
    assert _attack(out, "--backward", method, source=source) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"skipgrad: error: --backward {method} on {source}: {reason}")
    assert not out.exists()


def test_linbp_record_holds_the_block_it_started_from(tmp_path):
    out = tmp_path / "o"
    assert _attack(out, "--backward", "linbp:branch_scale=0.5", source=RESNET) == 0
    ((record,),) = _run(out)["config"]["backward"]
    assert record["method"] == "linbp"
    assert record["settings"] == {"start": "net.layer2.1", "branch_scale": 0.5}
    assert record["modules"][0] == "net.layer2.1"
    # The default start spelled out is the same run: resumed.
    assert _attack(out, "--backward", "linbp:start=net.layer2.1,branch_scale=0.5",
                   source=RESNET) == 0
