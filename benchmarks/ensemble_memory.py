"""Peak memory of a 3-model ensemble attack vs the largest single-model attack.

skipgrad back-propagates one source at a time, so the activation memory of an ensemble should grow
with its largest member, not with the sum. Each configuration runs in a fresh subprocess; its
attack-time memory is the peak resident set size (ru_maxrss) minus the resident size just before the
attack (models already loaded). Target: ratio close to 1 (a naive summed loss gives ~the sum).
The last line printed is the ratio ensemble / largest single.

    python benchmarks/ensemble_memory.py [--batch 16] [--size 96]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

ARCHS = ("resnet18", "resnet50", "densenet121")


def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def child(archs: list[str], batch: int, size: int) -> None:
    import torch
    import torchvision

    import skipgrad

    torch.manual_seed(0)
    models = [getattr(torchvision.models, a)(num_classes=10).eval() for a in archs]
    images, labels = torch.rand(batch, 3, size, size), torch.randint(0, 10, (batch,))
    before = current_rss_kib()
    skipgrad.attack(models, images, labels, "mi", sgm=[0.2] * len(models), steps=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"archs": archs, "attack_kib": peak - before}))


def measure(archs: list[str], batch: int, size: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", ",".join(archs), "--batch",
                          str(batch), "--size", str(size)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["attack_kib"]


def main() -> None:
    parser = argparse.ArgumentParser(description="ensemble peak memory ratio")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child.split(","), args.batch, args.size)
        return
    singles = {a: measure([a], args.batch, args.size) for a in ARCHS}
    ensemble = measure(list(ARCHS), args.batch, args.size)
    print(f"batch {args.batch}x3x{args.size}x{args.size}, MI-SGM, peak RSS growth during the attack")
    for arch, kib in singles.items():
        print(f"single tv:{arch}: {kib / 1024:.0f} MiB")
    print(f"ensemble {'+'.join(ARCHS)}: {ensemble / 1024:.0f} MiB "
          f"(sum of singles {sum(singles.values()) / 1024:.0f} MiB)")
    print(f"ensemble_memory_ratio {ensemble / max(singles.values()):.3f}")


if __name__ == "__main__":
    main()
