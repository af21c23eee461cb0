"""Input gradients of skipgrad's backward-pass methods next to the authors' releases.

Runs each release's own functions once beside the skipgrad context on the same torchvision model
(random weights with a fixed seed: ImageNet weights cannot be downloaded here) and prints the
per-image cosine between the two input gradients of the cross-entropy loss. Needs local checkouts of
the releases (nothing of theirs is part of skipgrad or its tests):

    git clone https://github.com/qizhangli/linbp-attack /tmp/authors/linbp-attack
    git clone https://github.com/Trustworthy-AI-Group/BPA /tmp/authors/BPA
    OMP_NUM_THREADS=1 python scripts/compare_with_releases.py \\
        --linbp /tmp/authors/linbp-attack --bpa /tmp/authors/BPA

LinBP: ``linbp_forw_resnet50`` + ``linbp_backw_resnet50`` (attack/imagenet/utils.py) at the default
``linbp_layer='3_1'`` and ``sgm_lambda`` 1 and 0.5, against ``skipgrad.linbp(model,
branch_scale=...)``. BPA: the module surgery of attack_eval_imagenet.py (``method`` containing
``max`` and ``relu_silu``) with the classes of utils.py, against ``skipgrad.bpa(model)``, on
ResNet-50 and VGG19-bn.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import skipgrad

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
Gradient = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Normalize(nn.Module):
    """ImageNet normalisation as the first module, as both releases wrap their models."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def load_release_utils(checkout: Path, relative: str, name: str) -> ModuleType:
    """Import a release's utils.py by path (its directory first on sys.path for its imports)."""
    path = checkout / relative
    if not path.is_file():
        sys.exit(f"error: {path} not found; pass the root of a checkout of the release")
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source(arch: str, seed: int) -> nn.Module:
    """``nn.Sequential(Normalize(), tv arch)`` with seeded random weights and non-trivial BN
    statistics, in eval mode."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)()
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return nn.Sequential(Normalize(), net).eval()


def plain_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), labels), x)[0]


def cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).tolist()


def report(label: str, ours: torch.Tensor, theirs: torch.Tensor, plain: torch.Tensor) -> None:
    """One line: per-image cosine with the release, and with the plain gradient for scale."""
    same = " ".join(f"{c:.6f}" for c in cosines(ours, theirs))
    versus_plain = " ".join(f"{c:.3f}" for c in cosines(theirs, plain))
    print(f"{label}: cosine(skipgrad, release) = {same}   [release vs plain: {versus_plain}]")


# ---------------------------------------------------------------- LinBP

def compare_linbp(checkout: Path, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    utils = load_release_utils(checkout, "attack/imagenet/utils.py", "linbp_release_utils")
    model = source("resnet50", seed)
    plain = plain_gradient(model, images, labels)
    for scale in (1.0, 0.5):
        x = images.clone().requires_grad_(True)
        out, masks, conv_outs, relu_outs, conv_ins = utils.linbp_forw_resnet50(model, x, True, "3_1")
        loss = F.cross_entropy(out, labels)
        theirs = utils.linbp_backw_resnet50(x, loss, conv_outs, masks, relu_outs, conv_ins,
                                            xp=scale)
        with skipgrad.linbp(model, branch_scale=scale) as context:
            ours = plain_gradient(model, images, labels)
        report(f"LinBP tv:resnet50 start={context.start} branch_scale={scale:g}",
               ours, theirs, plain)


# ---------------------------------------------------------------- BPA

def release_bpa_surgery(utils: ModuleType, arch: str, model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the module replacements of the release's attack_eval_imagenet.py
    for a ``method`` containing ``max`` and ``relu_silu`` (default temperatures)."""
    theirs = copy.deepcopy(model)
    net = theirs[1]
    if arch == "vgg19_bn":
        for i in (6, 13, 26, 39, 52):
            net.features[i] = utils.MaxPool2dK2S2()
        for i in (25, 29, 32, 35, 38, 42, 45, 48, 51)[-2:]:
            net.features[i] = utils.ReLU_SiLU()
    else:
        net.maxpool = utils.MaxPool2dK3S2P1()
        for i in range(1, 6):
            net.layer3[i].relu = utils.ReLU_SiLU()
        for i in range(3):
            net.layer4[i].relu = utils.ReLU_SiLU()
    return theirs


def compare_bpa(checkout: Path, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    utils = load_release_utils(checkout, "utils.py", "bpa_release_utils")
    for arch in ("resnet50", "vgg19_bn"):
        model = source(arch, seed)
        theirs = plain_gradient(release_bpa_surgery(utils, arch, model), images, labels)
        with skipgrad.bpa(model) as context:
            ours = plain_gradient(model, images, labels)
        report(f"BPA tv:{arch} start={context.start} ({len(context.changes)} modules)",
               ours, theirs, plain_gradient(model, images, labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--linbp", type=Path, help="checkout of qizhangli/linbp-attack")
    parser.add_argument("--bpa", type=Path, help="checkout of Trustworthy-AI-Group/BPA")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.linbp is None and args.bpa is None:
        parser.error("pass --linbp and/or --bpa with the path of a release checkout")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.images, 3, args.size, args.size, generator=gen)
    labels = torch.randint(0, 1000, (args.images,), generator=gen)
    print(f"{args.images} random images {args.size}x{args.size}, seed {args.seed}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    if args.linbp is not None:
        compare_linbp(args.linbp, images, labels, args.seed)
    if args.bpa is not None:
        compare_bpa(args.bpa, images, labels, args.seed)


if __name__ == "__main__":
    main()
