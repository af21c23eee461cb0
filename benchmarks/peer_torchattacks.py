"""Peer comparison: images/s of skipgrad's MI-SGM vs torchattacks' MIFGSM inside
``skip_gradient`` (the same algorithm and model; alternating repeats in one run).
Target >= 1.0. The last line printed is the ratio skipgrad / torchattacks.

    python benchmarks/peer_torchattacks.py [--arch resnet50] [--batch 16] [--size 64]
"""
from __future__ import annotations

import argparse

import torchattacks
from _common import alternate, describe, source_and_batch

import skipgrad


def main() -> None:
    parser = argparse.ArgumentParser(description="skipgrad vs torchattacks throughput")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, images, labels = source_and_batch(args.arch, args.batch, args.size)
    peer = torchattacks.MIFGSM(model, eps=16 / 255, alpha=2 / 255, steps=10, decay=1.0)

    def peer_with_sgm() -> None:
        with skipgrad.skip_gradient(model, 0.2):
            peer(images, labels)

    medians = alternate({
        "skipgrad": lambda: skipgrad.attack(model, images, labels, "mi", sgm=0.2),
        "torchattacks": peer_with_sgm,
    }, args.repeats)
    print(describe(args.arch, images, args.repeats) + ", MI-SGM 10 steps, gamma 0.2")
    for name, seconds in medians.items():
        print(f"{name}: {len(images) / seconds:.1f} images/s")
    print(f"peer_throughput_ratio {medians['torchattacks'] / medians['skipgrad']:.3f}")


if __name__ == "__main__":
    main()
