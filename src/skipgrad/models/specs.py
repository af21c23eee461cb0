"""Model specs: a short string names a network, its weights and its input pipeline.

``tv:resnet152`` (torchvision: bare, the original ImageNet weights the transfer papers use,
``IMAGENET1K_V1``; another set by its tag, ``tv:resnet152.IMAGENET1K_V2``), ``timm:inception_v3.tf_adv_in1k``
(timm, with its tag), ``zoo:fmnist-resnet20`` (the bundled Fashion-MNIST zoo) and ``file:PATH`` (a
checkpoint that names its own architecture). Every spec resolves to a :class:`ModelConfig` taken from
the library's own metadata (timm's ``pretrained_cfg``, torchvision's weight enums), never from a
hand-written table, and loads as a :class:`WrappedModel` that takes images in [0, 1] at the dataset's
resolution with resizing and normalisation inside -- so attacks see pixels, as in Wu et al. (2020).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from skipgrad.errors import UserError

FAMILIES = ("tv", "timm", "zoo", "file")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to feed a model and to reproduce which model it was.

    ``input_size`` is (channels, height, width) the network itself expects; ``mean``/``std`` are per
    channel in [0, 1] units; ``weights`` is the weight file actually loaded (None: random init).
    """

    spec: str
    family: str
    arch: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    num_classes: int = 1000
    weights: str | None = None
    weights_sha256: str | None = None
    normalized_inside: bool = False

    def replace(self, **changes: object) -> "ModelConfig":
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready view (tuples become lists)."""
        return dataclasses.asdict(self)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``family:name`` and check the family; raises :class:`UserError` on anything else."""
    family, sep, name = spec.partition(":")
    if not sep or not name:
        raise UserError(f"model spec {spec!r} is not of the form FAMILY:NAME "
                        f"(families: {', '.join(f + ':' for f in FAMILIES)})")
    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r} in spec {spec!r} "
                        f"(known: {', '.join(f + ':' for f in FAMILIES)})")
    return family, name


class InputAdapter(nn.Module):
    """[0, 1] images at any resolution -> the tensor the wrapped network was trained on.

    Grayscale inputs are repeated to three channels when the network wants RGB (explicit in the
    config); RGB into a grayscale network is refused rather than silently averaged.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.channels, self.height, self.width = config.input_size
        self.interpolation = config.interpolation
        mean, std = ((0.0,), (1.0,)) if config.normalized_inside else (config.mean, config.std)
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._match_channels(x)
        if tuple(x.shape[-2:]) != (self.height, self.width):
            x = self._resize(x)
        return (x - self.mean.to(x)) / self.std.to(x)

    def _match_channels(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.channels:
            return x
        if x.shape[1] == 1 and self.channels == 3:
            return x.expand(-1, 3, -1, -1)
        raise UserError(f"the model takes {self.channels}-channel images but got {x.shape[1]} "
                        f"channels (use --channels {self.channels} when loading the data)")

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
        # Antialiasing only matters when shrinking; upsampling (224 -> 299) is the paper's case.
        shrink = x.shape[-2] > self.height or x.shape[-1] > self.width
        out = F.interpolate(x, size=(self.height, self.width), mode=mode,
                            align_corners=False, antialias=shrink)
        return out.clamp(0.0, 1.0) if mode == "bicubic" else out


class WrappedModel(nn.Module):
    """A network behind its :class:`InputAdapter`; ``config`` says how it was resolved."""

    def __init__(self, net: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.adapter = InputAdapter(config)
        self.net = net
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))

    def extra_repr(self) -> str:
        return f"spec={self.config.spec!r}"
