"""Loop efficiency: skipgrad attack time divided by the bare cost of its gradients, i.e. a loop of
``steps x (forward + input-gradient backward)`` of the source with nothing else. Measured for
I-FGSM and for MI-DI-SGM at 10 steps, alternating repeats in one run. Target <= 1.10.
The last line printed is the worst of the two ratios.

    python benchmarks/loop_efficiency.py [--arch resnet50] [--batch 16] [--size 64] [--repeats 5]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import alternate, describe, source_and_batch

import skipgrad


def bare_loop(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              steps: int) -> None:
    x = images.clone()
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)
        x = x + 1e-3 * grad  # keep a data dependence, as the attack has


def main() -> None:
    parser = argparse.ArgumentParser(description="attack loop efficiency ratio")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, images, labels = source_and_batch(args.arch, args.batch, args.size)
    medians = alternate({
        "bare": lambda: bare_loop(model, images, labels, 10),
        "ifgsm": lambda: skipgrad.attack(model, images, labels, "ifgsm", steps=10),
        "mi+di+sgm": lambda: skipgrad.attack(model, images, labels, "mi+di", sgm=0.2, steps=10),
    }, args.repeats)
    print(describe(args.arch, images, args.repeats) + ", 10 steps")
    for name, seconds in medians.items():
        print(f"median {name}: {seconds:.3f} s")
    ratios = {name: medians[name] / medians["bare"] for name in ("ifgsm", "mi+di+sgm")}
    for name, ratio in ratios.items():
        print(f"{name} / bare: {ratio:.3f}")
    print(f"loop_efficiency_ratio {max(ratios.values()):.3f}")


if __name__ == "__main__":
    main()
