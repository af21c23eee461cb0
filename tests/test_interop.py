"""skip_gradient around another library's attack gives the SGM version of that attack."""
from __future__ import annotations

import pytest
import torch

import skipgrad
from skipgrad import skip_gradient

torchattacks = pytest.importorskip("torchattacks")


def test_skip_gradient_around_torchattacks_mifgsm_is_mi_sgm(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    mi = torchattacks.MIFGSM(tiny_resnet, eps=16 / 255, alpha=2 / 255, steps=5, decay=1.0)
    plain = mi(images, labels)
    with skip_gradient(tiny_resnet, 0.2):
        with_sgm = mi(images, labels)
    ours = skipgrad.attack(tiny_resnet, images, labels, "mi", sgm=0.2, steps=5)
    assert not torch.equal((plain * 255).round(), (with_sgm * 255).round())
    # Same algorithm: identical up to the final 8-bit rounding and float summation order.
    agree = ((with_sgm * 255).round() == ours * 255).float().mean().item()
    assert agree > 0.99
    assert agree > ((plain * 255).round() == ours * 255).float().mean().item()
