"""Scaling of ``skipgrad attack`` with 1 vs N torchrun processes on the same job (same data, model
and attack, fresh output folders, CPU, one thread per process). Throughput is images / attack-loop
seconds as reported by rank 0 (model loading and the torchrun start-up are excluded; wall times
including them are printed too). The runs alternate, ``--repeats`` times each, medians reported.
The outputs of both runs are byte-compared: a speed-up that changed the files would not count.
The last line printed is the speed-up ratio (N processes / 1 process).

    python benchmarks/torchrun_scaling.py [--procs 2] [--limit 256] [--steps 10] [--repeats 1]
"""
from __future__ import annotations

import argparse
import filecmp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCHRUN = Path(sys.executable).with_name("torchrun")
SUMMARY = re.compile(r"(\d+) attacked in ([0-9.]+) s")


def run_once(procs: int, out: Path, job: list[str]) -> tuple[float, float]:
    """(images per attack-loop second, wall seconds) of one torchrun launch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(procs), "-m", "skipgrad",
           "attack", *job, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    images, seconds = SUMMARY.search(done.stdout).groups()
    return int(images) / float(seconds), wall


def same_outputs(a: Path, b: Path) -> bool:
    """PNGs and manifest byte-identical (run.json records the world size, so it differs)."""
    names = sorted(p.name for p in (a / "images").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(a / "images", b / "images", names, shallow=False)
    return not mismatch and not errors and filecmp.cmp(a / "manifest.csv", b / "manifest.csv",
                                                       shallow=False)


def main() -> None:
    parser = argparse.ArgumentParser(description="torchrun scaling, 1 vs N processes")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--source", default="zoo:fmnist-resnet20")
    parser.add_argument("--attack", default="mi")
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    job = ["--source", args.source, "--attack", args.attack, "--sgm", "0.2", "--data",
           "fmnist:test", "--limit", str(args.limit), "--steps", str(args.steps), "--quiet"]
    rates: dict[int, list[float]] = {1: [], args.procs: []}
    walls: dict[int, list[float]] = {1: [], args.procs: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for procs in rates:
                rate, wall = run_once(procs, Path(tmp) / f"p{procs}-r{r}", job)
                rates[procs].append(rate)
                walls[procs].append(wall)
        identical = same_outputs(Path(tmp) / "p1-r0", Path(tmp) / f"p{args.procs}-r0")
    print(f"{args.source} {args.attack}+sgm0.2, fmnist:test {args.limit} images x "
          f"{args.steps} steps, CPU, OMP_NUM_THREADS=1 per process, {os.cpu_count()} CPUs visible, "
          f"{args.repeats} repeat(s); outputs identical: {identical}")
    for procs in rates:
        print(f"{procs} process(es): {statistics.median(rates[procs]):.1f} images/s "
              f"(wall incl. start-up {statistics.median(walls[procs]):.1f} s)")
    ratio = statistics.median(rates[args.procs]) / statistics.median(rates[1])
    print(f"torchrun_speedup_{args.procs}_vs_1 {ratio:.2f}")


if __name__ == "__main__":
    main()
