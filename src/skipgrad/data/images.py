"""Reading images into [0, 1] tensors and writing lossless 8-bit PNGs atomically.

Every write goes to a temporary name in the destination folder and is renamed into place with
``os.replace`` (atomic on POSIX and Windows), so an interrupted run never leaves a half-written file;
a failed write (full disk, read-only folder) removes its temporary file and raises a UserError.

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
import ctypes
import functools
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from skipgrad.errors import UserError

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
        raise UserError(f"refusing image {path}: {_reason(exc)} (above the limit of {MAX_PIXELS} "
                        f"pixels; decompression bomb?)") from exc
    except _READ_ERRORS as exc:
        raise UserError(f"cannot read image {path}: {_reason(exc)}") from exc


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


def write_png(levels: np.ndarray, path: Path) -> None:
    """Write a uint8 image as PNG atomically (temporary file in the same folder, then rename)."""
    atomic_write_bytes(path, png_bytes(levels))


def write_pngs(images: Sequence[tuple[np.ndarray, Path]]) -> None:
    """Write several uint8 images as PNGs atomically, made durable together
    (:func:`atomic_write_many`)."""
    if images:
        atomic_write_many([(path, png_bytes(levels)) for levels, path in images])


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it and
    would race with threads that create files meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half."""
    atomic_write_many([(Path(path), data)])


def atomic_write_many(files: Sequence[tuple[Path, bytes]]) -> None:
    """Write several files as :func:`atomic_write_bytes` does one: each goes to a temporary name
    in its folder, is made durable, and only then renamed over its final name, so a final name
    never holds part of a file (not even after a power loss). Several files are made durable
    together, with one ``syncfs`` of their filesystem where the OS has it (Linux) instead of an
    ``fsync`` each: on ext4 every fsync is a journal commit, and writing an image group's PNGs
    one fsync at a time cost more than encoding them. On failure no temporary file is left."""
    temps: list[tuple[str, Path]] = []
    path = Path(files[0][0]) if files else Path(".")
    try:
        for path, data in files:
            temps.append((_write_temporary(Path(path), data, fsync=len(files) == 1), Path(path)))
        if len(files) > 1:
            _sync_together([tmp for tmp, _ in temps])
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException as exc:  # includes KeyboardInterrupt: never leave a temporary file
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise


def _write_temporary(path: Path, data: bytes, fsync: bool) -> str:
    """``data`` in a new temporary file beside ``path``; its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file what open() would (0666 minus the umask) so that
        # colleagues reading results on shared storage can, as they could with any other tool.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _sync_together(names: Sequence[str]) -> None:
    """Make the files durable: one syncfs of the filesystem holding the first (they share a
    folder), else an fsync each."""
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is not None:
        fd = os.open(names[0], os.O_RDONLY)
        try:
            if syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return
        finally:
            os.close(fd)
    for name in names:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _libc() -> object:
    """The C library, for syncfs (Linux); an object without it elsewhere."""
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else object()
    except OSError:
        return object()


def _write_error(path: Path, exc: OSError) -> UserError:
    # A full disk or read-only folder is the user's to fix, not a bug: one line, no traceback.
    reason = exc.strerror or _reason(exc)
    return UserError(f"cannot write {path}: {reason}; files written before are complete "
                     f"(writes are atomic) and re-running the same command resumes")


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
