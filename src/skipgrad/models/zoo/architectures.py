"""Architectures of the bundled Fashion-MNIST zoo: one small network per family SGM meets.

Every network takes (N, 1, 28, 28) images in [0, 1] and returns (N, 10) logits. Normalisation is the
first module of each network, so attacks work on raw pixels and callers never normalise.
Residual and dense families are built from the torchvision blocks SGM recognises structurally;
:class:`PreActBasicBlock` is our own and is registered with SGM when this module is imported.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models.densenet import _DenseBlock, _Transition
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
NUM_CLASSES = 10


class Normalize(nn.Module):
    """``(x - mean) / std`` with the Fashion-MNIST statistics (constants, not checkpointed)."""

    def __init__(self, mean: float = FMNIST_MEAN, std: float = FMNIST_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _head(features: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, NUM_CLASSES))


# ---------------------------------------------------------------- post-activation ResNet

class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al., 2016): 3x3 stem, three stages of ``n`` torchvision
    BasicBlocks with widths 16/32/64; ``layer2``/``layer3`` open with a strided block whose skip is a
    1x1 conv + BN. Depth is ``6n + 2``.
    """

    def __init__(self, n: int, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Sequential(*_conv_bn_relu(1, widths[0]))
        self.layer1 = self._stage(widths[0], widths[0], n, stride=1)
        self.layer2 = self._stage(widths[0], widths[1], n, stride=2)
        self.layer3 = self._stage(widths[1], widths[2], n, stride=2)
        self.head = _head(widths[2])

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        blocks = [BasicBlock(cin, cout, stride=stride, downsample=down)]
        blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        return self.head(self.layer3(self.layer2(self.layer1(x))))


# ---------------------------------------------------------------- pre-activation ResNet

class PreActBasicBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016, "Identity Mappings in Deep Residual Networks"):
    ``y = skip(x) + conv2(relu(bn2(conv1(relu(bn1(x))))))``.

    ``shortcut`` is ``None`` for an identity skip; when the block changes shape it is a 1x1 conv that
    reads the pre-activated input, as in the paper.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.relu = nn.ReLU()  # not inplace: x itself is the identity skip
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return skip + self.conv2(self.relu(self.bn2(self.conv1(pre))))


class PreActResNet(nn.Module):
    """Pre-activation ResNet with three stages (widths 16/32/64) of :class:`PreActBasicBlock`;
    a final BN + ReLU precedes pooling because the blocks leave their output un-normalised.
    """

    def __init__(self, n: int, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        cins = (widths[0],) + widths[:2]
        for i, (cin, cout) in enumerate(zip(cins, widths), start=1):
            blocks = [PreActBasicBlock(cin, cout, stride=1 if i == 1 else 2)]
            blocks += [PreActBasicBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.final = nn.Sequential(nn.BatchNorm2d(widths[2]), nn.ReLU(inplace=True))
        self.head = _head(widths[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(self.normalize(x)))))
        return self.head(self.final(x))


def _preact_branch_entries(block: PreActBasicBlock) -> list[nn.Module]:
    # Identity skip: x feeds the skip and bn1, so bn1's input is the branch entry. Projection skip:
    # the pre-activation feeds both the 1x1 shortcut and conv1, so only conv1's input is branch-only.
    return [block.bn1] if block.shortcut is None else [block.conv1]


def _register_with_sgm() -> None:
    from skipgrad.backward import register_block

    register_block(PreActBasicBlock, _preact_branch_entries, branch_exit=lambda block: block.conv2,
                   skip_path=lambda block: block.shortcut)


_register_with_sgm()


# ---------------------------------------------------------------- DenseNet-BC

class SmallDenseNet(nn.Module):
    """DenseNet-BC (Huang et al., 2017) for 28x28 inputs from torchvision's ``_DenseBlock`` and
    ``_Transition``: one strided 3x3 stem conv (no 7x7 conv or max-pool at this resolution),
    compression 0.5, blocks at 14x14, 7x7 and 3x3. The strided stem makes training ~6x cheaper on a
    CPU than a stride-1 stem (thin dense layers run slowly at 28x28) at little cost in accuracy.
    """

    def __init__(self, growth: int = 12, blocks: tuple[int, ...] = (6, 6, 6), bn_size: int = 4) -> None:
        super().__init__()
        self.normalize = Normalize()
        channels = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            layers.append(_DenseBlock(n, channels, bn_size, growth, drop_rate=0.0))
            channels += n * growth
            if i < len(blocks) - 1:  # halve resolution and channels between blocks
                layers.append(_Transition(channels, channels // 2))
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = _head(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


# ---------------------------------------------------------------- VGG and a plain CNN

class SmallVGG(nn.Module):
    """VGG-style network with BatchNorm (Simonyan & Zisserman, 2015), no skips: two 3x3 convs per
    stage, max-pool between stages (28 -> 14 -> 7 -> 3), then a linear classifier.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        self.normalize = Normalize()
        layers: list[nn.Module] = []
        cin = 1
        for width in widths:
            layers += _conv_bn_relu(cin, width) + _conv_bn_relu(width, width) + [nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.3),
                                        nn.Linear(cin * 3 * 3, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class PlainCNN(nn.Module):
    """A plain CNN without skips or BatchNorm: three conv + ReLU + max-pool stages, two linears."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 64)) -> None:
        super().__init__()
        self.normalize = Normalize()
        layers: list[nn.Module] = []
        cin = 1
        for width in widths:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * 3 * 3, 128),
                                        nn.ReLU(inplace=True), nn.Linear(128, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


# ---------------------------------------------------------------- MobileNetV2

# (expand ratio, output channels, blocks, first stride); with the strided stem: 28 -> 14 -> 7 -> 4.
_MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 1))


class SmallMobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) from torchvision's ``InvertedResidual`` at small width. The
    stem is a single strided 3x3 conv: expanded 28x28 feature maps cost ~4x more CPU time to train.
    """

    def __init__(self, stem: int = 16, last: int = 256) -> None:
        super().__init__()
        self.normalize = Normalize()
        layers: list[nn.Module] = _conv_bn_relu(1, stem, stride=2)
        cin = stem
        for expand, cout, n, stride in _MOBILENET_STAGES:
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += _conv_bn_relu(cin, last, kernel=1)
        self.features = nn.Sequential(*layers)
        self.head = _head(last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


# ---------------------------------------------------------------- Vision Transformer

class SmallViT(nn.Module):
    """A small timm ``VisionTransformer`` (Dosovitskiy et al., 2021) on 7x7 patches of 28x28 images."""

    def __init__(self, embed_dim: int = 96, depth: int = 6, heads: int = 4) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.normalize = Normalize()
        self.vit = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=NUM_CLASSES,
                                     embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.normalize(x))


# ---------------------------------------------------------------- registry

ARCHITECTURES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "cnn": ("plain CNN", PlainCNN),
    "vgg": ("VGG-BN", SmallVGG),
    "resnet20": ("ResNet (post-activation)", lambda: CifarResNet(3)),
    "resnet56": ("ResNet (post-activation)", lambda: CifarResNet(9)),
    "resnet110": ("ResNet (post-activation)", lambda: CifarResNet(18)),
    "resnet8": ("ResNet (post-activation)", lambda: CifarResNet(1)),
    "preact-resnet20": ("ResNet (pre-activation)", lambda: PreActResNet(3)),
    "densenet": ("DenseNet-BC", SmallDenseNet),
    "mobilenetv2": ("MobileNetV2", SmallMobileNetV2),
    "vit": ("Vision Transformer", SmallViT),
}
# The models that ship with committed weights (the fmnist preset uses every one of them).
# resnet110 is buildable and trainable with ``train_model("resnet110", ...)`` but was not trained:
# it did not fit the CPU budget, and listing it here would put a weightless model in the preset.
# resnet8 exists for its adversarially trained member only (a residual net whose fast adversarial
# training fits the CPU budget; the ResNet-20's did not).
ZOO_NAMES: tuple[str, ...] = tuple(name for name in ARCHITECTURES
                                   if name not in ("resnet110", "resnet8"))
# Adversarially trained members (``NAME-at``): the architecture of their plain sibling, their own
# weights and recipe (``training.RECIPES``). Kept out of ZOO_NAMES so that the fmnist preset, the
# study and the demo's sources stay the plain zoo; they are defended *targets*.
AT_NAMES: tuple[str, ...] = ("cnn-at", "resnet8-at")
ARCHITECTURES.update({name: (ARCHITECTURES[name.removesuffix("-at")][0] + ", adv. trained",
                             ARCHITECTURES[name.removesuffix("-at")][1]) for name in AT_NAMES})


def zoo_name(name: str) -> str:
    """``name`` without the ``zoo:`` / ``fmnist-`` prefixes; raises ``KeyError`` for unknown names."""
    bare = name.removeprefix("zoo:").removeprefix("fmnist-")
    if bare not in ARCHITECTURES:
        raise KeyError(f"unknown zoo model {name!r} (known: {', '.join(ZOO_NAMES + AT_NAMES)})")
    return bare


def build_model(name: str) -> nn.Module:
    """A freshly initialised zoo network (random weights, train mode); seed torch first for
    reproducible initialisation."""
    return ARCHITECTURES[zoo_name(name)][1]()


def family_of(name: str) -> str:
    """The family label of a zoo model, e.g. ``"DenseNet-BC"``."""
    return ARCHITECTURES[zoo_name(name)][0]
