"""End to end through the real command line: PNG folder + local weights -> attack -> evaluate ->
transfer, resuming, refusing, and one-line errors with exit code 2."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import skipgrad
import skipgrad.attacks.loop
from skipgrad.cli import main
from skipgrad.models.loading import zoo_weights_path

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
N_IMAGES = 8
EPS = 4


def _fmnist_test(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` Fashion-MNIST test images as uint8 (n, 28, 28) and their labels."""
    try:
        from skipgrad.data.fmnist import load_fmnist
    except ImportError:  # read the Debian package's IDX files directly
        raw = gzip.open(FMNIST_DIR / "t10k-images-idx3-ubyte.gz").read()
        images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:n]
        raw = gzip.open(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").read()
        return images, np.frombuffer(raw, np.uint8, offset=8)[:n].astype(np.int64)
    images, labels = load_fmnist("test", limit=n)
    return (images[:, 0] * 255).round().to(torch.uint8).numpy(), labels.numpy()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder of Fashion-MNIST PNGs in class subfolders and two local 10-class checkpoints."""
    root = tmp_path_factory.mktemp("e2e")
    images, labels = _fmnist_test(N_IMAGES)
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / "data" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "data" / str(label) / f"img{i:02d}.png")
    # A residual source whose blocks SGM decays (timm's test_resnet has one block per stage, so
    # --sgm would change nothing and is refused): the zoo ResNet-20, saved as a local file.
    save_file(load_file(str(zoo_weights_path("resnet20"))), str(root / "source.safetensors"),
              metadata={"arch": "zoo:fmnist-resnet20"})
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(),
               root / "target.pth")
    return root


def _attack(work: Path, out: str, *extra: str) -> int:
    # A single-valued option is given once (twice is refused): ``extra`` replaces these defaults.
    defaults = [a for flag, value in (("--eps", str(EPS)), ("--step-size", "1"), ("--steps", "3"),
                                      ("--batch-size", "3")) if flag not in extra
                for a in (flag, value)]
    return main(["attack", "--source", f"file:{work / 'source.safetensors'}", "--attack", "mi",
                 "--sgm", "0.5", "--data", str(work / "data"), "--out", str(work / out),
                 *defaults, "--quiet", *extra])


def _levels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(np.int16)


def test_attack_writes_bounded_pngs_manifest_and_run_json(work: Path) -> None:
    assert _attack(work, "run") == 0
    out = work / "run"
    pairs = [(p, work / "data" / p.relative_to(out / "images")) for p in
             sorted((out / "images").rglob("*.png"))]
    assert len(pairs) == N_IMAGES
    changed = 0
    for adv, clean in pairs:
        diff = np.abs(_levels(adv) - _levels(clean))
        assert diff.max() <= EPS, adv
        changed += int(diff.max() > 0)
    assert changed == N_IMAGES
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [str(i) for i in range(N_IMAGES)]
    assert set(rows[0]) == {"id", "file", "label", "target_label", "source_pred", "sha256",
                            "l2", "linf"}
    assert all(0 < float(r["linf"]) * 255 <= EPS + 1e-9 for r in rows)
    run = json.loads((out / "run.json").read_text())
    sha = hashlib.sha256((work / "source.safetensors").read_bytes()).hexdigest()
    assert run["config"]["weights_sha256"] == [sha] and run["config"]["sgm"] == 0.5
    assert run["config"]["eps"] == EPS and run["config"]["attack"] == "mi"
    assert run["environment"]["torch"] == torch.__version__
    assert run["environment"]["skipgrad"] == skipgrad.__version__
    assert not list(out.rglob(".*.tmp"))


def test_resume_keeps_finished_images_untouched(work: Path) -> None:
    assert _attack(work, "resume", "--limit", "5") == 0
    first = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (work / "resume").rglob("*.png")}
    assert len(first) == 5
    assert _attack(work, "resume") == 0
    files = sorted((work / "resume").rglob("*.png"))
    assert len(files) == N_IMAGES
    for path, (mtime, data) in first.items():
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, data)


def test_same_command_twice_redoes_nothing(work: Path, monkeypatch) -> None:
    assert _attack(work, "twice", "--limit", "2") == 0

    def fail(*args, **kwargs):
        raise AssertionError("attack called on a finished folder")

    monkeypatch.setattr("skipgrad.attacks.loop.attack_with", fail)
    assert _attack(work, "twice", "--limit", "2") == 0


def test_interrupted_run_keeps_whole_batches_and_resumes(work: Path, monkeypatch) -> None:
    real, calls = skipgrad.attacks.loop.attack_with, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("skipgrad.attacks.loop.attack_with", interrupted)
    # _attack passes --batch-size 3: 8 images in groups of 3, 3 and 2
    assert _attack(work, "ctrlc") == 130
    out = work / "ctrlc"
    assert len(list(out.rglob("*.png"))) == 3 and not list(out.rglob(".*.tmp"))
    monkeypatch.setattr("skipgrad.attacks.loop.attack_with", real)
    assert _attack(work, "ctrlc") == 0
    assert len(list(out.rglob("*.png"))) == N_IMAGES


def test_another_config_in_the_same_folder_is_refused(work: Path, capsys) -> None:
    assert _attack(work, "refuse", "--limit", "1") == 0
    capsys.readouterr()
    assert _attack(work, "refuse", "--limit", "1", "--steps", "4") == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "steps" in err and len(err.strip().splitlines()) == 1


def test_evaluate_json_has_the_documented_keys(work: Path, capsys) -> None:
    if not (work / "run" / "run.json").exists():
        assert _attack(work, "run") == 0
    report = work / "eval.json"
    code = main(["evaluate", str(work / "run"), "--target", f"file:{work / 'source.safetensors'}",
                 "--target", "timm:test_efficientnet", "--weights",
                 str(work / "source.safetensors"), "--weights", str(work / "target.pth"),
                 "--json", str(report), "--quiet"])
    assert code == 0
    doc = json.loads(report.read_text())
    assert set(doc["targets"]) == {f"file:{work / 'source.safetensors'}", "timm:test_efficientnet"}
    for entry in doc["targets"].values():
        # The documented keys (docs/design.md, "Output contracts").
        assert set(entry) == {"success_rate", "n", "ci95", "clean_accuracy",
                              "success_rate_on_correct", "clean_correct", "successes_on_correct",
                              "per_image_success", "mean_l2", "max_linf"}
        assert entry["n"] == N_IMAGES and 0 <= entry["ci95"][0] <= entry["ci95"][1] <= 1
    assert "timm:test_efficientnet" in capsys.readouterr().out


def test_transfer_from_a_toml_config_writes_the_matrix_and_reuses_folders(work: Path) -> None:
    config = work / "plan.toml"
    config.write_text(f"""
data = "{work / 'data'}"
out = "{work / 'transfer'}"
limit = 4
sources = ["file:{work / 'source.safetensors'}"]
attacks = ["ifgsm"]
sgm = [0.5]
targets = ["file:{work / 'source.safetensors'}",
           {{spec = "timm:test_efficientnet", weights = "{work / 'target.pth'}"}}]
eps = {EPS}
steps = 2
quiet = true
""")
    assert main(["transfer", "--config", str(config)]) == 0
    out = work / "transfer"
    rows = json.loads((out / "transfer.json").read_text())["rows"]
    assert len(rows) == 4 and {r["sgm"] for r in rows} == {None, 0.5}
    assert {r["n"] for r in rows} == {4}
    for name in ("transfer.csv", "transfer.md", "transfer_heatmap.png"):
        assert (out / name).stat().st_size > 0
    pngs = {p: p.stat().st_mtime_ns for p in (out / "attacks").rglob("*.png")}
    assert len(pngs) == 8
    assert main(["transfer", "--config", str(config), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "attacks").rglob("*.png")} == pngs


def _bad_folder(work: Path, kind: str) -> Path:
    folder = work / f"bad-{kind}"
    (folder / "0").mkdir(parents=True, exist_ok=True)
    if kind == "corrupt":
        (folder / "0" / "broken.png").write_bytes(b"\x89PNG\r\n junk")
    elif kind == "sizes":
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "0" / "a.png")
        Image.fromarray(np.zeros((30, 28), np.uint8)).save(folder / "0" / "b.png")
    return folder


@pytest.mark.parametrize("case, args, needle", [
    ("spec", ["--source", "tv:resnet1520"], "unknown torchvision model"),
    ("weights", ["--source", "tv:resnet18"], "not in the local cache"),
    ("corrupt", [], "broken.png"),
    ("sizes", [], "mismatched image sizes"),
    ("empty", [], "no images"),
    ("eps", ["--eps", "0"], "--eps"),
    ("eps-text", ["--eps", "sixteen"], "--eps"),
    ("gamma", ["--sgm", "1.5"], "gamma"),
    ("steps", ["--steps", "0"], "--steps"),
    ("attack", ["--attack", "mi+fgsm"], "unknown attack"),
    ("data", ["--data", "cifar:test"], "unknown data spec"),
])
def test_bad_input_exits_2_with_one_line(work: Path, capsys, monkeypatch, case: str,
                                         args: list[str], needle: str) -> None:
    monkeypatch.setenv("SKIPGRAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(work / "no-cache"))
    data = _bad_folder(work, case) if case in ("corrupt", "sizes", "empty") else work / "data"
    argv = ["attack", "--source", f"file:{work / 'source.safetensors'}", "--data", str(data),
            "--out", str(work / f"out-{case}"), "--quiet"]
    overridden = {a for a in args if a.startswith("--")}
    keep = [x for i, x in enumerate(argv) if not (x in overridden or
                                                   (i and argv[i - 1] in overridden))]
    assert main(keep + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skipgrad: error:") and needle in err
    assert len(err.splitlines()) == 1


def test_evaluate_on_a_folder_without_a_run_is_refused(work: Path, capsys) -> None:
    assert main(["evaluate", str(work / "data"), "--target", "timm:test_resnet"]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_console_entry_point_prints_one_line_without_traceback(work: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "skipgrad", "attack", "--source", "nope:x",
                           "--data", str(work / "data"), "--out", str(work / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "skipgrad: error: unknown model family 'nope' in spec 'nope:x' "
        "(known: tv:, timm:, zoo:, file:)"]
    assert "Traceback" not in proc.stderr


def test_transfer_from_flags_and_bad_config_keys(work: Path, capsys) -> None:
    weights = str(work / "source.safetensors")
    argv = ["transfer", "--source", "zoo:fmnist-resnet20", "--source-weights", weights,
            "--attack", "ifgsm", "--attack", "di", "--sgm", "0.5", "--no-baseline",
            "--target", f"file:{weights}", "--data", str(work / "data"), "--limit", "2",
            "--steps", "1", "--out", str(work / "tflags"), "--quiet"]
    assert main(argv) == 0
    rows = json.loads((work / "tflags" / "transfer.json").read_text())["rows"]
    assert [(r["attack"], r["sgm"]) for r in rows] == [("ifgsm", 0.5), ("di", 0.5)]
    bad = work / "bad.toml"
    bad.write_text('epsilon = 3\n')
    capsys.readouterr()
    assert main(["transfer", "--config", str(bad), *argv[1:]]) == 2
    err = capsys.readouterr().err  # the unknown key and every known one (issue 16.8)
    assert "unknown key epsilon; known keys: data, sources, targets" in err


def test_targeted_attack_uses_labels_csv_targets(work: Path) -> None:
    folder = work / "nips"
    (folder / "images").mkdir(parents=True)
    images, labels = _fmnist_test(3)
    lines = ["filename,label,targeted_label"]
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / "images" / f"{i}.png")
        lines.append(f"{i}.png,{label},{(label + 1) % 10}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    out = work / "targeted"
    assert main(["attack", "--source", f"file:{work / 'source.safetensors'}", "--targeted",
                 "--data", str(folder), "--out", str(out), "--steps", "2", "--quiet"]) == 0
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["target_label"]) for r in rows] == [(int(y) + 1) % 10 for y in labels]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0.png", "1.png", "2.png"]


def test_sgm_on_a_source_without_skip_connections_is_refused_up_front(work: Path, capsys) -> None:
    argv = ["attack", "--source", "timm:test_efficientnet", "--weights", str(work / "target.pth"),
            "--data", str(work / "data"), "--out", str(work / "nosgm"), "--limit", "1",
            "--steps", "1", "--quiet"]
    assert main([*argv, "--sgm", "0.2"]) == 2
    assert "--sgm cannot change timm:test_efficientnet" in capsys.readouterr().err
    assert main([*argv, "--sgm", "0.2"]) == 2
    assert "found no residual or dense block" in capsys.readouterr().err
    assert main(argv) == 0  # the folder was not claimed by the failed run


def test_bundled_zoo_on_fmnist_test_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    assert main(["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--limit", "6",
                 "--out", str(out), "--eps", "16", "--steps", "10", "--quiet"]) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"test_{i:05d}.png" for i in range(6)]
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(out), "--target", "zoo:fmnist-cnn", "--json", str(report),
                 "--quiet"]) == 0
    entry = json.loads(report.read_text())["targets"]["zoo:fmnist-cnn"]
    assert entry["n"] == 6 and entry["clean_accuracy"] >= 0.5  # a trained model, real data
    assert entry["success_rate"] >= 0.5  # white-box at the paper's eps 16/255
