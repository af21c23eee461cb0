"""Shared helpers for the benchmarks: a source model, a batch, and alternating timed repeats."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torchvision


def source_and_batch(arch: str, batch: int, size: int) -> tuple[torch.nn.Module, torch.Tensor,
                                                                 torch.Tensor]:
    """A torchvision model with random weights (no downloads here) and a random batch."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    images = torch.rand(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    return model, images, labels


def alternate_times(variants: dict[str, Callable[[], object]], repeats: int,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Times of each variant, run in turn ``repeats`` times after one warm-up each, so that
    machine noise affects every variant alike. ``clock`` is wall time by default;
    ``time.process_time`` (this process's CPU time) is steadier on a machine shared with others."""
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = clock()
            run()
            times[name].append(clock() - start)
    return times


def alternate(variants: dict[str, Callable[[], object]], repeats: int,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time of each variant (see :func:`alternate_times`)."""
    times = alternate_times(variants, repeats, clock)
    return {name: statistics.median(ts) for name, ts in times.items()}


def describe(arch: str, images: torch.Tensor, repeats: int) -> str:
    return (f"tv:{arch} (random weights), batch {tuple(images.shape)}, {repeats} alternating repeats, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")
