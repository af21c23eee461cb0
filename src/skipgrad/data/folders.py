"""Folder layouts: class subfolders (ImageNet style) and the NIPS 2017 label tables.

Two NIPS 2017 dev-set conventions are in use: ``labels.csv`` (``filename,label[,targeted_label]``,
0-based torchvision indices, images under ``images/``, as TransferAttack ships it) and the original
``images.csv`` (``ImageId,...,TrueLabel,TargetClass``, 1-based because the TF-slim models had a
background class 0; we subtract 1).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from skipgrad.data.images import is_image_file
from skipgrad.errors import UserError


@dataclass(frozen=True)
class Entry:
    """One image file found in a layout: path relative to the image root, labels (0-based)."""

    relpath: str
    label: int
    target: int | None = None


@dataclass(frozen=True)
class Layout:
    """What was found in a folder: image root, entries in deterministic order, a description."""

    root: Path
    entries: tuple[Entry, ...]
    convention: str


def detect_layout(folder: Path, class_map: Path | None = None) -> Layout:
    """Recognise a data folder: ``labels.csv``, then ``images.csv``, then class subfolders."""
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist")
    if (folder / "labels.csv").is_file():
        return read_labels_csv(folder)
    if (folder / "images.csv").is_file():
        return read_images_csv(folder)
    return read_class_folders(folder, class_map)


def _image_root(folder: Path) -> Path:
    return folder / "images" if (folder / "images").is_dir() else folder


def _open_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


def _as_int(value: str | None, path: Path, line: int, column: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserError(f"{path} line {line}: {column} {value!r} is not an integer") from None


def read_labels_csv(folder: Path) -> Layout:
    """``labels.csv`` with ``filename,label[,targeted_label]`` (0-based)."""
    path = folder / "labels.csv"
    rows = _open_csv(path)
    _require_columns(path, rows[0], ("filename", "label"))
    has_target = "targeted_label" in rows[0]
    entries = [Entry(row["filename"].strip(), _as_int(row["label"], path, i + 2, "label"),
                     _as_int(row["targeted_label"], path, i + 2, "targeted_label")
                     if has_target else None) for i, row in enumerate(rows)]
    return Layout(_image_root(folder), _sorted(entries),
                  "NIPS 2017 labels.csv (filename,label[,targeted_label]; 0-based labels used as is)")


def read_images_csv(folder: Path) -> Layout:
    """Original NIPS 2017 ``images.csv`` (``ImageId,...,TrueLabel,TargetClass``; 1-based)."""
    path = folder / "images.csv"
    rows = _open_csv(path)
    _require_columns(path, rows[0], ("ImageId", "TrueLabel"))
    root = _image_root(folder)
    entries = []
    for i, row in enumerate(rows):
        label = _as_int(row["TrueLabel"], path, i + 2, "TrueLabel") - 1
        target = (_as_int(row["TargetClass"], path, i + 2, "TargetClass") - 1
                  if row.get("TargetClass") not in (None, "") else None)
        if label < 0 or (target is not None and target < 0):
            raise UserError(f"{path} line {i + 2}: label 0 is the TF-slim background class; "
                            f"images.csv labels are 1-based")
        entries.append(Entry(_find_image(root, row["ImageId"].strip()), label, target))
    return Layout(root, _sorted(entries),
                  "NIPS 2017 images.csv (TrueLabel/TargetClass are 1-based: subtracted 1)")


def _find_image(root: Path, image_id: str) -> str:
    for suffix in (".png", ".jpg", ".jpeg", ""):
        if (root / f"{image_id}{suffix}").is_file():
            return f"{image_id}{suffix}"
    raise UserError(f"image {image_id} listed in images.csv is not in {root}")


def _require_columns(path: Path, row: dict[str, str], columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(row)})")


def _sorted(entries: list[Entry]) -> tuple[Entry, ...]:
    return tuple(sorted(entries, key=lambda e: e.relpath))


def read_class_folders(folder: Path, class_map: Path | None = None) -> Layout:
    """Class subfolders; labels from ``class_map``, from integer folder names, or sorted names."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"data folder {folder} has no class subfolders and no labels.csv/images.csv")
    mapping, how = class_indices(classes, class_map)
    entries = [Entry(p.relative_to(folder).as_posix(), mapping[name])
               for name in classes for p in sorted((folder / name).rglob("*")) if is_image_file(p)]
    if not entries:
        raise UserError(f"data folder {folder} has class subfolders but no images in them")
    return Layout(folder, _sorted(entries), f"class subfolders ({len(classes)} classes, {how})")


def class_indices(classes: list[str], class_map: Path | None) -> tuple[dict[str, int], str]:
    """Folder name -> class index, and how it was decided."""
    if class_map is not None:
        return _read_class_map(class_map, classes), f"indices from {class_map}"
    if all(name.isdigit() for name in classes):
        return {name: int(name) for name in classes}, "integer folder names are the labels"
    return {name: i for i, name in enumerate(classes)}, "sorted folder names -> 0..K-1"


def _read_class_map(path: Path, classes: list[str]) -> dict[str, int]:
    """JSON ``{"folder": index}`` or a text file with one folder name per line (line = index)."""
    if not path.is_file():
        raise UserError(f"class map {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        mapping = {str(k): int(v) for k, v in json.loads(text).items()}
    except (ValueError, AttributeError, TypeError):
        names = [line.strip() for line in text.splitlines() if line.strip()]
        mapping = {name: i for i, name in enumerate(names)}
    unknown = [c for c in classes if c not in mapping]
    if unknown:
        raise UserError(f"class map {path} has no index for folder(s) {', '.join(unknown[:5])}")
    return mapping
