"""Scale contracts of the ``attack`` command (docs/scale.md): for a given group size (--batch-size,
recorded in run.json) the files do not depend on prefetching, on the number of torchrun processes,
or on a ``kill -9`` part-way followed by a re-run; a folder resumes only with its own group size."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skipgrad.cli import main
from skipgrad.pipeline.device import DEFAULT_GROUP_SIZE
from skipgrad.store.records import manifest_part
from tests.conftest import torch_threads

PYTHON = Path(sys.executable)
TORCHRUN = PYTHON.with_name("torchrun")
# A tiny job: two fixed groups (16 + 8) with GROUPS.
SMALL = ("--source", "zoo:fmnist-cnn", "--attack", "mi", "--data", "fmnist:test", "--limit", "24",
         "--steps", "2", "--quiet")
GROUP = 16
GROUPS = ("--batch-size", str(GROUP))
# A job long enough to be killed part-way (~0.5 s per group), with random draws (DI) and SGM.
LONG = ("--source", "zoo:fmnist-resnet20", "--attack", "mi+di", "--sgm", "0.5", "--data",
        "fmnist:test", "--limit", "64", "--steps", "5", "--quiet", *GROUPS)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # In-process runs are compared byte for byte with subprocesses started with ENV: the same
    # thread count makes them the same computation.
    with torch_threads(1):
        yield


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) -> its bytes; run.json without the
    environment block (timings, world size and batch size are recorded, not compared)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "run.json":
            record = json.loads(data)
            record.pop("environment")
            data = json.dumps(record, sort_keys=True).encode()
        files[str(path.relative_to(folder))] = data
    return files


def _assert_same(a: Path, b: Path) -> None:
    left, right = _tree(a), _tree(b)
    assert sorted(left) == sorted(right)
    different = [name for name in left if left[name] != right[name]]
    assert not different, f"files differ: {different}"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), "-m", "skipgrad", *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    # --standalone picks a free rendezvous port: tests running side by side do not collide.
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "skipgrad",
                           *args], env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The small job run once in this process in groups of 16."""
    out = tmp_path_factory.mktemp("scale") / "reference"
    assert main(["attack", *SMALL, *GROUPS, "--out", str(out)]) == 0
    return out


def test_groups_are_fixed_and_recorded(reference: Path, tmp_path: Path) -> None:
    run = json.loads((reference / "run.json").read_text())
    assert run["config"]["group_size"] == GROUP
    assert "world_size" not in run["config"]  # how the run was sharded is not its identity
    assert len(list((reference / "images").glob("*.png"))) == 24
    assert main(["attack", *SMALL, "--out", str(tmp_path / "default")]) == 0
    default = json.loads((tmp_path / "default" / "run.json").read_text())
    assert default["config"]["group_size"] == DEFAULT_GROUP_SIZE["cpu"]


@pytest.mark.parametrize("flags", [("--prefetch", "0"), ("--prefetch", "5"), ()])
def test_prefetch_does_not_change_files(reference: Path, tmp_path: Path,
                                        flags: tuple[str, ...]) -> None:
    out = tmp_path / "run"
    assert main(["attack", *SMALL, *GROUPS, *flags, "--out", str(out)]) == 0
    _assert_same(reference, out)


def test_resuming_with_another_batch_size_is_refused_and_rewrites_nothing(
        reference: Path, tmp_path: Path, capsys) -> None:
    """A folder started in groups of 16 (as every folder made before --batch-size chose the
    group) resumes without --batch-size in its own groups; --batch-size 8 is one line, exit 2."""
    out = tmp_path / "resumed"
    # SMALL's own --limit 24 replaced (a single-valued option given twice is refused)
    first_20 = ["20" if before == "--limit" else a for before, a in zip(("",) + SMALL, SMALL)]
    assert main(["attack", *first_20, *GROUPS, "--out", str(out)]) == 0
    before, run_json = _tree(out), (out / "run.json").read_bytes()
    capsys.readouterr()
    assert main(["attack", *SMALL, "--batch-size", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 8" in err[0] and "groups of 16" in err[0]
    assert _tree(out) == before and (out / "run.json").read_bytes() == run_json
    assert main(["attack", *SMALL, "--out", str(out)]) == 0  # nothing given: the folder's own
    _assert_same(reference, out)


def test_resume_after_partial_group_stale_temp_and_parts(reference: Path, tmp_path: Path) -> None:
    """What a kill leaves (a group half written, a temporary file, a sharded run's manifest part)
    is tidied and finished to the same bytes."""
    out = tmp_path / "resumed"
    assert main(["attack", *SMALL, *GROUPS, "--out", str(out)]) == 0
    (out / "images" / "test_00020.png").unlink()  # group 1 is now partial
    rows = (out / "manifest.csv").read_text().splitlines()
    (out / "manifest.csv").write_text("\n".join(rows[:1] + rows[1:5]) + "\n")
    manifest_part(out, 1).write_text("\n".join(rows[:1] + rows[5:12]) + "\n")
    (out / "images" / ".test_00003.png.abc123_x.tmp").write_bytes(b"half a png")
    assert main(["attack", *SMALL, "--out", str(out)]) == 0
    _assert_same(reference, out)


def test_torchrun_two_processes_write_the_same_files(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    done = _torchrun("attack", *SMALL, *GROUPS, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("24 images from zoo:fmnist-cnn in") == 1  # only rank 0 reports
    _assert_same(reference, out)
    assert json.loads((out / "run.json").read_text())["environment"]["world_size"] == 2
    # The ranks' manifest parts carry the perturbation norms as a single process writes them.
    assert (out / "manifest.csv").read_text().startswith(
        "id,file,label,target_label,source_pred,sha256,l2,linf\n")


def test_torchrun_evaluate_gathers_the_same_counts(reference: Path, tmp_path: Path) -> None:
    targets = ("--target", "zoo:fmnist-resnet20", "--target", "zoo:fmnist-vgg", "--batch-size", "5",
               "--quiet")
    single, sharded = tmp_path / "single.json", tmp_path / "sharded.json"
    assert main(["evaluate", str(reference), *targets, "--json", str(single)]) == 0
    done = _torchrun("evaluate", str(reference), *targets, "--json", str(sharded))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(sharded.read_text()) == json.loads(single.read_text())
    assert done.stdout.count("transfer success of") == 1


def _kill_part_way(out: Path) -> None:
    """Start the long job and SIGKILL it once a group's images exist but before it finishes."""
    proc = subprocess.Popen([str(PYTHON), "-m", "skipgrad", "attack", *LONG, "--out", str(out)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "images").glob("*.png"))) >= GROUP:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the attack finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    _kill_part_way(killed)
    assert len(list((killed / "images").glob("*.png"))) < 64
    for path in killed.rglob("*"):  # whatever is visible under a final name is whole
        if path.suffix == ".png" and not path.name.startswith("."):
            assert path.read_bytes().endswith(b"IEND\xaeB`\x82")
    rerun = _cli("attack", *LONG, "--out", str(killed))
    assert rerun.returncode == 0, rerun.stderr
    assert main(["attack", *LONG, "--out", str(clean)]) == 0
    _assert_same(clean, killed)
    assert not [p for p in killed.rglob(".*") if p.is_file()]  # no temp files, no manifest parts


@pytest.mark.slow
def test_torchrun_killed_and_resumed_on_one_process(tmp_path: Path) -> None:
    """A sharded run killed part-way (parts on disk) is finished by a single process."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m",
                             "skipgrad", "attack", *LONG, "--out", str(killed)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and len(list(killed.glob(".manifest-rank*.csv"))) < 1:
            time.sleep(0.01)
        # torchrun starts its workers in sessions of their own: kill each process of the tree.
        tree = [*_descendants(proc.pid), proc.pid]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # Orphaned workers are reaped by init a moment later; until then their pid (a zombie) still
    # looks alive to the folder lock.
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert main(["attack", *LONG, "--out", str(killed)]) == 0
    assert main(["attack", *LONG, "--out", str(clean)]) == 0
    _assert_same(clean, killed)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found
