"""Reading images into [0, 1] tensors, and the one conversion between [0, 1] floats and 8-bit
levels and lossless PNG bytes (written atomically by :mod:`skipgrad.store.atomic`).

Conversions on reading (anything else is refused with the file named):

- 8-bit gray, RGB, palette and YCbCr images: converted to gray or RGB as ``--channels`` asks.
- 16-bit gray (PNG ``I;16``): rounded to the nearest 8-bit level, ``round(v / 257)``, never clipped.
  16-bit RGB PNGs are reduced to their high byte by Pillow when opened.
- Alpha (RGBA, LA, PA, palette transparency): accepted only when every pixel is opaque, then
  dropped; a transparent pixel has no defined colour, so such images are refused.
- CMYK, LAB, HSV, 32-bit integer and float images: refused (no safe conversion without colour
  management or a known range).
- Images above ``MAX_PIXELS`` (Pillow's decompression-bomb limit) are refused from the header,
  before any decoding.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from skipgrad.errors import UserError, first_line

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                            ".pgm", ".gif"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_REFUSED_MODES = {"CMYK": "CMYK needs colour management to become RGB; convert it to RGB first",
                  "LAB": "Lab colour needs colour management; convert it to RGB first",
                  "HSV": "convert HSV images to RGB first",
                  "I": "32-bit integer pixels have no known range; save as 8- or 16-bit",
                  "F": "floating-point pixels have no known range; save as 8- or 16-bit"}
# Pillow's decompression-bomb limit; a module attribute so that tests and admins can lower it.
MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
_READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError)


def is_image_file(path: Path) -> bool:
    """An image by suffix, ignoring hidden files (and our own temporary files)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def peek(path: Path) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (height, width)) from the file header only; raises UserError naming the file."""
    with _opened(path) as img:
        _check_mode(path, img)
        return img.mode, (img.height, img.width)


@contextlib.contextmanager
def _opened(path: Path, data: bytes | None = None) -> Iterator[Image.Image]:
    """Open an image (from ``data`` when given: its bytes, already read) with the pixel limit
    checked from its header and every failure (including Pillow's bomb warning, turned into an
    error) reported as a UserError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UserError(f"refusing image {path}: {img.width}x{img.height} pixels is "
                                    f"above the limit of {MAX_PIXELS} (decompression bomb?)")
                yield img
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"refusing image {path}: {first_line(exc)} (above the limit of {MAX_PIXELS} "
                        f"pixels; decompression bomb?)") from exc
    except _READ_ERRORS as exc:
        raise UserError(f"cannot read image {path}: {first_line(exc)}") from exc


def _check_mode(path: Path, img: Image.Image) -> None:
    if img.mode in _REFUSED_MODES:
        raise UserError(f"refusing image {path}: mode {img.mode}: {_REFUSED_MODES[img.mode]}")


def is_gray_mode(mode: str) -> bool:
    """Whether a PIL mode holds one intensity channel."""
    return mode in _GRAY_MODES


def read_image(path: Path, channels: int, data: bytes | None = None) -> torch.Tensor:
    """Decode an image fully into a float tensor (channels, H, W) in [0, 1] on 8-bit levels,
    with the conversions listed in the module docstring (from ``data``, the file's bytes, when
    the caller has read them already, e.g. to hash them)."""
    with _opened(path, data) as img:
        _check_mode(path, img)
        img.load()  # decode now, so truncated files fail here with their name
        array = _to_levels(path, img, channels)
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1)
    return tensor.float().div_(255.0)


def _to_levels(path: Path, img: Image.Image, channels: int) -> np.ndarray:
    """8-bit (H, W) or (H, W, 3) levels of a decoded image."""
    if img.mode in _SIXTEEN_BIT:  # Pillow's convert("L") would clip at 255: scale instead
        wide = np.asarray(img).astype(np.float64)
        gray = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), mode="L")
        return np.asarray(gray if channels == 1 else gray.convert("RGB"), dtype=np.uint8)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        img = _opaque(path, img)
    return np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)


def _opaque(path: Path, img: Image.Image) -> Image.Image:
    """The image without its alpha channel, refused if any pixel is not fully opaque."""
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    if alpha.min() < 255:
        raise UserError(f"refusing image {path}: {int((alpha < 255).sum())} pixel(s) are "
                        f"transparent and have no defined colour; flatten it onto a background")
    return rgba.convert("RGB") if img.mode not in ("LA", "La") else img.convert("L")


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


