"""SGM overhead: attack time with ``sgm=gamma`` divided by attack time without, same model and batch.

Runs both variants alternately several times in one process and compares medians, so machine noise
hits both alike. Target: <= 1.03. The last line printed is the ratio.

    python benchmarks/sgm_overhead.py [--arch resnet50] [--batch 16] [--size 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import skipgrad


def time_attack(model, images, labels, sgm) -> float:
    start = time.perf_counter()
    skipgrad.attack(model, images, labels, "mi", sgm=sgm, steps=10)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", help="torchvision architecture (random weights)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gamma", type=float, default=0.2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(num_classes=10).eval()
    images = torch.rand(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 10, (args.batch,))
    time_attack(model, images, labels, None)  # warm-up: allocator and kernels
    plain, sgm = [], []
    for _ in range(args.repeats):
        plain.append(time_attack(model, images, labels, None))
        sgm.append(time_attack(model, images, labels, args.gamma))
    print(f"model tv:{args.arch}, batch {args.batch}x3x{args.size}x{args.size}, MI 10 steps, "
          f"{args.repeats} alternating repeats, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"median without SGM: {statistics.median(plain):.3f} s")
    print(f"median with SGM (gamma={args.gamma}): {statistics.median(sgm):.3f} s")
    print(f"sgm_overhead_ratio {statistics.median(sgm) / statistics.median(plain):.3f}")


if __name__ == "__main__":
    main()
