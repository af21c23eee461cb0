"""Pipeline overhead: ``skipgrad attack``'s own timing of its attack phase divided by a bare
in-process loop of the same image-steps at the same batch size. Target <= 1.15.

The bare loop is what the attack cannot avoid: for each group of ``--batch`` images, ``steps x
(forward + input-gradient backward)`` of the source plus the sign step and the projection, with the
images already in memory and nothing written. The command adds everything a user gets on top:
reading the data, grouping, the bound check on 8-bit levels, PNG files, the manifest, the source
prediction on the saved files, the progress bar. Each repeat runs the command in a fresh process
on a fresh folder (the times it prints, "attacked in X s, Y s CPU", are its attack phase: imports
and model loading excluded) and then the bare loop, alternating, so machine noise hits both alike.
Both clocks are compared: wall time, and CPU time of the process (all its threads, so a loading
thread counts), which a machine shared with other jobs disturbs much less. The median CPU-time
ratio is the last line (``--clock wall`` for the wall-time one).

    python benchmarks/pipeline_overhead.py [--images 512] [--batch 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from skipgrad.data.datasets import open_dataset
from skipgrad.models import load_model

SOURCE = "zoo:fmnist-preact-resnet20"
_ATTACKED = re.compile(r"attacked in ([0-9.]+) s, ([0-9.]+) s CPU")


def bare_loop(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int,
              steps: int = 10, eps: float = 16 / 255, step: float = 2 / 255
              ) -> tuple[float, float]:
    """(wall, CPU) seconds of I-FGSM's unavoidable work on in-memory images, group by group."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch):
        clean, y = images[i:i + batch], labels[i:i + batch]
        x = clean.clone()
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
            x = torch.min(torch.max(x + step * grad.sign(), clean - eps), clean + eps).clamp(0, 1)
    return time.perf_counter() - start, time.process_time() - cpu


def command_seconds(images: int, batch: int, extra: list[str]) -> tuple[float, float]:
    """The attack phase's (wall, CPU) seconds ``skipgrad attack`` reports for a fresh folder."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "skipgrad", "attack", "--source", SOURCE, "--attack", "ifgsm",
               "--data", "fmnist:test", "--limit", str(images), "--batch-size", str(batch),
               "--out", str(Path(out) / "run"), "--quiet", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = _ATTACKED.search(done.stdout)
    if found is None:
        raise RuntimeError(f"no timing in the command's output: {done.stdout!r}")
    return float(found.group(1)), float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description="pipeline overhead ratio of skipgrad attack")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", default="", help="more options for the command, e.g. "
                        "'--prefetch 2'")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="which ratio the last line gives (both are printed per repeat)")
    args = parser.parse_args()
    # The subprocess inherits OMP_NUM_THREADS; the bare loop uses the same number of threads.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    data = open_dataset("fmnist:test", limit=args.images)
    images = data.load(data.samples)
    labels = torch.tensor([s.label for s in data.samples])
    model = load_model(SOURCE).eval()
    bare_loop(model, images[:args.batch], labels[:args.batch], args.batch)  # warm-up
    ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
    for repeat in range(args.repeats):
        command = command_seconds(args.images, args.batch, args.extra.split())
        bare = bare_loop(model, images, labels, args.batch)
        for i, clock in enumerate(("wall", "cpu")):
            ratios[clock].append(command[i] / bare[i])
        print(f"repeat {repeat + 1}: skipgrad attack {command[0]:.2f} s wall / {command[1]:.2f} s "
              f"CPU, bare loop {bare[0]:.2f} s / {bare[1]:.2f} s: ratio {ratios['wall'][-1]:.3f} "
              f"wall, {ratios['cpu'][-1]:.3f} CPU", flush=True)
    print(f"{SOURCE}, I-FGSM 10 steps, {args.images} images, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), extra options: "
          f"{args.extra or 'none'}")
    print(f"median ratio: {statistics.median(ratios['wall']):.3f} wall, "
          f"{statistics.median(ratios['cpu']):.3f} CPU")
    print(f"pipeline_overhead_ratio {statistics.median(ratios[args.clock]):.3f}")


if __name__ == "__main__":
    main()
