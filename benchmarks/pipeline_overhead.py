"""Pipeline overhead: ``skipgrad attack``'s own timing of its attack phase divided by a bare
in-process loop of the same image-steps at the same batch size. Target <= 1.15.

The bare loop is what the attack cannot avoid: for each group of ``--batch`` images, ``steps x
(forward + input-gradient backward)`` of the source plus the sign step and the projection, with the
images already in memory and nothing written. The command adds everything a user gets on top:
reading the data, grouping, the bound check on 8-bit levels, PNG files, the manifest, the source
prediction on the saved files, the progress bar. Each repeat runs the command in a fresh process
on a fresh folder (the time it prints, "attacked in X s", is its attack phase: imports and model
loading excluded) and then the bare loop, alternating, so machine noise hits both alike; the
median ratio is the last line.

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
_ATTACKED = re.compile(r"attacked in ([0-9.]+) s")


def bare_loop(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int,
              steps: int = 10, eps: float = 16 / 255, step: float = 2 / 255) -> float:
    """Seconds of I-FGSM's unavoidable work on in-memory images, group by group."""
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        clean, y = images[i:i + batch], labels[i:i + batch]
        x = clean.clone()
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
            x = torch.min(torch.max(x + step * grad.sign(), clean - eps), clean + eps).clamp(0, 1)
    return time.perf_counter() - start


def command_seconds(images: int, batch: int, extra: list[str]) -> float:
    """The attack-phase seconds ``skipgrad attack`` reports for a fresh folder."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "skipgrad", "attack", "--source", SOURCE, "--attack", "ifgsm",
               "--data", "fmnist:test", "--limit", str(images), "--batch-size", str(batch),
               "--out", str(Path(out) / "run"), "--quiet", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = _ATTACKED.search(done.stdout)
    if found is None:
        raise RuntimeError(f"no timing in the command's output: {done.stdout!r}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description="pipeline overhead ratio of skipgrad attack")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", default="", help="more options for the command, e.g. "
                        "'--prefetch 2'")
    args = parser.parse_args()
    # The subprocess inherits OMP_NUM_THREADS; the bare loop uses the same number of threads.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    data = open_dataset("fmnist:test", limit=args.images)
    images = data.load(data.samples)
    labels = torch.tensor([s.label for s in data.samples])
    model = load_model(SOURCE).eval()
    bare_loop(model, images[:args.batch], labels[:args.batch], args.batch)  # warm-up
    ratios = []
    for repeat in range(args.repeats):
        command = command_seconds(args.images, args.batch, args.extra.split())
        bare = bare_loop(model, images, labels, args.batch)
        ratios.append(command / bare)
        print(f"repeat {repeat + 1}: skipgrad attack {command:.2f} s, bare loop {bare:.2f} s, "
              f"ratio {command / bare:.3f}", flush=True)
    print(f"{SOURCE}, I-FGSM 10 steps, {args.images} images, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), extra options: "
          f"{args.extra or 'none'}")
    print(f"pipeline_overhead_ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
