"""Hostile inputs, unsafe checkpoints, concurrent runs and failing disks, through the real command
line on real files (issue 8). Each test is cited by docs/security.md for the guarantee it enforces.

The source model is the bundled ``zoo:fmnist-cnn`` with ``--steps 1`` so that every run is cheap.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import time
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from skipgrad.store import outdir
from skipgrad.cli import main
from skipgrad.data import images as image_io
from skipgrad.store import atomic
from skipgrad.models.checkpoints import TRUST_PICKLE_ENV, read_checkpoint
from skipgrad.models.loading import zoo_weights_path
from tests.conftest import torch_threads

SOURCE = "zoo:fmnist-cnn"


def _png(path: Path, value: int = 100, size: tuple[int, int] = (28, 28)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)
    return path


def _labels_csv(folder: Path, names: list[str]) -> Path:
    lines = ["filename,label"] + [f"{name},{i % 10}" for i, name in enumerate(names)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _attack(data: Path | str, out: Path, *extra: str) -> int:
    # A single-valued option is given once (twice is refused): ``extra`` replaces these defaults.
    defaults = [a for flag, value in (("--eps", "8"), ("--step-size", "2"), ("--steps", "1"))
                if flag not in extra for a in (flag, value)]
    return main(["attack", "--source", SOURCE, "--data", str(data), "--out", str(out),
                 *defaults, "--quiet", *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("skipgrad: error:"), err
    assert "Traceback" not in err
    return err


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ---------------------------------------------------------------- 1. untrusted tables and paths

@pytest.mark.parametrize("entry, reason", [
    ("../outside.png", "'..'"), ("images/../../outside.png", "'..'"),
    ("{outside}", "absolute"), ("C:/x.png", "absolute"), ("..\\outside.png", "backslash"),
])
def test_label_table_entries_outside_the_data_folder_are_refused(tmp_path, capsys, entry,
                                                                 reason) -> None:
    outside = _png(tmp_path / "outside.png")
    data = _labels_csv(tmp_path / "data", [entry.format(outside=outside)])
    _png(data / "images" / "ok.png")
    before = _files(tmp_path)
    assert _attack(data, tmp_path / "out") == 2
    err = _one_error_line(capsys)
    assert "labels.csv line 2" in err and reason in err
    assert _files(tmp_path) - before <= {tmp_path / "out"}  # nothing written anywhere


def test_symlinks_leaving_the_data_folder_are_refused(tmp_path, capsys) -> None:
    outside = _png(tmp_path / "secret" / "x.png")
    data = _labels_csv(tmp_path / "data", ["link.png"])
    (data / "images").mkdir()
    (data / "images" / "link.png").symlink_to(outside)
    assert _attack(data, tmp_path / "out") == 2
    assert "link.png" in _one_error_line(capsys)
    classes = tmp_path / "classes"
    _png(classes / "0" / "a.png")
    (classes / "1").symlink_to(outside.parent, target_is_directory=True)
    assert _attack(classes, tmp_path / "out2") == 2
    assert "1/x.png" in _one_error_line(capsys)


def test_images_csv_ids_cannot_climb_out(tmp_path, capsys) -> None:
    _png(tmp_path / "x.png")
    data = tmp_path / "nips"
    _png(data / "images" / "a.png")
    (data / "images.csv").write_text("ImageId,TrueLabel,TargetClass\n../../x,1,2\n")
    assert _attack(data, tmp_path / "out") == 2
    assert "../../x" in _one_error_line(capsys)


@pytest.mark.parametrize("names", [
    ["a/./x.png", "a/x.png"], ["A.png", "a.png"],
    [unicodedata.normalize("NFD", "é.png"), unicodedata.normalize("NFC", "é.png")],
])
def test_names_colliding_after_normalisation_are_refused(tmp_path, capsys, names) -> None:
    data = _labels_csv(tmp_path / "data", names)
    for name in names:
        _png(data / "images" / name)
    assert _attack(data, tmp_path / "out") == 2
    assert "would both be written" in _one_error_line(capsys)


def test_outputs_never_land_outside_out_even_through_planted_symlinks(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    for i in range(20):  # two groups of 16: the second is written after the symlink is planted
        _png(data / str(i // 10) / f"{i:02d}.png", value=i)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert _attack(data, out, "--limit", "16") == 0
    elsewhere.mkdir()
    os.rename(out / "images" / "1", tmp_path / "moved")
    (out / "images" / "1").symlink_to(elsewhere, target_is_directory=True)
    assert _attack(data, out) == 2
    assert "outside the output folder" in _one_error_line(capsys)
    assert not list(elsewhere.iterdir())


# ---------------------------------------------------------------- 2. untrusted checkpoints

class _Payload:
    """Unpickling this object would run ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys) -> None:
    marker = tmp_path / "MARKER"
    weights = load_file(str(zoo_weights_path("cnn")))
    torch.save({"state_dict": weights, "payload": _Payload(marker)}, tmp_path / "evil.pth")
    for flags in (["--weights", str(tmp_path / "evil.pth")],):
        assert _attack("fmnist:test", tmp_path / "out", "--limit", "2", *flags) == 2
        err = _one_error_line(capsys)
        assert "evil.pth" in err and "run any code" in err and "safetensors" in err
    assert _attack("fmnist:test", tmp_path / "run", "--limit", "1") == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--target", f"file:{tmp_path / 'evil.pth'}",
                 "--quiet"]) == 2
    assert "run any code" in _one_error_line(capsys)
    assert not marker.exists()


def test_trust_opt_in_is_explicit_and_loud(tmp_path, monkeypatch, capsys) -> None:
    torch.save({"w": torch.zeros(2), "where": Path("x")}, tmp_path / "legacy.pth")
    with pytest.raises(ValueError, match="run any code"):
        read_checkpoint(tmp_path / "legacy.pth")
    monkeypatch.setenv(TRUST_PICKLE_ENV, "1")
    state, _ = read_checkpoint(tmp_path / "legacy.pth")
    assert list(state) == ["w"] and "WARNING" in capsys.readouterr().err


@pytest.mark.parametrize("change, expected", [
    ("shape", "'features.3.weight' has shape (64, 32, 3, 1)"),
    ("missing", "'classifier.3.bias' is missing"),
    ("nan", "'features.0.bias' contains NaN"),
])
def test_misfit_weights_name_the_first_mismatched_tensor(tmp_path, capsys, change,
                                                         expected) -> None:
    weights = load_file(str(zoo_weights_path("cnn")))
    if change == "shape":
        weights["features.3.weight"] = weights["features.3.weight"][..., :1].contiguous()
    elif change == "missing":
        del weights["classifier.3.bias"]
    else:
        weights["features.0.bias"][3] = float("nan")
    save_file(weights, str(tmp_path / "w.safetensors"))
    assert _attack("fmnist:test", tmp_path / "out", "--weights",
                   str(tmp_path / "w.safetensors"), "--limit", "2") == 2
    assert expected in _one_error_line(capsys)


# ---------------------------------------------------------------- 3. hostile images

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(path: Path, side: int = 100_000) -> Path:
    """A 100 kB-pixel-row PNG header claiming side x side pixels (10^10): a decompression bomb."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side + 1), 9)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def _hostile(folder: Path, kind: str) -> Path:
    """One hostile image ``folder/images/bad.*`` next to a normal 28x28 PNG."""
    images = folder / "images"
    _png(images / "good.png")
    if kind == "bomb":
        return _bomb(images / "bad.png")
    if kind == "truncated":
        data = _png(images / "bad.png", value=7).read_bytes()
        (images / "bad.png").write_bytes(data[: len(data) // 2])
        return images / "bad.png"
    if kind == "mixed":
        return _png(images / "bad.png", size=(30, 28))
    if kind == "cmyk":
        Image.new("CMYK", (28, 28), (0, 50, 100, 0)).save(images / "bad.jpg")
        return images / "bad.jpg"
    rgba = np.full((28, 28, 4), 255, dtype=np.uint8)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(images / "bad.png")
    return images / "bad.png"


@pytest.mark.parametrize("kind, reason", [
    ("bomb", "above the limit"), ("truncated", "cannot read image"), ("mixed", "mismatched"),
    ("cmyk", "CMYK"), ("transparent", "transparent"),
])
def test_hostile_images_are_refused_naming_the_file(tmp_path, capsys, kind, reason) -> None:
    bad = _hostile(tmp_path / "data", kind)
    _labels_csv(tmp_path / "data", ["good.png", bad.name])
    assert _attack(tmp_path / "data", tmp_path / "out") == 2
    err = _one_error_line(capsys)
    assert reason in err and bad.name in err


def test_pillow_bomb_limit_is_an_error_not_a_warning(tmp_path, monkeypatch) -> None:
    path = _png(tmp_path / "big.png", size=(40, 40))
    monkeypatch.setattr(image_io, "MAX_PIXELS", 1000)
    with pytest.raises(ValueError, match="big.png.*above the limit"):
        image_io.read_image(path, 1)


def test_sixteen_bit_palette_alpha_and_jpeg_inputs_are_converted_as_documented(tmp_path,
                                                                             capsys) -> None:
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    wide = np.linspace(0, 65535, 28 * 28).reshape(28, 28).astype(np.uint16)
    Image.fromarray(wide).save(images / "a16.png")
    rgb = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P").save(images / "b_palette.png")
    Image.fromarray(np.dstack([rgb, np.full((28, 28), 255, np.uint8)])).save(images / "c_rgba.png")
    Image.fromarray(rgb).save(images / "d.jpg", quality=95)
    gray16 = image_io.read_image(images / "a16.png", 1)
    expected = np.rint(wide / 257.0)
    assert np.array_equal((gray16[0] * 255).round().numpy(), expected)  # scaled, never clipped
    assert np.array_equal((image_io.read_image(images / "c_rgba.png", 3) * 255).round()
                          .permute(1, 2, 0).numpy(), rgb)
    _labels_csv(tmp_path / "data", ["a16.png", "b_palette.png", "c_rgba.png", "d.jpg"])
    assert _attack(tmp_path / "data", tmp_path / "out", "--channels", "1") == 0
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 4


# ---------------------------------------------------------------- 4. concurrency and faults

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_live_run_is_refused_and_sigterm_stops_cleanly(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "skipgrad", "attack", "--source", SOURCE, "--data", "fmnist:test",
           "--limit", "400", "--out", str(out), "--steps", "30", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "manifest.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # wait for the first group: the lock is held and work is under way
        assert (out / outdir.LOCK_NAME).exists()
        assert _attack("fmnist:test", out, "--limit", "400", "--steps", "30") == 2
        assert "in use by another skipgrad run" in _one_error_line(capsys)
        first.terminate()  # SIGTERM
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143 and "Traceback" not in err and "interrupted" in err
    assert not (out / outdir.LOCK_NAME).exists() and not list(out.rglob(".*.tmp"))
    finished = _assert_manifest_valid(out)
    assert finished % 16 == 0 and 0 < finished < 400  # stopped after a whole group


def _assert_manifest_valid(out: Path) -> int:
    import csv

    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        with Image.open(out / row["file"]) as image:
            image.load()  # every listed file is a whole PNG
    return len(rows)


def test_lock_of_a_dead_run_is_taken_over_and_foreign_hosts_are_respected(tmp_path,
                                                                         capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lock = out / outdir.LOCK_NAME
    lock.write_text(f'{{"pid": {_dead_pid()}, "host": "{os.uname().nodename}"}}')
    assert _attack("fmnist:test", out, "--limit", "2") == 0
    assert not lock.exists()
    lock.write_text('{"pid": 1, "host": "some-other-node"}')
    assert _attack("fmnist:test", out, "--limit", "3") == 2
    assert "some-other-node" in _one_error_line(capsys)


def test_lock_of_a_killed_but_unreaped_run_counts_as_dead(tmp_path) -> None:
    # A SIGKILLed owner whose parent has not reaped it yet is a zombie: its pid still answers
    # kill(pid, 0), but it will never finish the run, so its lock must not block a resume.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": child.pid, "host": socket.gethostname(),
                  "started": outdir._start_time(child.pid)}
        assert not outdir._is_stale(record)  # alive: respected
        child.kill()
        deadline = time.monotonic() + 30
        while outdir._proc_stat(child.pid)[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outdir._is_stale(record)  # a zombie (not yet waited for): taken over
    finally:
        child.kill()
        child.wait()


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch) -> None:
    with outdir.exclusive(tmp_path):
        monkeypatch.setenv("RANK", "1")
        with outdir.exclusive(tmp_path):  # another rank of the same torchrun job: not refused
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(ValueError, match="in use"):
            with outdir.exclusive(tmp_path):
                pass


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left"),
                                         (errno.EROFS, "Read-only file system")])
def test_full_or_read_only_disk_mid_run_stops_cleanly_and_the_rerun_completes(
        tmp_path, monkeypatch, capsys, code, words) -> None:
    out, real_fsync, calls = tmp_path / "out", os.fsync, []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) > 20:  # run.json, the first group of 16 and its manifest, then the disk fails
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    # A group's PNGs are made durable together: one syncfs on Linux, an fsync each where there
    # is none -- the path taken here, so that the failure can be injected at a given file.
    monkeypatch.setattr(atomic, "_libc", lambda: object())
    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert _attack("fmnist:test", out, "--limit", "40", "--batch-size", "16") == 2
    assert words in _one_error_line(capsys)
    assert _assert_manifest_valid(out) == 16 and not list(out.rglob(".*.tmp"))
    assert not (out / outdir.LOCK_NAME).exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _attack("fmnist:test", out, "--limit", "40") == 0  # the folder's group size is kept
    assert _assert_manifest_valid(out) == 40


def test_sigint_and_sigterm_requests_stop_after_the_group(monkeypatch) -> None:
    import signal

    with outdir.stop_after_batch():
        outdir.check_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled: only a request, the group goes on
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            outdir.check_stop()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _transfer_args(out: Path, *extra: str) -> list[str]:
    return ["transfer", "--source", SOURCE, "--attack", "ifgsm", "--attack", "mi", "--target",
            "zoo:fmnist-vgg", "--data", "fmnist:test", "--out", str(out), "--eps", "8",
            "--step-size", "2", "--steps", "1", "--quiet", *extra]


def test_sigterm_while_a_transfer_reuses_a_folder_is_not_dropped(tmp_path, monkeypatch,
                                                                 capsys) -> None:
    """A SIGTERM that lands inside a folder's attack region after its last group check (here: a
    finished folder being reused) used to be reset when that region ended, and the transfer ran
    on through every remaining folder and the evaluation; it must stop at the next check."""
    import signal

    import skipgrad.pipeline.engine as runner

    out = tmp_path / "t"
    assert main(_transfer_args(out, "--limit", "4")) == 0
    before = (out / "transfer.json").read_bytes()
    real, calls = runner.clean_accuracy_report, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # during the first (reused) folder
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "clean_accuracy_report", signalled)
    assert main(_transfer_args(out, "--limit", "4")) == 143
    assert len(calls) == 1  # the second folder was never entered
    assert "interrupted" in capsys.readouterr().err
    assert (out / "transfer.json").read_bytes() == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_during_evaluate_stops_after_the_current_target_batch(tmp_path, monkeypatch,
                                                                      capsys) -> None:
    import signal

    import skipgrad.pipeline.evaluate as evaluate

    out = tmp_path / "a"
    assert _attack("fmnist:test", out, "--limit", "12") == 0
    real, calls = evaluate.predict, []

    def signalled(models, images):
        calls.append(len(images))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(models, images)

    monkeypatch.setattr(evaluate, "predict", signalled)
    code = main(["evaluate", str(out), "--target", "zoo:fmnist-vgg", "--target", SOURCE,
                 "--batch-size", "4", "--quiet", "--json", str(tmp_path / "e.json")])
    assert code == 143 and "interrupted" in capsys.readouterr().err
    assert calls == [4]  # the batch in hand finished; no other (batch, target) was started
    assert not (tmp_path / "e.json").exists() and not (out / "evaluations.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["attack", "evaluation"])
def test_sigterm_mid_transfer_exits_and_the_rerun_gives_the_same_bytes(tmp_path, phase) -> None:
    """A real process: SIGTERM during the attack phase (after the first group's manifest) or
    during the evaluation (after the first folder's evaluations.json, with a slow smoothed target
    still to score) exits 143 well within a minute, and re-running finishes the folder to the
    same bytes as an uninterrupted run."""
    import signal

    smooth = "zoo:fmnist-vgg+smooth:0.1,n=64"
    extra = ("--limit", "64", "--batch-size", "16", "--target", smooth)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, reference = tmp_path / "run", tmp_path / "reference"
    with torch_threads(1):  # the same thread count as the subprocess (env): the same bytes
        assert main(_transfer_args(reference, *extra)) == 0
    first = out / "attacks" / "zoo-fmnist-cnn__ifgsm__nosgm"
    marker = first / ("manifest.csv" if phase == "attack" else "evaluations.json")
    cmd = [sys.executable, "-m", "skipgrad", *_transfer_args(out, *extra)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "finished before the signal could be sent"
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=60)  # a liveness bound, not a speed test
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err and took < 60
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(outdir.LOCK_NAME))
    assert not (out / "transfer.json").exists()  # the matrix is only written whole
    with torch_threads(1):
        assert main(_transfer_args(out, *extra)) == 0  # resume
    names = ["transfer.json", "transfer.csv", "transfer.md"] + [
        str(p.relative_to(reference)) for p in (reference / "attacks").rglob("*")
        if p.suffix in (".png", ".csv")]
    assert len(names) > 2 * 64
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


# ---------------------------------------------------------------- 5. numerics

def test_overflowing_checkpoint_names_the_image_files(tmp_path, capsys) -> None:
    weights = load_file(str(zoo_weights_path("cnn")))
    weights["classifier.3.weight"][:, :5] = float("inf")  # a diverged training run
    save_file(weights, str(tmp_path / "inf.safetensors"))
    data = _labels_csv(tmp_path / "data", ["x0.png", "x1.png"])
    _png(data / "images" / "x0.png", value=200)
    _png(data / "images" / "x1.png", value=60)
    assert _attack(data, tmp_path / "out", "--weights", str(tmp_path / "inf.safetensors")) == 2
    err = _one_error_line(capsys)
    assert "non-finite" in err and "x0.png" in err


@pytest.mark.parametrize("flags", [
    ["--eps", "0"], ["--eps", "nan"], ["--eps", "300"], ["--step-size", "inf"],
    ["--steps", "0"], ["--sgm", "0"], ["--sgm", "1.5"], ["--sgm", "nan"], ["--decay", "nan"],
    ["--di-prob", "2"], ["--di-scale", "0.5"], ["--ti-kernel", "4"], ["--attack", "mi+ni"],
])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, capsys, flags) -> None:
    assert _attack("fmnist:test", tmp_path / "out", "--limit", "1", *flags) == 2
    err = _one_error_line(capsys)
    assert "given twice" not in err and "would change nothing" not in err  # the value's fault
    assert not (tmp_path / "out").exists()
