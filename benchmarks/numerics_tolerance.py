"""How much ``--amp bf16`` and ``--channels-last`` change an attack's results, against float32.

Attacks the same images from the same source with each setting (fresh folders, the real ``attack``
command path), then scores every output on the same targets. Printed per setting: the share of PNGs
byte-identical to float32, the mean and largest per-pixel level difference, and for each target the
success rate, its change against float32 and the share of images whose outcome (fooled or not)
agrees. The last line is the largest change of any success rate, in percentage points: the figure
that docs/scale.md states as the tolerance of these options.

    python benchmarks/numerics_tolerance.py [--source zoo:fmnist-resnet20] [--limit 1000]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skipgrad import AttackSpec
from skipgrad.pipeline.evaluate import evaluate_folder
from skipgrad.pipeline.job import AttackJob, RunOptions
from skipgrad.pipeline.engine import run_attack_job

SETTINGS = {"float32": {}, "bf16": {"amp": "bf16"}, "channels-last": {"channels_last": True},
            "bf16+channels-last": {"amp": "bf16", "channels_last": True}}
TARGETS = ["zoo:fmnist-cnn", "zoo:fmnist-vgg", "zoo:fmnist-densenet", "zoo:fmnist-mobilenetv2"]


def levels(folder: Path) -> np.ndarray:
    files = sorted((folder / "images").glob("*.png"))
    return np.stack([np.asarray(Image.open(f), dtype=np.int16) for f in files])


def main() -> None:
    parser = argparse.ArgumentParser(description="numerics options vs float32")
    parser.add_argument("--source", default="zoo:fmnist-resnet20")
    parser.add_argument("--attack", default="ifgsm")
    parser.add_argument("--sgm", type=float, default=0.5)
    parser.add_argument("--limit", type=int, default=1000)
    args = parser.parse_args()
    targets = [args.source, *[t for t in TARGETS if t != args.source]]
    with tempfile.TemporaryDirectory() as tmp:
        results, images = {}, {}
        for name, numerics in SETTINGS.items():
            out = Path(tmp) / name
            job = AttackJob(sources=(args.source,), data="fmnist:test",
                            attack=AttackSpec.parse(args.attack, sgm=args.sgm), **numerics)
            run_attack_job(job, out, RunOptions(limit=args.limit, batch_size=64, quiet=True),
                           log=lambda _: None)
            results[name] = evaluate_folder(out, targets, quiet=True, batch_size=250)
            images[name] = levels(out)
    worst = 0.0
    base = results["float32"]
    print(f"{args.source} {args.attack} + SGM {args.sgm:g}, {args.limit} Fashion-MNIST test images,"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in SETTINGS:
        diff = np.abs(images[name] - images["float32"])
        same = float((diff.reshape(len(diff), -1).max(1) == 0).mean())
        print(f"{name:>20}: identical PNGs {100 * same:.1f}%, level difference mean "
              f"{diff.mean():.3f}, max {diff.max()}")
        for target in targets:
            r, b = results[name][target], base[target]
            change = 100 * (r.success_rate - b.success_rate)
            agree = float((r.per_image == b.per_image).float().mean())
            worst = max(worst, abs(change))
            print(f"{'':>22}{target:<28} success {100 * r.success_rate:5.1f}% "
                  f"({change:+.1f} points), same outcome on {100 * agree:.1f}% of images")
    print(f"numerics_max_success_change_points {worst:.1f}")


if __name__ == "__main__":
    main()
