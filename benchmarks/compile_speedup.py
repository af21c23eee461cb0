"""--compile: steady-state speed-up of the source's forward + input-gradient backward (SGM attached)
compiled vs eager, alternating repeats in one run after the compile, at each --batch; then, with
--files N, what it does to the results: ``skipgrad attack`` eager and with ``--compile`` on the same
N images (MI + SGM 0.5), the fraction of byte-identical PNGs, the largest level difference and the
change of the white-box and transfer success rates. The last line is the speed-up at the first
batch size.

    python benchmarks/compile_speedup.py [--batch 32 256] [--steps 10] [--repeats 3] [--files 256]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skipgrad.attacks.compiled import compiled_sources
from skipgrad.attacks.config import AttackSpec
from skipgrad.attacks.loop import input_gradient
from skipgrad.attacks.randomness import PerImageRandom
from skipgrad.data.datasets import open_dataset
from skipgrad.models import load_model

SOURCE, TARGET = "zoo:fmnist-preact-resnet20", "zoo:fmnist-vgg"


def gradients(sources, images, labels, spec, steps: int) -> float:
    """Seconds for ``steps`` input gradients of the batch."""
    rng = PerImageRandom(0, list(range(len(images))))
    start = time.perf_counter()
    for _ in range(steps):
        input_gradient(sources, images, labels, spec, rng)
    return time.perf_counter() - start


def speed_up(batch: int, steps: int, repeats: int) -> tuple[float, float, float, float]:
    """(compile seconds, eager median, compiled median, speed-up) at one batch size."""
    data = open_dataset("fmnist:test", limit=batch)
    images, labels = data.load(data.samples), torch.tensor([s.label for s in data.samples])
    eager_model, compiled_model = load_model(SOURCE), load_model(SOURCE)
    eager_spec = AttackSpec(sgm=0.5)
    import skipgrad

    with compiled_sources([compiled_model], eager_spec) as (compiled, spec), \
            skipgrad.skip_gradient(eager_model.eval(), 0.5):
        compile_seconds = gradients(compiled, images, labels, spec, 1)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        gradients([eager_model], images, labels, AttackSpec(), 1)  # warm-up
        for _ in range(repeats):
            times["eager"].append(gradients([eager_model], images, labels, AttackSpec(), steps))
            times["compiled"].append(gradients(compiled, images, labels, spec, steps))
    eager, fast = (statistics.median(times[k]) for k in ("eager", "compiled"))
    return compile_seconds, eager, fast, eager / fast


def attack(out: Path, images: int, extra: list[str]) -> str:
    cmd = [sys.executable, "-m", "skipgrad", "attack", "--source", SOURCE, "--attack", "mi",
           "--sgm", "0.5", "--data", "fmnist:test", "--limit", str(images), "--quiet", "--out",
           str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def transfer(out: Path) -> float:
    cmd = [sys.executable, "-m", "skipgrad", "evaluate", str(out), "--target", TARGET, "--quiet",
           "--json", str(out / "eval.json")]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    import json

    return json.loads((out / "eval.json").read_text())["targets"][TARGET]["success_rate"]


def compare_files(images: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        eager, compiled = Path(tmp) / "eager", Path(tmp) / "compiled"
        print("eager:    " + attack(eager, images, []), flush=True)
        print("compiled: " + attack(compiled, images, ["--compile"]), flush=True)
        same, worst = 0, 0
        for path in sorted((eager / "images").glob("*.png")):
            a = np.asarray(Image.open(path), dtype=np.int16)
            b = np.asarray(Image.open(compiled / "images" / path.name), dtype=np.int16)
            same += bool((a == b).all())
            worst = max(worst, int(np.abs(a - b).max()))
        rates = transfer(eager), transfer(compiled)
    print(f"identical PNGs: {same}/{images} ({100 * same / images:.1f}%), largest difference "
          f"{worst} level(s); transfer to {TARGET}: eager {100 * rates[0]:.1f}%, compiled "
          f"{100 * rates[1]:.1f}% ({100 * (rates[1] - rates[0]):+.1f} points)")


def main() -> None:
    parser = argparse.ArgumentParser(description="torch.compile speed-up and result tolerance")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", type=int, default=0, help="also compare the files of N images")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    ratios = []
    for batch in args.batch:
        compile_seconds, eager, fast, ratio = speed_up(batch, args.steps, args.repeats)
        ratios.append(ratio)
        print(f"{SOURCE} + SGM 0.5, batch {batch}: compile {compile_seconds:.1f} s; {args.steps} "
              f"gradients eager {eager:.2f} s, compiled {fast:.2f} s (median of {args.repeats}): "
              f"speed-up {ratio:.2f}x", flush=True)
    if args.files:
        compare_files(args.files)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"compile_speedup {ratios[0]:.2f}")


if __name__ == "__main__":
    main()
