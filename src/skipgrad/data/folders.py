"""Folder layouts: class subfolders (ImageNet style) and the NIPS 2017 label tables.

Two NIPS 2017 dev-set conventions are in use: ``labels.csv`` (``filename,label[,targeted_label]``,
0-based torchvision indices, images under ``images/``, as TransferAttack ships it) and the original
``images.csv`` (``ImageId,...,TrueLabel,TargetClass``, 1-based because the TF-slim models had a
background class 0; we subtract 1).
"""
from __future__ import annotations

import csv
import json
import re
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
    root = _image_root(folder)
    entries = [Entry(safe_relpath(root, row["filename"] or "", f"{path} line {i + 2}"),
                     _as_int(row["label"], path, i + 2, "label"),
                     _as_int(row["targeted_label"], path, i + 2, "targeted_label")
                     if has_target else None) for i, row in enumerate(rows)]
    return Layout(root, _sorted(entries),
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
        where = f"{path} line {i + 2}"
        entries.append(Entry(_find_image(root, row["ImageId"] or "", where), label, target))
    return Layout(root, _sorted(entries),
                  "NIPS 2017 images.csv (TrueLabel/TargetClass are 1-based: subtracted 1)")


def _find_image(root: Path, image_id: str, where: str) -> str:
    image_id = safe_relpath(root, image_id, where)
    for suffix in (".png", ".jpg", ".jpeg", ""):
        if (root / f"{image_id}{suffix}").is_file():
            return safe_relpath(root, f"{image_id}{suffix}", where)
    raise UserError(f"image {image_id} listed in images.csv is not in {root}")


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relpath(root: Path, entry: str, where: str) -> str:
    """``entry`` as a clean relative POSIX path that stays inside ``root``, or a UserError.

    Label tables and folder trees come from strangers: an entry that is absolute, climbs with
    ``..``, uses backslashes (a Windows path means something else here) or resolves through a
    symlink to a file outside ``root`` is refused, naming the entry and where it was found.
    ``.`` and empty components (``a/./b``, ``a//b``) are dropped, so that equal files get equal
    names; name collisions after normalisation are checked by the dataset.
    """
    text = entry.strip()
    reason = _unsafe_reason(text)
    if reason:
        raise UserError(f"{where}: refusing entry {entry!r}: {reason}")
    clean = "/".join(part for part in text.split("/") if part not in ("", "."))
    if not clean:
        raise UserError(f"{where}: refusing entry {entry!r}: it names no file")
    resolved, base = (root / clean).resolve(), root.resolve()
    if not resolved.is_relative_to(base):
        raise UserError(f"{where}: refusing entry {entry!r}: it resolves to {resolved}, outside "
                        f"the data folder {base} (symlink?)")
    return clean


def _unsafe_reason(text: str) -> str | None:
    if not text:
        return "empty file name"
    if any(ord(c) < 32 for c in text):
        return "control characters in the file name"
    if "\\" in text:
        return "backslashes are not path separators here; use '/'"
    if text.startswith(("/", "~")) or _DRIVE.match(text):
        return "absolute paths are not allowed; give paths relative to the data folder"
    if ".." in text.split("/"):
        return "'..' would leave the data folder"
    return None


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
    entries = [Entry(safe_relpath(folder, p.relative_to(folder).as_posix(), str(folder)),
                     mapping[name])
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
