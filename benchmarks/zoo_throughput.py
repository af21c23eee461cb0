"""Images per second of one attack on this machine, per zoo model and for tv:resnet50 at 224x224
(random weights): I-FGSM, reported per 10 steps, one group, measured in CPU time of the process
(wall time in brackets: on a shared machine only the CPU time is reproducible).

    OMP_NUM_THREADS=1 python benchmarks/zoo_throughput.py [--batch 32] [--steps 3]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from skipgrad.attacks.config import AttackSpec
from skipgrad.attacks.loop import attack_with
from skipgrad.data.datasets import open_dataset
from skipgrad.models.loading import zoo_specs
from skipgrad.models import load_model


def images_per_second(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      steps: int) -> tuple[float, float]:
    """(CPU-time, wall) images/s of a 10-step attack, from ``steps`` steps on the batch."""
    attack_with([model], images[:2], labels[:2], AttackSpec(steps=1))  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    attack_with([model], images, labels, AttackSpec(steps=steps))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    per_attack = len(images) * steps / 10
    return per_attack / cpu, per_attack / wall


def main() -> None:
    parser = argparse.ArgumentParser(description="images/s per attack on this machine")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--imagenet-batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    data = open_dataset("fmnist:test", limit=args.batch)
    images, labels = data.load(data.samples), torch.tensor([s.label for s in data.samples])
    for spec in zoo_specs(present=True):
        cpu, wall = images_per_second(load_model(spec), images, labels, args.steps)
        print(f"{spec}: {cpu:.1f} images/s ({wall:.1f} wall), batch {args.batch}", flush=True)
    torch.manual_seed(0)
    x = torch.rand(args.imagenet_batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.imagenet_batch,))
    cpu, wall = images_per_second(load_model("tv:resnet50", pretrained=False), x, y, 1)
    print(f"tv:resnet50 224x224 (random weights): {cpu:.2f} images/s ({wall:.2f} wall), "
          f"batch {args.imagenet_batch}")
    print(f"I-FGSM, 10 steps, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
