"""Data specs -> datasets of labelled images in a deterministic order.

A data spec is ``fmnist:test`` / ``fmnist:train`` (the bundled Fashion-MNIST) or a folder path (class
subfolders, or a NIPS 2017 ``labels.csv`` / ``images.csv`` layout, see :mod:`skipgrad.data.folders`).
Each sample has a stable integer ``id`` (its position in the full sorted order, so ``--limit`` keeps
ids and per-image randomness unchanged) and a ``name``: the relative output path without suffix.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skipgrad.data import folders
from skipgrad.data.images import is_gray_mode, peek, read_image
from skipgrad.errors import UserError

FMNIST_SPLITS = ("test", "train")


@dataclass(frozen=True)
class Sample:
    """One image: stable id, output name (no suffix), label, optional target label, source file."""

    id: int
    name: str
    label: int
    target: int | None = None
    path: Path | None = None


@dataclass
class ImageDataset:
    """Labelled images that all share one size and channel count."""

    spec: str
    samples: list[Sample]
    channels: int
    size: tuple[int, int]
    convention: str
    _tensors: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Images of ``samples`` as a float tensor (N, C, H, W) in [0, 1]."""
        if self._tensors is not None:  # in-memory datasets (Fashion-MNIST) index by id
            return self._tensors[torch.tensor([s.id for s in samples], dtype=torch.long)].clone()
        return torch.stack([read_image(s.path, self.channels) for s in samples])

    def by_name(self) -> dict[str, Sample]:
        """Lookup table from output name to sample."""
        return {s.name: s for s in self.samples}

    def has_targets(self) -> bool:
        """Whether every sample carries a target label (for targeted attacks)."""
        return bool(self.samples) and all(s.target is not None for s in self.samples)


def open_dataset(spec: str, *, limit: int | None = None, channels: int | None = None,
                 class_map: str | Path | None = None) -> ImageDataset:
    """Resolve a data spec; ``limit`` keeps the first N samples of the deterministic order.

    Args:
        spec: ``fmnist:test``, ``fmnist:train`` or a folder path.
        limit: keep only the first ``limit`` samples (ids are unchanged).
        channels: 1 (grayscale) or 3 (RGB); None decides from the files (all gray -> 1).
        class_map: for class-subfolder layouts, a JSON or text file mapping folder names to indices.
    """
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer, got {limit}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    if spec.startswith("fmnist:"):
        return _open_fmnist(spec, limit, channels)
    folder = Path(spec).expanduser()
    if ":" in spec and not folder.exists() and not spec[1:3] == ":\\":
        raise UserError(f"unknown data spec {spec!r} (use fmnist:test, fmnist:train or a folder)")
    return _open_folder(folder, limit, channels, Path(class_map) if class_map else None)


def _open_fmnist(spec: str, limit: int | None, channels: int | None) -> ImageDataset:
    split = spec.split(":", 1)[1]
    if split not in FMNIST_SPLITS:
        raise UserError(f"unknown Fashion-MNIST split {split!r} in {spec!r} (use test or train)")
    from skipgrad.data.fmnist import load_fmnist

    try:
        images, labels = load_fmnist(split=split, limit=limit)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"cannot load Fashion-MNIST ({spec}): {exc}") from exc
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    samples = [Sample(i, f"{split}_{i:05d}", int(y)) for i, y in enumerate(labels.tolist())]
    return ImageDataset(spec, samples, images.shape[1], tuple(images.shape[-2:]),
                        f"Fashion-MNIST {split} split (IDX files)", images)


def _open_folder(folder: Path, limit: int | None, channels: int | None,
                 class_map: Path | None) -> ImageDataset:
    layout = folders.detect_layout(folder, class_map)
    samples = [Sample(i, _output_name(e.relpath), e.label, e.target, layout.root / e.relpath)
               for i, e in enumerate(layout.entries)]
    _check_unique_names(samples)
    samples = samples[:limit] if limit else samples
    for sample in samples:
        if not sample.path.is_file():
            raise UserError(f"image {sample.path} listed in {folder} does not exist")
    chosen, size = _inspect(samples, channels)
    return ImageDataset(str(folder.resolve()), samples, chosen, size, layout.convention)


def _output_name(relpath: str) -> str:
    path = Path(relpath)
    return path.with_suffix("").as_posix()


def name_key(name: str) -> str:
    """The form in which two output names collide on some file system: Unicode NFC (macOS
    normalises names) and case-folded (macOS and Windows ignore case by default)."""
    return unicodedata.normalize("NFC", name).casefold()


def _check_unique_names(samples: list[Sample]) -> None:
    seen: dict[str, Sample] = {}
    for sample in samples:
        other = seen.get(name_key(sample.name))
        if other is not None:
            raise UserError(f"{other.path} and {sample.path} would both be written as "
                            f"{sample.name}.png (names equal up to case, Unicode normalisation "
                            f"or suffix); rename one of them")
        seen[name_key(sample.name)] = sample


def _inspect(samples: list[Sample], channels: int | None) -> tuple[int, tuple[int, int]]:
    """Check every header: one common size; channel count decided explicitly."""
    first_size, all_gray = None, True
    for sample in samples:
        mode, size = peek(sample.path)
        all_gray &= is_gray_mode(mode)
        if first_size is None:
            first_size, first_path = size, sample.path
        elif size != first_size:
            raise UserError(f"mismatched image sizes: {sample.path} is {size[1]}x{size[0]} but "
                            f"{first_path} is {first_size[1]}x{first_size[0]}; all images of "
                            f"one data folder must have the same size (the attack works on the "
                            f"stored pixels and never resizes them): resize them beforehand")
    return (channels or (1 if all_gray else 3)), first_size
