"""The bundled Fashion-MNIST zoo and its data loader, on the real data.

Checks that the committed weights still give the accuracy zoo.json records, that the recipe learns,
and that the IDX loader is deterministic and names corrupt files.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from skipgrad.data import fmnist
from skipgrad.data.fmnist import FMNIST_CLASSES, load_fmnist
from skipgrad.models.zoo import ZOO_NAMES, load_zoo_model, train_model
from skipgrad.models.zoo.training import evaluate_accuracy, weights_path

ZOO_JSON = Path(__file__).parents[1] / "src" / "skipgrad" / "models" / "zoo" / "zoo.json"


def _zoo_table() -> dict:
    return json.loads(ZOO_JSON.read_text())["models"]


# ---------------------------------------------------------------- loader

def test_loader_shapes_dtypes_and_range() -> None:
    images, labels = load_fmnist("test", limit=64)
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.int64
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.9
    assert set(labels.tolist()) <= set(range(len(FMNIST_CLASSES)))
    assert len(FMNIST_CLASSES) == 10


def test_loader_full_splits_and_file_order() -> None:
    train, test = load_fmnist("train")[1], load_fmnist("test")[1]
    assert len(train) == 60000 and len(test) == 10000
    assert torch.bincount(test).tolist() == [1000] * 10
    # The first test labels of the published t10k file: ankle boot, pullover, trouser, trouser, shirt.
    assert test[:5].tolist() == [9, 2, 1, 1, 6]


def test_loader_is_deterministic_and_returns_fresh_tensors() -> None:
    a_images, a_labels = load_fmnist("test", limit=100)
    a_images.zero_()  # a caller scribbling on its tensors must not affect the next caller
    b_images, b_labels = load_fmnist("test", limit=100)
    c_images, c_labels = load_fmnist("test", limit=100)
    assert torch.equal(b_images, c_images) and torch.equal(a_labels, b_labels)
    assert b_images.abs().sum() > 0


def test_loader_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_fmnist("validation")


def _write_split(folder: Path, images: bytes, labels: bytes) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


@pytest.mark.parametrize("bad", ["magic", "truncated", "not-gzip"])
def test_corrupt_idx_file_gives_value_error_naming_it(bad: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    good_images = _idx(0x803, (2, 28, 28), bytes(2 * 28 * 28))
    labels = _idx(0x801, (2,), bytes([3, 4]))
    images = {"magic": _idx(0x804, (2, 28, 28), bytes(2 * 28 * 28)),
              "truncated": good_images[:-10], "not-gzip": b""}[bad]
    _write_split(tmp_path, images, labels)
    if bad == "not-gzip":
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data")
    monkeypatch.setenv(fmnist.ENV_VAR, str(tmp_path))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_fmnist("test")


def test_env_dir_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = bytes(range(256)) + bytes(2 * 28 * 28 - 256)
    _write_split(tmp_path, _idx(0x803, (2, 28, 28), pixels), _idx(0x801, (2,), bytes([3, 4])))
    monkeypatch.setenv(fmnist.ENV_VAR, str(tmp_path))
    images, labels = load_fmnist("test")
    assert labels.tolist() == [3, 4] and images.shape == (2, 1, 28, 28)
    assert torch.equal(images[0].flatten()[:256] * 255, torch.arange(256.0))


# ---------------------------------------------------------------- committed weights

def test_zoo_json_lists_every_model_with_committed_weights() -> None:
    table = _zoo_table()
    assert len(table) >= 8 and set(table) <= set(ZOO_NAMES)
    total = sum(weights_path(name).stat().st_size for name in table)
    assert total <= 20 * 2**20


@pytest.mark.parametrize("name", sorted(json.loads(ZOO_JSON.read_text())["models"])
                         if ZOO_JSON.is_file() else [])
def test_recorded_accuracy_meets_zoo_target(name: str) -> None:
    floor = 0.88 if name == "vit" else 0.90
    assert _zoo_table()[name]["test_accuracy"] >= floor


@pytest.mark.parametrize("name", sorted(json.loads(ZOO_JSON.read_text())["models"])
                         if ZOO_JSON.is_file() else [])
def test_committed_weights_reproduce_recorded_accuracy(name: str) -> None:
    model = load_zoo_model(name)
    assert not model.training
    accuracy = evaluate_accuracy(model, limit=1000)
    assert abs(accuracy - _zoo_table()[name]["test_accuracy_first1000"]) <= 0.01


def test_missing_weights_error_names_path_and_fix(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    from skipgrad.models.zoo import training

    monkeypatch.setattr(training, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"fmnist-cnn\.safetensors.*skipgrad zoo train cnn"):
        load_zoo_model("cnn")


# ---------------------------------------------------------------- recipe

def test_train_model_learns_from_a_small_subset(tmp_path: Path) -> None:
    # 2 x 63 steps on 2000 images: ~0.78 test accuracy in a few seconds; chance is 0.10.
    summary = train_model("cnn", tmp_path, epochs=2, limit=2000, batch_size=32, progress=False)
    assert summary["test_accuracy"] > 0.70
    path = tmp_path / "fmnist-cnn.safetensors"
    assert path.is_file() and summary["sha256"] and summary["epochs"] == 2
    assert set(summary) >= {"name", "params", "test_accuracy", "train_seconds", "sha256",
                            "epochs", "seed"}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_zoo_train_writes_its_weights_as_open_would_under_the_umask(
        umask: int, mode: int, tmp_path: Path, capsys) -> None:
    import os

    from safetensors.torch import load_file

    from skipgrad.cli import main

    before = os.umask(umask)
    try:
        assert main(["zoo", "train", "cnn", "--epochs", "1", "--limit", "64", "--batch-size", "32",
                     "--out", str(tmp_path), "--quiet"]) == 0
    finally:
        os.umask(before)
    path = tmp_path / "fmnist-cnn.safetensors"
    assert path.stat().st_mode & 0o777 == mode
    summary = json.loads(capsys.readouterr().out)
    assert summary["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(load_file(str(path))) == set(load_zoo_model("cnn", pretrained=False).state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["fmnist-cnn.safetensors"]  # no temporary left


def test_zoo_list_prints_the_zoo_enumeration(capsys) -> None:
    from skipgrad.cli import main
    from skipgrad.models.loading import zoo_specs

    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == zoo_specs(defended=True)
    assert all(line.endswith("bundled") for line in lines)  # the weights are committed
    kinds = {line.split()[0]: "adversarially" in line for line in lines}
    assert kinds["zoo:fmnist-cnn-at"] and not kinds["zoo:fmnist-cnn"]


# ---------------------------------------------------------------- adversarially trained members

def _at_table() -> dict:
    return json.loads(ZOO_JSON.read_text()).get("adversarially_trained", {})


def test_fgsm_random_start_stays_in_the_ball_and_the_warm_up_ramps() -> None:
    from skipgrad.models.zoo.training import Adversary, fgsm_random_start

    images, labels = load_fmnist("test", limit=16)
    model = load_zoo_model("cnn")
    eps = 16 / 255
    adv = fgsm_random_start(model, images, labels, eps, 1.25 * eps,
                            torch.Generator().manual_seed(0))
    assert (adv - images).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert (adv - images).abs().max() > eps / 2  # it moved
    ramp = Adversary(eps=eps, warmup=0.5)
    assert ramp.eps_at(0, 100) == pytest.approx(eps / 50) and ramp.eps_at(49, 100) == eps
    assert ramp.eps_at(99, 100) == eps and Adversary(warmup=0).eps_at(0, 10) == 16 / 255


@pytest.mark.parametrize("name", sorted(_at_table()) if ZOO_JSON.is_file() else [])
def test_adversarially_trained_weights_reproduce_recorded_clean_accuracy(name: str) -> None:
    accuracy = evaluate_accuracy(load_zoo_model(name), limit=1000)
    assert abs(accuracy - _at_table()[name]["test_accuracy_first1000"]) <= 0.01


@pytest.mark.parametrize("name", sorted(_at_table()) if ZOO_JSON.is_file() else [])
def test_adversarially_trained_model_resists_pgd_where_its_plain_sibling_does_not(name: str) -> None:
    from skipgrad.models.zoo.training import RobustEval, robust_accuracy

    quick = RobustEval(steps=10, limit=100)  # the recorded figure is PGD-20 on 1000 (slow test)
    plain = name.removesuffix("-at") if name != "resnet8-at" else "resnet20"
    defended = robust_accuracy(load_zoo_model(name), quick)
    assert defended > robust_accuracy(load_zoo_model(plain), quick) + 0.3


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_at_table()) if ZOO_JSON.is_file() else [])
def test_adversarially_trained_weights_reproduce_recorded_robust_accuracy(name: str) -> None:
    from skipgrad.models.zoo.training import robust_accuracy

    accuracy = robust_accuracy(load_zoo_model(name))  # white-box PGD-20, first 1000 images
    assert abs(accuracy - _at_table()[name]["robust_accuracy_first1000"]) <= 0.01
