"""Trust in every result (issue 14): no code from weight caches, data folders kept clean, verified
adversarial files, no silent SGM no-ops. Each test is cited by docs/security.md."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
import timm
import torch
import torchvision.models as tvm
from safetensors.torch import save

from skipgrad.cli import main
from skipgrad.errors import MissingWeightsError
from skipgrad.models import hub, load_model


class _Payload:
    """Unpickling this object would run ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("skipgrad: error:"), err
    return err


def _pickle_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, offline: nothing may be fetched."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SKIPGRAD_OFFLINE", "1")
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "torch" / "hub" / "checkpoints"


# ---------------------------------------------------------------- 1. poisoned weight caches

def test_poisoned_torchvision_cache_runs_nothing_and_says_so(torch_home, tmp_path, capsys) -> None:
    """A pickle planted under torchvision's file name for resnet18 is refused by hash, by
    ``inspect`` and ``attack`` alike, and its code never runs."""
    marker = tmp_path / "MARKER"
    net = tvm.resnet18()
    planted = torch_home / "resnet18-f37072fd.pth"
    planted.write_bytes(_pickle_bytes({**net.state_dict(), "payload": _Payload(marker)}))
    for argv in (["inspect", "tv:resnet18"],
                 ["attack", "--source", "tv:resnet18", "--data", "fmnist:test", "--limit", "1",
                  "--channels", "3", "--out", str(tmp_path / "out"), "--quiet"]):
        assert main(argv) == 2
        err = _one_error_line(capsys)
        assert "resnet18-f37072fd.pth" in err and "do not match the hash in their name" in err
        assert "not in the local cache" not in err
    assert not marker.exists()


def test_a_cached_pickle_that_would_run_code_is_refused_even_when_its_hash_fits(tmp_path) -> None:
    marker = tmp_path / "MARKER"
    data = _pickle_bytes({"w": torch.zeros(2), "payload": _Payload(marker)})
    path = tmp_path / f"evil-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    with pytest.raises(hub.CachedWeightsError, match="cannot be used: .*run any code"):
        hub.read_cached(path, "tv:evil")
    assert not marker.exists()


def test_a_genuine_torchvision_state_dict_under_its_hashed_name_loads(torch_home, monkeypatch
                                                                      ) -> None:
    torch.manual_seed(0)
    net = tvm.resnet18().eval()
    data = _pickle_bytes(net.state_dict())
    digest = hashlib.sha256(data).hexdigest()
    cached = torch_home / f"resnet18-{digest[:10]}.pth"
    cached.write_bytes(data)
    # torchvision's real name carries the real file's hash; point the spec at ours instead.
    monkeypatch.setattr(hub, "tv_cache_path", lambda name: cached)
    model = load_model("tv:resnet18")
    assert model.config.weights_sha256 == digest and model.config.weights == str(cached)
    x = torch.rand(1, 3, 224, 224)
    assert torch.equal(model.net(x), net(x))


def test_missing_and_unreadable_cached_weights_get_different_messages(torch_home) -> None:
    with pytest.raises(MissingWeightsError, match="not in the local cache"):
        load_model("tv:resnet18")
    (torch_home / "resnet18-f37072fd.pth").write_bytes(b"")
    with pytest.raises(hub.CachedWeightsError) as info:
        load_model("tv:resnet18")
    assert not isinstance(info.value, MissingWeightsError)
    assert "do not match the hash" in str(info.value) and "delete it" in str(info.value)


def _hf_cache(root: Path, repo: str, filename: str, data: bytes, blob_name: str) -> Path:
    """A Hugging Face hub cache entry laid out as huggingface_hub writes it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "blobs").mkdir()
    (folder / "blobs" / blob_name).write_bytes(data)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(Path("../../blobs") / blob_name)
    return snapshot / filename


@pytest.mark.parametrize("tampered", [False, True])
def test_timm_weights_from_the_hugging_face_cache_are_checked_by_their_blob_hash(
        tmp_path, monkeypatch, tampered: bool) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("SKIPGRAD_OFFLINE", "1")
    torch.manual_seed(0)
    net = timm.create_model("resnet10t").eval()
    data = save(net.state_dict())
    blob = hashlib.sha256(data + b"x" if tampered else data).hexdigest()
    _hf_cache(tmp_path / "hf", "timm/resnet10t.c3_in1k", "model.safetensors", data, blob)
    if tampered:
        with pytest.raises(hub.CachedWeightsError, match="do not match the hash"):
            load_model("timm:resnet10t")
        return
    model = load_model("timm:resnet10t")
    assert model.config.weights_sha256 == blob
    x = torch.rand(1, 3, 176, 176)
    assert torch.equal(model.net(x), net(x))


# ---------------------------------------------------------------- 2. --out apart from --data

def _image_folder(folder: Path, count: int = 3) -> Path:
    """A class-subfolder data set of 28x28 gray PNGs."""
    import numpy as np
    from PIL import Image

    for i in range(count):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(
            folder / f"class{i % 2}" / f"{i}.png")
    return folder


@pytest.mark.parametrize("command", ["attack", "transfer", "sweep"])
@pytest.mark.parametrize("where", ["same", "inside", "containing", "link"])
def test_out_equal_to_inside_or_containing_the_data_is_refused(tmp_path, capsys, command,
                                                               where) -> None:
    work = tmp_path / "work"
    data = _image_folder(work / "data")
    (work / "link").symlink_to(data, target_is_directory=True)
    out = {"same": data, "inside": data / "adv", "containing": work,
           "link": work / "link" / "adv"}[where]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    common = ["--data", str(data), "--out", str(out), "--steps", "1", "--quiet"]
    argv = {"attack": ["attack", "--source", "zoo:fmnist-cnn"],
            "transfer": ["transfer", "--source", "zoo:fmnist-cnn", "--target", "zoo:fmnist-vgg"],
            "sweep": ["sweep", "--source", "zoo:fmnist-resnet20", "--gammas", "0.5",
                      "--target", "zoo:fmnist-vgg"]}[command] + common
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert f"output folder {out}" in err and "data folder" in err and "outside it" in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written


def test_out_beside_the_data_is_fine(tmp_path) -> None:
    data = _image_folder(tmp_path / "data")
    assert main(["attack", "--source", "zoo:fmnist-cnn", "--data", str(data), "--out",
                 str(tmp_path / "data-adv"), "--steps", "1", "--quiet"]) == 0
    assert len(list((tmp_path / "data-adv" / "images").rglob("*.png"))) == 3


# ---------------------------------------------------------------- 3. verified adversarial files

def _small_attack(out: Path, *extra: str) -> None:
    assert main(["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--limit", "6",
                 "--eps", "8", "--steps", "1", "--out", str(out), "--quiet", *extra]) == 0


def _evaluate(folder: Path, *extra: str) -> int:
    return main(["evaluate", str(folder), "--target", "zoo:fmnist-vgg", "--quiet", *extra])


def _manifest(folder: Path) -> list[dict[str, str]]:
    import csv

    with open(folder / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _rewrite_manifest(folder: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    import csv

    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _white(path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((28, 28), 255, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "run"
    _small_attack(out)
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_the_manifest_holds_the_sha256_of_every_file_and_evaluate_accepts_them(attacked,
                                                                                capsys) -> None:
    rows = _manifest(attacked)
    assert len(rows) == 6
    for row in rows:
        assert row["sha256"] == hashlib.sha256((attacked / row["file"]).read_bytes()).hexdigest()
    assert _evaluate(attacked) == 0
    assert "NOT verified" not in capsys.readouterr().out


def test_an_overwritten_file_is_named_and_nothing_is_scored(attacked, tmp_path, capsys) -> None:
    folder = _copy(attacked, tmp_path)
    _white(folder / "images" / "test_00001.png")
    assert _evaluate(folder, "--json", str(tmp_path / "r.json")) == 2
    err = _one_error_line(capsys)
    assert "1 adversarial file(s) are not what the attack wrote" in err
    assert "images/test_00001.png (SHA-256 differs; L-inf" in err and "--no-verify" in err
    assert not (tmp_path / "r.json").exists()


def test_a_forged_manifest_still_fails_the_eps_bound_and_many_files_are_counted(
        attacked, tmp_path, capsys) -> None:
    folder = _copy(attacked, tmp_path)
    rows = _manifest(folder)
    for row in rows[:5]:  # white images with their hashes written into the manifest
        _white(folder / row["file"])
        row["sha256"] = hashlib.sha256((folder / row["file"]).read_bytes()).hexdigest()
    _rewrite_manifest(folder, rows, list(rows[0]))
    assert _evaluate(folder) == 2
    err = _one_error_line(capsys)
    assert "5 adversarial file(s)" in err and "and 2 more" in err
    assert "images/test_00000.png (L-inf" in err and "levels > 8)" in err


def test_an_old_manifest_cannot_be_verified_and_no_verify_scores_it(attacked, tmp_path,
                                                                    capsys) -> None:
    folder = _copy(attacked, tmp_path)
    rows = _manifest(folder)
    _rewrite_manifest(folder, rows, [c for c in rows[0] if c != "sha256"])
    assert _evaluate(folder) == 2
    err = _one_error_line(capsys)
    assert "6 of its adversarial files" in err and "cannot be verified" in err
    assert "--no-verify" in err
    assert _evaluate(folder, "--no-verify") == 0
    assert "NOT verified" in capsys.readouterr().out


def test_transfer_evaluates_verified_folders_only(tmp_path, capsys) -> None:
    argv = ["transfer", "--source", "zoo:fmnist-cnn", "--target", "zoo:fmnist-vgg", "--data",
            "fmnist:test", "--limit", "4", "--steps", "1", "--out", str(tmp_path / "t"), "--quiet"]
    assert main(argv) == 0
    (png,) = [p for p in (tmp_path / "t").rglob("test_00002.png")]
    _white(png)
    capsys.readouterr()
    assert main(argv) == 2  # the re-run reuses the folder, and its evaluation refuses the file
    assert "images/test_00002.png (SHA-256 differs" in _one_error_line(capsys)


# ---------------------------------------------------------------- 4. SGM never a silent no-op

def test_sgm_refuses_a_model_whose_every_block_is_first_in_its_stage(tmp_path, capsys) -> None:
    """timm resnet10t has one block per stage: the authors' rule decays none of them, so SGM
    would return the plain gradient. The library, the CLI and inspect say so instead."""
    import skipgrad

    model = load_model("timm:resnet10t", pretrained=False)
    assert len(skipgrad.find_blocks(model)) == 4
    for call in (lambda: skipgrad.skip_gradient(model, 0.5), lambda: skipgrad.sgm_blocks(model),
                 lambda: skipgrad.attack(model, torch.rand(1, 3, 32, 32), torch.tensor([1]),
                                         sgm=0.5, steps=1)):
        with pytest.raises(skipgrad.NoDecayedBlockError,
                           match=r"decay none of the 4 residual blocks of timm:resnet10t\S*: "
                                 r"each is the first block of its stage"):
            call()
    weights = tmp_path / "r10t.safetensors"
    weights.write_bytes(save(timm.create_model("resnet10t").state_dict()))
    out = tmp_path / "out"
    assert main(["attack", "--source", "timm:resnet10t", "--weights", str(weights), "--sgm",
                 "0.5", "--data", "fmnist:test", "--channels", "3", "--limit", "1", "--steps",
                 "1", "--out", str(out), "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert "--sgm cannot change timm:resnet10t" in err and "first block of its stage" in err
    assert not out.exists()


def test_inspect_reports_why_sgm_cannot_change_resnet10t(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("SKIPGRAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert main(["inspect", "timm:resnet10t", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "SGM: skip_gradient would decay none of the 4 residual blocks of timm:resnet10t" in out
    assert "first block of its stage" in out


def test_sgm_blocks_is_the_one_check_and_lists_what_is_decayed(tiny_resnet) -> None:
    import re

    import skipgrad

    infos = skipgrad.sgm_blocks(tiny_resnet)
    assert [i.decayed for i in infos] == [False, True, True, False, True, True]
    with pytest.raises(skipgrad.NoResidualBlockError, match="no residual or dense block in"):
        skipgrad.sgm_blocks(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
    # Outside the backward package nobody decides "can SGM work here" from find_blocks itself.
    src = Path(skipgrad.__file__).parent
    callers = [p.relative_to(src).as_posix() for p in src.rglob("*.py")
               if "backward" not in p.parts and re.search(r"find_blocks\(", p.read_text())]
    assert callers == []


# ---------------------------------------------------------------- 6. smaller ones

def test_sgm_auto_record_is_written_while_the_folder_is_locked(tmp_path, monkeypatch) -> None:
    """The calibration record enters run.json together with the run's claim, inside the lock."""
    import json

    from skipgrad.pipeline import autogamma
    from skipgrad.store import outdir, records

    record = {"chosen_gamma": 0.5, "mean": {"0.5": 0.1}, "held_out": ["zoo:fmnist-vgg"], "n": 1}
    monkeypatch.setattr(autogamma, "with_auto_gamma",
                        lambda job, out, flags, log: (_with_sgm(job, 0.5), record))
    monkeypatch.setattr(autogamma, "format_calibration", lambda record: "calibrated")
    seen = []
    real_claim = records.claim_folder

    def claim(out, *args, **kwargs):
        seen.append((Path(out) / outdir.LOCK_NAME).exists())
        return real_claim(out, *args, **kwargs)

    monkeypatch.setattr("skipgrad.store.records.claim_folder", claim)
    out = tmp_path / "out"
    assert main(["attack", "--source", "zoo:fmnist-resnet20", "--sgm", "auto", "--data",
                 "fmnist:test", "--limit", "1", "--steps", "1", "--out", str(out),
                 "--quiet"]) == 0
    assert seen == [True]
    assert json.loads((out / "run.json").read_text())["sgm_auto"] == record


def _with_sgm(job, gamma):
    import dataclasses

    return dataclasses.replace(job, attack=dataclasses.replace(job.attack, sgm=gamma))


def test_only_rank_zero_writes_sweep_json(tmp_path, monkeypatch) -> None:
    from skipgrad.pipeline import distributed
    from skipgrad.pipeline import sweep
    from skipgrad.pipeline.report import TransferRow
    from skipgrad.pipeline.job import AttackJob
    from skipgrad.pipeline.transfer import ModelRef, TransferResult

    rows = [TransferRow("zoo:fmnist-resnet20", "ifgsm", g, "zoo:fmnist-vgg", 0.5, 4, (0.1, 0.9)) for g in (None, 0.5)]
    monkeypatch.setattr(sweep, "run_transfer", lambda *a, **k: TransferResult(rows))
    for rank, written in ((1, False), (0, True)):
        monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank, 1 + rank))
        monkeypatch.setattr(distributed, "_broadcast", lambda outcome: outcome)  # no group here
        out = tmp_path / f"rank{rank}"
        out.mkdir()
        sweep.run_sweep(ModelRef("zoo:fmnist-resnet20"), "ifgsm", [0.5], [ModelRef("zoo:fmnist-vgg")],
                        AttackJob(sources=(), data="fmnist:test"), out)
        assert (out / "sweep.json").exists() is written


def test_one_eval_mode_context_serves_the_attack_loop_and_inspect(tiny_resnet) -> None:
    import skipgrad.attacks.loop as loop
    import skipgrad.backward.inspect as inspect_module
    from skipgrad.backward.base import evaluation_mode

    assert loop.evaluation_mode is evaluation_mode
    assert not hasattr(inspect_module, "_eval_mode")
    tiny_resnet.train()
    tiny_resnet.layer1[0].eval()
    with evaluation_mode([tiny_resnet]):
        assert not any(m.training for m in tiny_resnet.modules())
    assert tiny_resnet.training and not tiny_resnet.layer1[0].training


def test_readme_lists_every_command_with_flags_that_exist() -> None:
    import re

    from skipgrad.cli.parser import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no API
    for name in commands:
        assert f"skipgrad {name}" in readme, f"README's command list omits `skipgrad {name}`"
    flags = {opt for sub in commands.values() for action in sub._actions
             for opt in action.option_strings}
    block = readme.split("## Command line", 1)[1].split("## Python API", 1)[0]
    flags.add("--nproc-per-node")  # torchrun's own flag, quoted in the torchrun line
    unknown = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", block)) - flags)
    assert not unknown, f"README names flags no command has: {unknown}"
    assert "--sgm GAMMA|auto" in block and "--source-weights" in block
    assert "DESIGN section" not in readme  # DESIGN.md is not in the repository


# ---------------------------------------------------------------- 7. ranges, and pins for CI

def test_pyproject_declares_ranges_and_constraints_pin_versions_inside_them() -> None:
    import tomllib

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    requirements = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            (spec,) = pin.specifier
            assert spec.operator == "==", line
            pins[pin.name] = spec.version
    for name in ("torch", "torchvision", "timm"):
        assert not any(s.operator in ("==", "===") for s in requirements[name].specifier), name
        assert requirements[name].specifier.contains(pins[name]), (name, pins[name])
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    run_sh = (root / "run.sh").read_text()
    assert "-c constraints.txt" in run_sh
    markers = " ".join(project["tool"]["pytest"]["ini_options"]["markers"])
    assert "bash run.sh test-slow" in markers and "test-slow)" in run_sh
