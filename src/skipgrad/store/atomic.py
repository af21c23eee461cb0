"""Atomic file writes: readers see the old file or the whole new one, never half of it.

Every write goes to a temporary name in the destination folder and is renamed into place with
``os.replace`` (atomic on POSIX and Windows), so an interrupted run never leaves a half-written file;
a failed write (full disk, read-only folder) removes its temporary file and raises a UserError.
Temporary names are ``.<name>.<random>.tmp``: a killed writer's leftovers are recognisable
(:func:`skipgrad.store.records.remove_stale_temp_files`).
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skipgrad.data.images import png_bytes
from skipgrad.errors import UserError, first_line


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
    reason = exc.strerror or first_line(exc)
    return UserError(f"cannot write {path}: {reason}; files written before are complete "
                     f"(writes are atomic) and re-running the same command resumes")


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))

