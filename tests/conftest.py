"""Shared tiny models for the tests: small enough to run in milliseconds on a CPU."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

torch.set_num_threads(2)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` intra-op threads. Files compared byte for byte with a subprocess
    started with OMP_NUM_THREADS=n must be made with the same count: torch may choose kernels
    (and split sums) by the number of threads, so other counts need not give the same floats."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TinyResNet(nn.Module):
    """Two stages of torchvision BasicBlocks on 1x12x12 inputs, 10 classes."""

    def __init__(self, width: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(*[BasicBlock(width, width) for _ in range(blocks)])
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False),
                             nn.BatchNorm2d(2 * width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2, downsample=down),
                                    *[BasicBlock(2 * width, 2 * width) for _ in range(blocks - 1)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so that eval-mode nets are not near-identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
    return model.eval()


@pytest.fixture
def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorm(TinyResNet())


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(4, 1, 12, 12, generator=gen) * 255).round() / 255
    return images, torch.tensor([0, 3, 5, 9])
