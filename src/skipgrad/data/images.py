"""Reading images into [0, 1] tensors and writing lossless 8-bit PNGs atomically.

Every write goes to a temporary name in the destination folder and is renamed into place with
``os.replace`` (atomic on POSIX and Windows), so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from skipgrad.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                            ".pgm", ".gif"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def is_image_file(path: Path) -> bool:
    """An image by suffix, ignoring hidden files (and our own temporary files)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def peek(path: Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (height, width)) from the file header only; raises UserError naming the file."""
    try:
        with Image.open(path) as img:
            return img.mode, (img.height, img.width)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {_reason(exc)}") from exc


def is_gray_mode(mode: str) -> bool:
    """Whether a PIL mode holds one intensity channel."""
    return mode in _GRAY_MODES


def read_image(path: Path, channels: int) -> torch.Tensor:
    """Decode an image fully into a float tensor (channels, H, W) in [0, 1] on 8-bit levels."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here with their name
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {_reason(exc)}") from exc
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1)
    return tensor.float().div_(255.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W) or (H, W, 3) uint8, rounding to the nearest level."""
    levels = image.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    if levels.shape[0] == 1:
        return levels[0].numpy()
    return levels.permute(1, 2, 0).contiguous().numpy()


def png_bytes(levels: np.ndarray) -> bytes:
    """Encode a uint8 array as a lossless PNG."""
    buffer = io.BytesIO()
    Image.fromarray(levels, mode="L" if levels.ndim == 2 else "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(levels: np.ndarray, path: Path) -> None:
    """Write a uint8 image as PNG atomically (temporary file in the same folder, then rename)."""
    atomic_write_bytes(path, png_bytes(levels))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
