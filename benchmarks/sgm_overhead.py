"""SGM overhead: attack time with ``sgm=gamma`` divided by attack time without (same model, batch
and attack, alternating repeats in one run). Target <= 1.03. The last line printed is the ratio.

    python benchmarks/sgm_overhead.py [--arch resnet50] [--batch 16] [--size 64] [--repeats 5]
"""
from __future__ import annotations

import argparse

from _common import alternate, describe, source_and_batch

import skipgrad


def main() -> None:
    parser = argparse.ArgumentParser(description="SGM overhead ratio")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gamma", type=float, default=0.2)
    args = parser.parse_args()
    model, images, labels = source_and_batch(args.arch, args.batch, args.size)
    medians = alternate({
        "mi": lambda: skipgrad.attack(model, images, labels, "mi"),
        "mi+sgm": lambda: skipgrad.attack(model, images, labels, "mi", sgm=args.gamma),
    }, args.repeats)
    print(describe(args.arch, images, args.repeats) + ", MI 10 steps")
    for name, seconds in medians.items():
        print(f"median {name}: {seconds:.3f} s")
    print(f"sgm_overhead_ratio {medians['mi+sgm'] / medians['mi']:.3f}")


if __name__ == "__main__":
    main()
