"""Where and in what groups a run computes: the device, and the attack's fixed group size (part of
a run's identity: a convolution's float result on CPU depends on how many images share the batch).
"""
from __future__ import annotations

from pathlib import Path

import torch

from skipgrad.errors import UserError
from skipgrad.store.records import has_finished_images, recorded_group_size, read_run


# Images per attack call when --batch-size is not given for a new folder. CPU: the fastest
# group measured on 2 cores (docs/scale.md, "Throughput"); larger groups only add memory. CUDA:
# a GPU is mostly idle below a few dozen images per call, and 64 ImageNet images at 224x224 fit
# a ResNet-152 attack in 16 GB; small inputs (the zoo's 28x28) can take far more.
DEFAULT_GROUP_SIZE = {"cpu": 32, "cuda": 64}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; refuses CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def default_group_size(device: torch.device) -> int:
    """The attack's group size on ``device`` when ``--batch-size`` is not given."""
    return DEFAULT_GROUP_SIZE["cuda" if device.type == "cuda" else "cpu"]


def resolve_group_size(out: Path, asked: int | None, device: torch.device) -> int:
    """The group size of a run into ``out``: ``--batch-size`` when given; otherwise the size the
    folder was started with (so a resumed run goes on as it began, also on another device), or the
    device's default for a new folder. Asking a folder that holds finished images for another
    size is refused: its remaining groups would be computed differently from its finished ones."""
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 1):
        raise UserError(f"--batch-size must be a positive integer, got {asked}")
    existing = read_run(out)
    recorded = recorded_group_size(existing) if existing is not None else None
    if asked is None:
        return recorded or default_group_size(device)
    if recorded is not None and asked != recorded and has_finished_images(out):
        raise UserError(f"--batch-size {asked} does not match {out}, which was attacked in groups "
                        f"of {recorded} (the group size changes the float results); pass "
                        f"--batch-size {recorded} to resume it, or use another --out")
    return asked
