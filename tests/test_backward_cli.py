"""``--backward`` on the command line: per-source counts, run.json record and resume, refusal
before any work, transfer folders and rows, inspect. Toy methods stand in for the real ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from skipgrad.cli import main, per_source_backward
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
    assert "unknown backward method 'nosuch' (known: attnonly, scalerelu" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert _attack(tmp_path / "o", "--backward", "scalerelu:gamma=1") == 2
    assert "scalerelu has no setting 'gamma' (known: scale (float)" in capsys.readouterr().err
    assert _attack(tmp_path / "o", "--backward", "scalerelu", "--backward", "none") == 0


def test_method_that_cannot_apply_is_refused_before_any_work(toy_methods, tmp_path, capsys):
    out = tmp_path / "o"
    assert _attack(out, "--backward", "attnonly") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("skipgrad: error: --backward attnonly on zoo:fmnist-cnn: attnonly found no "
                   "attention layer in WrappedModel; it applies to transformers")
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
