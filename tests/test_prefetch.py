"""Loading ahead of compute (skipgrad.data.prefetch) and the numerics options of the attack command
(--amp bf16, --channels-last): what they change, what they must not change."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skipgrad.cli import main
from skipgrad.data.prefetch import prefetched
from skipgrad.errors import UserError

JOB = ("--source", "zoo:fmnist-resnet20", "--attack", "ifgsm", "--sgm", "0.5", "--data",
       "fmnist:test", "--limit", "48", "--steps", "4", "--quiet")


def test_prefetch_keeps_order_and_loads_ahead_of_the_consumer() -> None:
    started = [threading.Event() for _ in range(4)]

    def load(i: int) -> int:
        started[i].set()
        return i * i

    loaded = prefetched(range(4), load, depth=2)
    first = next(loaded)
    assert first == (0, 0)
    # While item 0 is being used, items 1 and 2 are already being loaded (not item 3: depth 2).
    assert started[1].wait(10) and started[2].wait(10)
    assert list(loaded) == [(1, 1), (2, 4), (3, 9)]


def test_prefetch_depth_zero_loads_only_on_demand() -> None:
    calls = []
    loaded = prefetched(range(3), lambda i: calls.append(i) or i, depth=0)
    assert next(loaded) == (0, 0) and calls == [0]
    assert list(loaded) == [(1, 1), (2, 2)] and calls == [0, 1, 2]


def test_prefetch_raises_the_loaders_error_at_its_item_and_stops_cleanly() -> None:
    def load(i: int) -> int:
        if i == 2:
            raise UserError("cannot read image x2.png: truncated")
        return i

    seen = []
    with pytest.raises(UserError, match="x2.png: truncated"):
        for item, value in prefetched(range(10), load, depth=3):
            seen.append(value)
    assert seen == [0, 1]  # the items before the broken one are delivered, in order
    with pytest.raises(ValueError, match="prefetch depth"):
        next(prefetched(range(3), load, depth=-1))


def test_unreadable_image_is_still_one_line_exit_2_with_prefetch(tmp_path, capsys) -> None:
    data = tmp_path / "data" / "images"
    data.mkdir(parents=True)
    rows = ["filename,label"]
    for i in range(80):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8)).save(data / f"x{i:02d}.png")
        rows.append(f"x{i:02d}.png,{i % 10}")
    (data.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    # The last image, in the fifth group of 16 and after the 64 images whose clean accuracy
    # attack reports first, so four groups are attacked before it is read.
    (data / "x79.png").write_bytes((data / "x79.png").read_bytes()[:300])
    code = main(["attack", "--source", "zoo:fmnist-cnn", "--data", str(data.parent), "--steps",
                 "1", "--quiet", "--prefetch", "2", "--batch-size", "16",
                 "--out", str(tmp_path / "out")])
    # Random pixels draw the low-clean-accuracy warning too; the error itself is one line.
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "warning:" not in l]
    assert code == 2 and len(err) == 1 and "x79.png" in err[0]
    finished = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert len(finished) == 1 + 64  # the groups before it were finished and kept


def _levels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16)
            for p in sorted((folder / "images").glob("*.png"))}


def _source_success(folder: Path) -> float:
    rows = (folder / "manifest.csv").read_text().splitlines()[1:]
    fooled = [r.split(",")[2] != r.split(",")[4] for r in rows]
    return sum(fooled) / len(fooled)


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("numerics") / "fp32"
    assert main(["attack", *JOB, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("flags", [("--amp", "bf16"), ("--channels-last",),
                                   ("--amp", "bf16", "--channels-last")])
def test_numerics_options_stay_in_the_ball_and_close_to_float32(float32_run: Path, tmp_path: Path,
                                                                 flags: tuple[str, ...]) -> None:
    out = tmp_path / "run"
    assert main(["attack", *JOB, *flags, "--out", str(out)]) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert config.get("amp", "off") == ("bf16" if "--amp" in flags else "off")
    assert config.get("channels_last", False) == ("--channels-last" in flags)
    reference, changed = _levels(float32_run), _levels(out)
    assert reference.keys() == changed.keys()
    for name in reference:
        # Both are within 16 levels of the same clean image, so at most 32 apart.
        assert np.abs(reference[name] - changed[name]).max() <= 32
    # Documented tolerance (docs/scale.md): the white-box success moves by a few points at most.
    assert abs(_source_success(out) - _source_success(float32_run)) <= 0.10


def test_default_numerics_are_not_written_into_the_identity(float32_run: Path) -> None:
    # Folders made before these options existed must still resume: defaults are left out.
    config = json.loads((float32_run / "run.json").read_text())["config"]
    assert "amp" not in config and "channels_last" not in config


def test_changing_numerics_of_a_finished_folder_is_refused(float32_run: Path, capsys) -> None:
    assert main(["attack", *JOB, "--amp", "bf16", "--out", str(float32_run)]) == 2
    assert "amp" in capsys.readouterr().err


def test_float16_autocast_is_refused_with_the_reason(tmp_path: Path, capsys) -> None:
    from skipgrad.pipeline.job import AttackJob
    from skipgrad.pipeline.engine import run_attack_job

    with pytest.raises(UserError, match="underflow"):
        run_attack_job(AttackJob(sources=("zoo:fmnist-cnn",), data="fmnist:test", amp="fp16"),
                       tmp_path / "out")
    assert main(["attack", *JOB, "--amp", "fp16", "--out", str(tmp_path / "o")]) == 2
