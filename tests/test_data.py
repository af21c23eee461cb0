"""Data specs: folder layouts, label conventions, channels, order, and atomic PNG writing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipgrad.data import images as image_io
from skipgrad.store import atomic
from skipgrad.data.datasets import open_dataset
from skipgrad.errors import UserError


def _png(path: Path, value: int = 0, size: tuple[int, int] = (8, 8), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size if mode == "L" else (*size, 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


def test_class_folders_with_integer_names_use_them_as_labels(tmp_path: Path) -> None:
    for label in (0, 2, 10):
        _png(tmp_path / str(label) / "a.png", value=label)
    data = open_dataset(str(tmp_path))
    assert [(s.id, s.name, s.label) for s in data.samples] == [
        (0, "0/a", 0), (1, "10/a", 10), (2, "2/a", 2)]
    assert "integer folder names" in data.convention


def test_class_folders_with_names_are_sorted_like_imagenet(tmp_path: Path) -> None:
    for wnid in ("n02", "n01"):
        _png(tmp_path / wnid / "x.jpg".replace(".jpg", ".png"))
    assert {s.name: s.label for s in open_dataset(str(tmp_path)).samples} == {"n01/x": 0, "n02/x": 1}


def test_class_map_json_overrides_order(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    for wnid in ("cat", "dog"):
        _png(data_dir / wnid / "x.png")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"cat": 7, "dog": 3}))
    data = open_dataset(str(data_dir), class_map=mapping)
    assert {s.name: s.label for s in data.samples} == {"cat/x": 7, "dog/x": 3}


def test_labels_csv_is_zero_based_with_targets_and_sorted(tmp_path: Path) -> None:
    for name in ("b.png", "a.png"):
        _png(tmp_path / "images" / name)
    (tmp_path / "labels.csv").write_text("filename,label,targeted_label\nb.png,5,9\na.png,0,1\n")
    data = open_dataset(str(tmp_path))
    assert [(s.name, s.label, s.target) for s in data.samples] == [("a", 0, 1), ("b", 5, 9)]
    assert "labels.csv" in data.convention and "0-based" in data.convention
    assert data.has_targets()


def test_images_csv_is_one_based_and_shifted(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "abc.png")
    (tmp_path / "images.csv").write_text(
        "ImageId,URL,x1,y1,x2,y2,TrueLabel,TargetClass\nabc,u,0,0,1,1,1,1000\n")
    data = open_dataset(str(tmp_path))
    assert [(s.name, s.label, s.target) for s in data.samples] == [("abc", 0, 999)]
    assert "1-based" in data.convention


def test_limit_keeps_ids_and_order(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / "1" / f"{i}.png", value=i)
    full, part = open_dataset(str(tmp_path)), open_dataset(str(tmp_path), limit=2)
    assert part.samples == full.samples[:2]
    assert torch.equal(part.load(part.samples), full.load(full.samples[:2]))


def test_channels_auto_and_explicit(tmp_path: Path) -> None:
    _png(tmp_path / "gray" / "0" / "a.png", value=10)
    _png(tmp_path / "rgb" / "0" / "a.png", value=10, mode="RGB")
    gray = open_dataset(str(tmp_path / "gray"))
    assert gray.channels == 1 and gray.load(gray.samples).shape == (1, 1, 8, 8)
    assert open_dataset(str(tmp_path / "rgb")).channels == 3
    forced = open_dataset(str(tmp_path / "gray"), channels=3)
    assert forced.load(forced.samples).shape == (1, 3, 8, 8)
    loaded = gray.load(gray.samples)
    assert torch.equal(loaded, torch.full_like(loaded, 10 / 255))


@pytest.mark.parametrize("problem, needle", [
    ("mismatch", "mismatched image sizes"), ("corrupt", "bad.png"), ("empty", "no class"),
    ("nosub", "no images"), ("missing", "does not exist"), ("spec", "unknown data spec"),
])
def test_bad_data_is_a_user_error_naming_the_problem(tmp_path: Path, problem: str,
                                                     needle: str) -> None:
    spec = str(tmp_path)
    if problem == "mismatch":
        _png(tmp_path / "0" / "a.png", size=(8, 8))
        _png(tmp_path / "0" / "b.png", size=(9, 8))
    elif problem == "corrupt":
        _png(tmp_path / "0" / "a.png")
        (tmp_path / "0" / "bad.png").write_bytes(b"\x89PNG not really")
    elif problem == "nosub":
        (tmp_path / "0").mkdir()
    elif problem == "missing":
        spec = str(tmp_path / "nope")
    elif problem == "spec":
        spec = "cifar:test"
    with pytest.raises(UserError, match=needle):
        open_dataset(spec)


def test_truncated_image_fails_at_load_with_its_name(tmp_path: Path) -> None:
    _png(tmp_path / "0" / "a.png", size=(64, 64))
    path = tmp_path / "0" / "a.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError, match="a.png"):
        data = open_dataset(str(tmp_path))
        data.load(data.samples)


def test_png_round_trip_is_lossless(tmp_path: Path) -> None:
    levels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    atomic.write_png(levels, tmp_path / "sub" / "x.png")
    back = image_io.read_image(tmp_path / "sub" / "x.png", channels=3)
    assert np.array_equal(image_io.to_uint8(back), levels)


def test_interrupted_write_leaves_no_file_behind(tmp_path: Path, monkeypatch) -> None:
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_png(np.zeros((4, 4), dtype=np.uint8), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_fmnist_spec_names_images_by_split_and_index() -> None:
    data = open_dataset("fmnist:test", limit=3)
    assert [s.name for s in data.samples] == ["test_00000", "test_00001", "test_00002"]
    batch = data.load(data.samples)
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == torch.float32
    assert torch.equal(batch, (batch * 255).round() / 255)


def test_mixed_sizes_are_refused_saying_sizes_must_match_as_the_readme_does(tmp_path: Path) -> None:
    _png(tmp_path / "0" / "a.png", size=(8, 8))
    _png(tmp_path / "0" / "b.png", size=(9, 8))
    with pytest.raises(UserError, match="all images of one data folder must have the same size"):
        open_dataset(str(tmp_path))
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "All images of a data folder must have the same size" in readme
