"""Tiny vision transformers (depth 2, width 32, random weights) for the attention-method tests."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import nn


def timm_vit(seed: int = 0) -> nn.Module:
    """timm VisionTransformer on 1x16x16 images, 4x4 patches, 2 heads, fused attention as built."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32,
                             depth=2, num_heads=2, mlp_ratio=2.0).eval()


def torchvision_vit(seed: int = 0) -> nn.Module:
    """torchvision VisionTransformer (nn.MultiheadAttention inside EncoderBlock) on 3x16x16."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    for module in model.modules():  # torchvision zero-initialises the head: give it weights
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
    return model.eval()


def zoo_vit(seed: int = 0) -> nn.Module:
    """The zoo's ViT architecture (zoo:fmnist-vit) at depth 2, width 32, on 1x28x28."""
    from skipgrad.models.zoo.architectures import SmallViT

    torch.manual_seed(seed)
    return SmallViT(embed_dim=32, depth=2, heads=2).eval()


def images_for(model: nn.Module, n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random images in [0, 1] of the model's input shape, and labels."""
    shape = {"SmallViT": (1, 28, 28)}.get(type(model).__name__)
    if shape is None:
        shape = (3, 16, 16) if type(model).__module__.startswith("torchvision") else (1, 16, 16)
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *shape, generator=gen)
    return images, torch.arange(n) % 10


def input_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   context: ContextManager | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the gradient of the summed cross-entropy w.r.t. the images, inside ``context``."""
    x = images.clone().requires_grad_(True)
    with context if context is not None else contextlib.nullcontext():
        logits = model(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), x)
    return logits.detach(), grad


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
