"""``--forward`` (Ghost networks, IAA) on the command line: run.json record and resume, refusal
before any work, the white-box success on the unmodified and on the modified source (checked
against predictions made here), transfer cells and rows, plans, sweep's label, inspect."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import skipgrad
from skipgrad.analysis.success import succeeded
from skipgrad.cli import main
from skipgrad.data.images import read_image
from skipgrad.errors import UserError
from skipgrad.models import load_model
from skipgrad.pipeline.plans import per_source_forward

RESNET = "zoo:fmnist-resnet20"
FAST = ["--data", "fmnist:test", "--limit", "4", "--steps", "1", "--batch-size", "4", "--quiet"]


def _attack(out: Path, *extra: str, source: str = RESNET) -> int:
    return main(["attack", "--source", source, "--out", str(out), *FAST, *extra])


def _run(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def _saved(out: Path) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    with open(out / "manifest.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["id"]))
    images = torch.stack([read_image(out / r["file"], 1) for r in rows])
    return images, torch.tensor([int(r["label"]) for r in rows]), rows


def _success(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        preds = model(images).argmax(dim=1)
    return float(succeeded(preds, labels, None).double().mean())


def test_per_source_counts_follow_backward():
    assert per_source_forward(None, 2) is None
    assert per_source_forward(["iaa"], 3) == "iaa"
    assert per_source_forward(["iaa", None], 2) == ("iaa", None)
    assert per_source_forward(["ghost", "iaa"], 1) == "ghost+iaa"
    with pytest.raises(UserError, match="^2 --forward for 3 --source; give one for all sources"):
        per_source_forward(["iaa", "none"], 3)
    with pytest.raises(UserError, match="forward method iaa is given twice"):
        per_source_forward(["iaa", "iaa:beta=5"], 1)


def test_iaa_record_and_both_white_box_numbers(tmp_path, capsys):
    out = tmp_path / "iaa"
    assert _attack(out, "--forward", "iaa:beta=5", "--sgm", "0.5") == 0
    line = capsys.readouterr().out
    run = _run(out)
    assert run["config"]["forward"] == [[{
        "method": "iaa", "settings": {"beta": 5.0, "residual_scale": 1.0},
        "modules": run["config"]["forward"][0][0]["modules"]}]]
    assert "net.layer1.0.relu" in run["config"]["forward"][0][0]["modules"]
    assert "backward" not in run["config"]
    # Both numbers, recomputed here on the saved PNGs: the loaded source, and inside skipgrad.iaa.
    model = load_model(RESNET)
    images, labels, _ = _saved(out)
    plain = _success(model, images, labels)
    with skipgrad.iaa(model, beta=5.0):
        modified = _success(model, images, labels)
    assert run["white_box"] == {"source_success": plain, "modified_source_success": modified}
    assert (f"white-box success on the unmodified source: {100 * plain:.1f}%, on the source "
            f"modified by --forward iaa:beta=5: {100 * modified:.1f}%") in line
    # The same command resumes (nothing left to do); another --forward is refused.
    assert _attack(out, "--forward", "iaa:beta=5", "--sgm", "0.5") == 0
    assert "0 attacked" in capsys.readouterr().out
    assert _attack(out, "--forward", "iaa", "--sgm", "0.5") == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "forward" in err and err.count("\n") == 1
    assert _attack(out, "--sgm", "0.5") == 2  # and so is none
    assert "holds another run" in capsys.readouterr().err


def test_ghost_record_and_per_image_modified_predictions(tmp_path, capsys):
    out = tmp_path / "ghost"
    assert _attack(out, "--forward", "ghost:erosion=0.3") == 0
    run = _run(out)
    (record,) = run["config"]["forward"][0]
    assert record["method"] == "ghost"
    assert record["settings"] == {"erosion": 0.3, "dropout": None, "seed": None}
    assert record["modules"][0] == "net.layer1.0"
    images, labels, rows = _saved(out)
    assert run["white_box"]["source_success"] == _success(load_model(RESNET), images, labels)
    modified = torch.tensor([int(r["source_pred_forward"]) for r in rows])
    assert run["white_box"]["modified_source_success"] == float(
        succeeded(modified, labels, None).double().mean())


def test_runs_without_forward_keep_their_manifest_and_record(tmp_path):
    out = tmp_path / "plain"
    assert _attack(out) == 0
    assert "forward" not in _run(out)["config"] and "white_box" not in _run(out)
    assert (out / "manifest.csv").read_text().splitlines()[0] == \
        "id,file,label,target_label,source_pred,sha256,l2,linf"  # no source_pred_forward


@pytest.mark.parametrize("method, source, reason", [
    ("ghost", "zoo:fmnist-cnn",
     "ghost found no residual block with a known skip path in zoo:fmnist-cnn"),
    ("iaa", "zoo:fmnist-vit",
     "iaa found no ReLU and no residual branch it can scale in zoo:fmnist-vit")])
def test_a_method_that_cannot_apply_is_refused_before_any_work(method, source, reason, tmp_path,
                                                              capsys):
    out = tmp_path / "refused"
    assert _attack(out, "--forward", method, source=source) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"skipgrad: error: --forward {method} on {source}: {reason}")
    assert err.count("\n") == 1
    assert not (out / "run.json").exists()


def test_ghost_with_dropout_applies_to_a_plain_cnn(tmp_path):
    out = tmp_path / "dropout"
    assert _attack(out, "--forward", "ghost:erosion=0,dropout=0.05", source="zoo:fmnist-cnn") == 0
    assert _run(out)["config"]["forward"][0][0]["settings"]["dropout"] == 0.05


def test_bad_text_and_compile_with_ghost_are_one_line(tmp_path, capsys):
    assert _attack(tmp_path / "a", "--forward", "linbp") == 2
    assert "linbp is a backward method (--backward linbp" in capsys.readouterr().err
    assert _attack(tmp_path / "b", "--forward", "ghost", "--compile") == 2
    err = capsys.readouterr().err
    assert err.startswith("skipgrad: error: --compile cannot run --forward ghost: it draws anew")
    assert err.count("\n") == 1 and not (tmp_path / "b").exists()


def test_transfer_with_a_per_source_forward(tmp_path):
    out = tmp_path / "t"
    assert main(["transfer", "--source", RESNET, "--source", "zoo:fmnist-cnn",
                 "--forward", "iaa", "--forward", "none", "--target", "zoo:fmnist-cnn",
                 "--out", str(out), "--sgm", "none", *FAST]) == 0
    folders = sorted(p.name for p in (out / "attacks").iterdir())
    assert folders == ["zoo-fmnist-cnn__ifgsm__nosgm",
                       "zoo-fmnist-resnet20__ifgsm__nosgm__forward-iaa"]
    assert _run(out / "attacks" / folders[1])["config"]["forward"][0][0]["method"] == "iaa"
    rows = json.loads((out / "transfer.json").read_text())["rows"]
    assert {r["source"]: r["forward"] for r in rows} == {RESNET: ["iaa"],
                                                         "zoo:fmnist-cnn": []}


def test_transfer_refuses_a_forward_that_cannot_apply_before_any_attack(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["transfer", "--source", "zoo:fmnist-cnn", "--forward", "ghost", "--target",
                 RESNET, "--out", str(out), *FAST]) == 2
    assert "--forward ghost on zoo:fmnist-cnn" in capsys.readouterr().err
    assert not (out / "attacks").exists()


def test_plan_file_takes_forward(tmp_path):
    plan = tmp_path / "plan.toml"
    out = tmp_path / "p"
    plan.write_text(f'sources = ["{RESNET}"]\ntargets = ["zoo:fmnist-cnn"]\n'
                    f'data = "fmnist:test"\nout = "{out}"\nsgm = "none"\nforward = "iaa"\n'
                    f'limit = 4\nsteps = 1\nbatch_size = 4\nquiet = true\n')
    assert main(["transfer", "--config", str(plan)]) == 0
    (folder,) = (out / "attacks").iterdir()
    assert folder.name.endswith("__forward-iaa")
    assert json.loads((out / "transfer.json").read_text())["rows"][0]["forward"] == ["iaa"]
    plan.write_text(plan.read_text().replace('forward = "iaa"', 'forward = "linbp"'))
    assert main(["transfer", "--config", str(plan)]) == 2


def test_inspect_lists_forward_methods(tmp_path, capsys):
    args = ["inspect", RESNET, "--limit", "2"]
    assert main([*args, "--forward", "iaa", "--json", str(tmp_path / "i.json")]) == 0
    text = capsys.readouterr().out
    assert f"forward methods on {RESNET} (--forward METHOD" in text
    assert "backward-pass methods on" not in text
    record = json.loads((tmp_path / "i.json").read_text())
    assert [m["method"] for m in record["forward"]] == ["iaa"] and "backward" not in record
    assert main(args) == 0  # nothing asked: both kinds, every method
    text = capsys.readouterr().out
    assert "backward-pass methods on" in text and "forward methods on" in text
    assert "ghost:" in text and "iaa:" in text
    assert main(["inspect", "zoo:fmnist-cnn", "--limit", "2", "--forward", "ghost"]) == 2
    assert "--forward ghost on zoo:fmnist-cnn: ghost found no residual block" in \
        capsys.readouterr().err


def test_sweep_runs_every_gamma_on_the_modified_source(tmp_path):
    out = tmp_path / "s"
    assert main(["sweep", "--source", RESNET, "--gammas", "0.5", "--target", "zoo:fmnist-cnn",
                 "--out", str(out), "--forward", "iaa", *FAST]) == 0
    assert sorted(p.name for p in (out / "attacks").iterdir()) == [
        "zoo-fmnist-resnet20__ifgsm__nosgm__forward-iaa",
        "zoo-fmnist-resnet20__ifgsm__sgm0.5__forward-iaa"]
    assert json.loads((out / "sweep.json").read_text())["attack"] == "ifgsm+iaa"


def test_demo_passes_forward_to_the_benchmark(tmp_path, monkeypatch):
    from skipgrad.pipeline import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.update(kw) or out / "r.md")
    assert main(["demo", "--out", str(tmp_path), "--forward", "ghost:erosion=0.1"]) == 0
    assert seen["forward"] == "ghost:erosion=0.1" and "backward" not in seen


@pytest.mark.slow  # six attack folders scored on every zoo model: minutes on a shared CPU
def test_demo_modifies_the_source_in_every_cell(tmp_path):
    from skipgrad.pipeline.demo import DEMO_ATTACKS, run_demo

    out = tmp_path / "d"
    run_demo(out, limit=8, quiet=True, forward="iaa", log=lambda _m: None)
    rows = json.loads((out / "transfer.json").read_text())["rows"]
    assert {(r["attack"], r["sgm"], tuple(r["forward"])) for r in rows} == {
        (a, g, ("iaa",)) for a in DEMO_ATTACKS for g in (None, 0.5)}
    assert all(p.name.endswith("__forward-iaa") for p in (out / "attacks").iterdir())


def test_transfer_rows_keep_forward_through_json_and_csv():
    from skipgrad.pipeline.report import TransferRow, csv_text

    row = TransferRow(RESNET, "mi", 0.5, "zoo:fmnist-cnn", 0.5, 4, (0.1, 0.9), ("linbp",),
                      forward=("ghost:erosion=0.1", "iaa"))
    assert row.to_json()["forward"] == ["ghost:erosion=0.1", "iaa"]
    assert TransferRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    (line,) = csv.DictReader(csv_text([row]).splitlines())
    assert line["forward"] == "ghost:erosion=0.1+iaa" and line["backward"] == "linbp"
    assert row.method == "mi+linbp+ghost:erosion=0.1+iaa+sgm (γ=0.5)"


def test_show_names_the_forward_methods(tmp_path, capsys):
    out = tmp_path / "shown"
    assert _attack(out, "--forward", "iaa") == 0
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    assert "forward iaa:beta=20,residual_scale=1," in capsys.readouterr().out  # the --forward grammar
