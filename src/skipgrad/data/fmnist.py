"""Fashion-MNIST (Xiao et al., 2017) from its gzipped IDX files, decoded with numpy.

The files are looked for in ``$SKIPGRAD_FMNIST_DIR``, then where the Debian package
``dataset-fashion-mnist`` installs them, and only then downloaded with torchvision into
``~/.cache/skipgrad/fmnist``. Decoded arrays are cached in-process: callers load the test split often.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch

from skipgrad.errors import InputError

FMNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = {"train": ("train", 60000), "test": ("t10k", 10000)}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "skipgrad" / "fmnist"
ENV_VAR = "SKIPGRAD_FMNIST_DIR"

# IDX magic: two zero bytes, the element type (0x08 = uint8), the number of dimensions.
_IMAGE_MAGIC = 0x00000803
_LABEL_MAGIC = 0x00000801


def load_fmnist(split: str = "test", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images and labels in file order.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        limit: keep only the first ``limit`` images (all when ``None``).
    Returns:
        images float32 ``(N, 1, 28, 28)`` in [0, 1] and labels int64 ``(N,)``; fresh tensors the
        caller may modify.
    Raises:
        InputError (a ValueError): unknown split, or an IDX file that is corrupt (the message names the file).
        FileNotFoundError: the files are nowhere and cannot be downloaded.
    """
    if split not in SPLITS:
        raise InputError(f"unknown Fashion-MNIST split {split!r} (use 'train' or 'test')")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    images, labels = _decoded(split, _find_dir(split))
    images, labels = images[:limit], labels[:limit]
    as_float = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return as_float, torch.from_numpy(labels.astype(np.int64))


def _file_names(split: str) -> tuple[str, str]:
    prefix = SPLITS[split][0]
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def _candidate_dirs() -> list[Path]:
    env = os.environ.get(ENV_VAR)
    return ([Path(env)] if env else []) + [DEBIAN_DIR, CACHE_DIR / "FashionMNIST" / "raw"]


def _find_dir(split: str) -> Path:
    """The first directory holding both IDX files of ``split``; downloads as a last resort."""
    names = _file_names(split)
    for folder in _candidate_dirs():
        if all((folder / n).is_file() for n in names):
            return folder
    return _download(split)


def _download(split: str) -> Path:
    places = ", ".join(str(d) for d in _candidate_dirs())
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(CACHE_DIR), train=split == "train", download=True)
    except Exception as exc:  # network, disk or mirror failures all mean the same to the user
        raise FileNotFoundError(
            f"Fashion-MNIST files {' and '.join(_file_names(split))} not found in {places}, and "
            f"downloading them failed ({exc}); install them with `apt-get install "
            f"dataset-fashion-mnist` or point {ENV_VAR} at a folder holding them") from exc
    folder = CACHE_DIR / "FashionMNIST" / "raw"
    if not all((folder / n).is_file() for n in _file_names(split)):
        raise FileNotFoundError(f"torchvision's download did not leave {_file_names(split)} in {folder}")
    return folder


@functools.lru_cache(maxsize=4)
def _decoded(split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    # Keyed by folder too, so changing SKIPGRAD_FMNIST_DIR is honoured within one process.
    image_name, label_name = _file_names(split)
    images = read_idx(folder / image_name, _IMAGE_MAGIC, (28, 28))
    labels = read_idx(folder / label_name, _LABEL_MAGIC, ())
    if len(images) != len(labels):
        raise InputError(f"{folder / image_name} holds {len(images)} images but "
                         f"{folder / label_name} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise InputError(f"{folder / label_name}: label {labels.max()} is not a Fashion-MNIST class")
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller
    return images, labels


def read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Decode one (optionally gzipped) uint8 IDX file, checking its magic number and size.

    Raises:
        ValueError: naming ``path`` when the file is not valid IDX of the expected kind.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise InputError(f"corrupt Fashion-MNIST file {path}: {exc}") from exc
    return _parse_idx(raw, path, magic, item_shape)


def _parse_idx(raw: bytes, path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    ndim = 1 + len(item_shape)
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise InputError(f"corrupt Fashion-MNIST file {path}: {len(raw)} bytes, shorter than its header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise InputError(f"corrupt Fashion-MNIST file {path}: magic number {found:#010x}, "
                         f"expected {magic:#010x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != item_shape:
        raise InputError(f"corrupt Fashion-MNIST file {path}: items of shape {dims[1:]}, "
                         f"expected {item_shape}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise InputError(f"corrupt Fashion-MNIST file {path}: {len(raw)} bytes, expected {expected} "
                         f"for dimensions {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
