"""skip_gradient around another library's attack gives the SGM version of that attack."""
from __future__ import annotations

import pytest
import torch

import skipgrad
from skipgrad import skip_gradient
from tests.tiny_vits import relative_difference

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


# Every backward-pass method skipgrad ships, each on a source it applies to.
def _source(method: str):
    from tests.conftest import TinyResNet, randomise_batchnorm
    from tests.tiny_vits import images_for, timm_vit

    if method in ("skip_gradient", "linbp", "bpa"):
        torch.manual_seed(0)
        model = randomise_batchnorm(TinyResNet())
        images = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
        make = (lambda m: skip_gradient(m, 0.2)) if method == "skip_gradient" \
            else getattr(skipgrad, method)
        return model, images, torch.tensor([0, 3, 5, 9]), make
    model = timm_vit()
    return (model, *images_for(model), getattr(skipgrad, method))


BACKWARD_METHODS = ["skip_gradient", "linbp", "bpa", "pna", "tgr"]


@pytest.mark.parametrize("method", BACKWARD_METHODS)
def test_every_backward_method_changes_torchattacks_mifgsm(method):
    model, images, labels, make = _source(method)
    mi = torchattacks.MIFGSM(model, eps=16 / 255, alpha=2 / 255, steps=3, decay=1.0)
    plain = mi(images, labels)
    with make(model):
        inside = mi(images, labels)
    # more than float noise (tgr's forward is only within float tolerance of the model's); pna,
    # the smallest change here, moves the perturbation by 0.05
    assert relative_difference(inside - images, plain - images) > 0.02
    assert torch.equal(mi(images, labels), plain)  # nothing left behind


@pytest.mark.parametrize("method", BACKWARD_METHODS)
def test_every_backward_method_changes_torchattack_mifgsm(method):
    torchattack = pytest.importorskip("torchattack")  # spencerwooo/torchattack
    model, images, labels, make = _source(method)
    mi = torchattack.MIFGSM(model, device=torch.device("cpu"), eps=16 / 255, steps=3,
                            alpha=2 / 255, decay=1.0)
    plain = mi(images, labels)
    with make(model):
        inside = mi(images, labels)
    # more than float noise (tgr's forward is only within float tolerance of the model's); pna,
    # the smallest change here, moves the perturbation by 0.05
    assert relative_difference(inside - images, plain - images) > 0.02
    assert torch.equal(mi(images, labels), plain)
