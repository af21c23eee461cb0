"""Guards for an attack output folder: one live run at a time, paths that stay inside it, and a
clean stop on SIGINT/SIGTERM after the current batch.

The lock is a file ``DIR/.skipgrad.lock`` holding the owner's pid, host and process start time.
A lock whose process is gone (same host, pid dead or reused) is taken over, so a crashed or killed
run never leaves the folder stuck; a lock from another host is only reported, since its liveness
cannot be checked from here (the message names the file to delete once that run is known dead).
Under torchrun only rank 0 takes the lock: the other ranks write into the folder rank 0 holds.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from skipgrad.errors import UserError

LOCK_NAME = ".skipgrad.lock"


def inside(out: Path, relfile: str) -> Path:
    """``out / relfile``, refused unless its fully resolved location is inside ``out``.

    Names are validated when the data is read; this second check on the final path also catches
    symlinks planted inside the output folder (e.g. ``DIR/images`` pointing elsewhere).
    """
    target = Path(out) / relfile
    base = Path(out).resolve()
    if not target.resolve().is_relative_to(base):
        raise UserError(f"refusing to write {target}: it resolves to {target.resolve()}, outside "
                        f"the output folder {base}")
    return target


def refuse_data_overlap(out: Path, data: str | None) -> None:
    """Refuse an output folder equal to, inside, or containing the data folder ``data`` (compared
    after resolving symlinks), before anything is written: adversarial images written into the
    data would be read back as more images (``images/`` as an extra class) by the next run."""
    if not data or data.startswith("fmnist:"):
        return
    folder = Path(data).expanduser()
    if not folder.is_dir():
        return  # not a folder: opening the data reports it
    here, there = Path(out).expanduser().resolve(), folder.resolve()
    if here == there:
        where = "is the data folder"
    elif here.is_relative_to(there):
        where = "is inside the data folder"
    elif there.is_relative_to(here):
        where = "contains the data folder"
    else:
        return
    raise UserError(f"output folder {out} {where} {data}; adversarial images written there would "
                    f"be read as data by later runs; choose an --out outside it")


# ---------------------------------------------------------------- the lock

def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first); None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), to tell a reused pid
    from the original owner; None where /proc is not available."""
    fields = _proc_stat(pid)
    return None if fields is None else fields[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    fields = _proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):  # a killed owner not yet reaped: dead
        return False
    now = None if fields is None else fields[19]
    return started is None or now is None or now == started


def _owner_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid)}


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):  # half-written by a crash between create and write: stale
        return {"pid": -1, "host": socket.gethostname()}


def _is_stale(record: dict) -> bool:
    if not record:
        return True
    if record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    return not isinstance(pid, int) or pid <= 0 or not _alive(pid, record.get("started"))


def _try_create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # minus the umask
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    return True


def _take_over(path: Path, stale: dict) -> None:
    """Move a stale lock aside; if another process replaced it meanwhile, put theirs back."""
    aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != stale and not _is_stale(_read_lock(aside)):
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def acquire(out: Path) -> dict:
    """Take the lock of ``out`` or raise UserError naming the live owner."""
    path, record = Path(out) / LOCK_NAME, _owner_record()
    for _ in range(5):
        if _try_create(path, record):
            return record
        holder = _read_lock(path)
        if not _is_stale(holder):
            raise UserError(f"output folder {out} is in use by another skipgrad run (pid "
                            f"{holder.get('pid')} on {holder.get('host')}); wait for it, use "
                            f"another --out, or delete {path} if that run is dead")
        _take_over(path, holder)
    raise UserError(f"could not take the lock {path}: it keeps changing; is another run starting?")


def release(out: Path, record: dict) -> None:
    """Remove the lock if it is still ours (never someone else's that took over)."""
    path = Path(out) / LOCK_NAME
    if _read_lock(path) == record:
        with contextlib.suppress(OSError):  # a read-only or full disk must not mask the real error
            path.unlink()


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold the output folder's lock (rank 0 only under torchrun) and stop cleanly on signals."""
    is_rank0 = os.environ.get("RANK", "0") in ("", "0")
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        record = acquire(out) if is_rank0 else None
    except PermissionError as exc:
        raise UserError(f"cannot write in output folder {out}: {exc.strerror}") from exc
    except OSError as exc:
        raise UserError(f"cannot create the lock in output folder {out}: {exc.strerror}") from exc
    try:
        with stop_after_batch():
            yield
    finally:
        if record is not None:
            release(out, record)


# ---------------------------------------------------------------- naming images in errors

@contextlib.contextmanager
def naming_images(files: list[str]) -> Iterator[None]:
    """Re-raise the engine's non-finite error (which knows batch positions only) as a UserError
    naming the image files, so that a broken checkpoint is traced to the inputs it broke on."""
    from skipgrad.attacks.loop import NonFiniteGradientError

    try:
        yield
    except NonFiniteGradientError as exc:
        named = [files[i] for i in exc.positions if 0 <= i < len(files)]
        shown = ", ".join(named[:10]) + (f" and {len(named) - 10} more" if len(named) > 10 else "")
        raise UserError(f"{str(exc).split(' for images')[0]} for {shown}; nothing was written for "
                        f"this group (a broken checkpoint or an overflowing model?)") from exc


# ---------------------------------------------------------------- stopping on signals

class StopRequested(KeyboardInterrupt):
    """A run stopped cleanly after a batch on SIGINT/SIGTERM; ``exit_code`` follows the shell's
    128 + signal number convention (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received; stopped after the current batch")
        self.exit_code = 128 + signum


class _StopFlag:
    """Set by the first SIGINT/SIGTERM; the run loops check it between batches. ``depth`` counts
    the nested :func:`stop_after_batch` regions: only the outermost installs and resets."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.depth = 0

    def handle(self, signum: int, _frame: object) -> None:
        if self.signal is not None:  # a second signal: stop now (writes are atomic anyway)
            raise KeyboardInterrupt
        self.signal = signum


_FLAG = _StopFlag()


@contextlib.contextmanager
def stop_after_batch() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into a request that :func:`check_stop` honours after the batch.

    Regions nest: a transfer holds one around all its attack folders and its evaluation, and each
    folder's attack holds its own inside. The request belongs to the outermost region, so a
    signal that lands after an inner region's last check (while a finished folder is reused, or
    its manifest completed) stops the run at the next check instead of being dropped when the
    inner region ends -- which let a transfer carry on through its remaining folders."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    if _FLAG.depth:
        _FLAG.depth += 1
        try:
            yield
        finally:
            _FLAG.depth -= 1
        return
    _FLAG.signal = None
    previous = {sig: signal.signal(sig, _FLAG.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    _FLAG.depth = 1
    try:
        yield
    finally:
        _FLAG.depth = 0
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _FLAG.signal = None


def check_stop() -> None:
    """Raise :class:`StopRequested` (a KeyboardInterrupt) if a stop was requested; called between
    attack groups, between evaluation batches (per target) and between a transfer's folders."""
    if _FLAG.signal is not None:
        raise StopRequested(_FLAG.signal)
