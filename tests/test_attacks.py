"""The attack loop: bounds on rounded outputs, each component against its definition, errors."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import skipgrad
from skipgrad.attacks.losses import attack_objective
from skipgrad.attacks.randomness import PerImageRandom
from skipgrad.attacks.transforms import (DiversityDraw, apply_diversity, draw_diversity,
                                         gaussian_kernel, smooth_gradient)
from skipgrad.attacks.updates import quantise_in_ball
from tests.conftest import TinyResNet, randomise_batchnorm

ALL_ATTACKS = ["ifgsm", "pgd", "mi", "ni", "di", "ti", "mi+di", "mi+di+ti", "ni+pgd+di+ti"]
EPS = {"linf": 16 / 255, "l2": 1.5}
STEP = {"linf": 2 / 255, "l2": 0.3}


def levels(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round()


@pytest.mark.parametrize("method,norm", list(itertools.product(ALL_ATTACKS, ["linf", "l2"])))
def test_bound_holds_on_8bit_rounded_outputs(tiny_resnet, tiny_batch, method, norm):
    images, labels = tiny_batch
    images = images * 0.999 + 0.0004  # not on 8-bit levels: rounding must still respect the ball
    before = images.clone()
    adv = skipgrad.attack(tiny_resnet, images, labels, method, sgm=0.5, norm=norm,
                          eps=EPS[norm], step_size=STEP[norm], steps=4)
    assert torch.equal(images, before), "the input was modified"
    assert adv.shape == images.shape and adv.dtype == images.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(levels(adv), adv * 255), "outputs are not on 8-bit levels"
    delta = levels(adv) - levels(images)
    if norm == "linf":
        assert delta.abs().max() <= 16
    else:
        assert (delta.square().flatten(1).sum(dim=1) <= (EPS[norm] * 255) ** 2).all()
    assert delta.abs().sum() > 0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["linf", "l2"]),
       st.floats(0.001, 0.2), st.floats(-0.5, 0.5))
def test_quantisation_never_leaves_the_ball(seed, norm, eps, spread):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 1, 6, 6, generator=gen)
    radius = eps if norm == "linf" else eps * 6
    adv = (images + spread * torch.randn(3, 1, 6, 6, generator=gen)).clamp(0, 1)
    q = quantise_in_ball(adv, images, radius, norm)
    delta = levels(q) - levels(images)
    if norm == "linf":
        assert delta.abs().max() <= math.floor(radius * 255 + 1e-6)
    else:
        # exact: integer sum of squared levels against the squared radius (quantise_in_ball)
        assert (delta.double().square().flatten(1).sum(dim=1) <= (radius * 255) ** 2).all()


# ---- Each component against its definition --------------------------------------------------

def reference_loop(model, x0, y, steps, alpha, eps, mu, nesterov):
    """MI-FGSM / NI-FGSM written out from the papers' update equations."""
    x, g = x0.clone(), torch.zeros_like(x0)
    for _ in range(steps):
        query = (x + alpha * mu * g) if nesterov else x
        query = query.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(query), y, reduction="sum"), query)
        g = mu * g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)
        x = torch.min(torch.max(x + alpha * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return quantise_in_ball(x, x0, eps, "linf")


@pytest.mark.parametrize("method,nesterov", [("mi", False), ("ni", True)])
def test_momentum_and_nesterov_follow_their_definitions(tiny_resnet, tiny_batch, method, nesterov):
    images, labels = tiny_batch
    got = skipgrad.attack(tiny_resnet, images, labels, method, steps=3, decay=0.8)
    want = reference_loop(tiny_resnet, images, labels, 3, 2 / 255, 16 / 255, 0.8, nesterov)
    assert torch.equal(got, want)


def test_ifgsm_is_momentum_free_sign_ascent(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    got = skipgrad.attack(tiny_resnet, images, labels, "ifgsm", steps=3)
    assert torch.equal(got, reference_loop(tiny_resnet, images, labels, 3, 2 / 255, 16 / 255,
                                           0.0, False))


def test_translation_invariance_kernel_is_dong_et_al_gaussian():
    k = gaussian_kernel(7)
    assert k.shape == (7, 7) and abs(k.sum().item() - 1) < 1e-6 and torch.equal(k, k.T)
    sigma = 6 / 6  # +-3 sigma over 7 taps spaced 1 apart
    assert math.isclose((k[3, 3] / k[3, 4]).item(), math.exp(0.5 / sigma**2), rel_tol=1e-5)
    delta = torch.zeros(1, 2, 9, 9)
    delta[0, 1, 4, 4] = 1.0
    smoothed = smooth_gradient(delta, k)
    torch.testing.assert_close(smoothed[0, 1, 1:8, 1:8], k)
    assert smoothed[0, 0].abs().sum() == 0  # channels are smoothed independently


def test_input_diversity_resizes_and_pads_with_probability_p():
    rng = PerImageRandom(0, range(400))
    draws = draw_diversity(rng, (20, 20), prob=0.3, scale=1.5)
    applied = [d for d in draws if d is not None]
    assert abs(len(applied) / len(draws) - 0.3) < 0.08
    for d in applied:
        assert (d.canvas_h, d.canvas_w) == (30, 30) and 20 <= d.height <= 30
        assert 0 <= d.top <= 30 - d.height and 0 <= d.left <= 30 - d.width
    ones = torch.ones(1, 1, 20, 20)
    d = DiversityDraw(height=24, width=24, top=6, left=0, canvas_h=30, canvas_w=30)
    out = apply_diversity(ones, [d])
    assert out.shape == ones.shape
    assert math.isclose(out.mean().item(), 24 * 24 / 900, rel_tol=0.02)  # image area on the canvas
    assert out[0, 0, :3].abs().max() < 0.05  # the padding above the pasted image is black
    assert torch.equal(apply_diversity(ones, [None]), ones)


def test_margin_loss_definition():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 4.0]])
    labels = torch.tensor([1, 0])
    torch.testing.assert_close(attack_objective(logits, labels, "margin", False),
                               torch.tensor([2.0 - 3.0, 4.0 - 0.5]))
    torch.testing.assert_close(attack_objective(logits, labels, "margin", True),
                               torch.tensor([3.0 - 2.0, 0.5 - 4.0]))


def test_ensemble_gradient_is_the_average_of_member_gradients(tiny_batch):
    from skipgrad.attacks.loop import input_gradient
    from skipgrad.attacks.config import AttackSpec

    images, labels = tiny_batch
    torch.manual_seed(1)
    a, b = randomise_batchnorm(TinyResNet(), 1), randomise_batchnorm(TinyResNet(), 2)
    rng = PerImageRandom(0, range(4))
    spec = AttackSpec()
    both = input_gradient([a, b], images, labels, spec, rng)
    mean = (input_gradient([a], images, labels, spec, rng)
            + input_gradient([b], images, labels, spec, rng)) / 2
    torch.testing.assert_close(both, mean)


def test_ensemble_accepts_a_gamma_per_model(tiny_batch):
    images, labels = tiny_batch
    a, b = randomise_batchnorm(TinyResNet(), 1), randomise_batchnorm(TinyResNet(), 2)
    mixed = skipgrad.attack([a, b], images, labels, "mi", sgm=[0.2, None])
    none = skipgrad.attack([a, b], images, labels, "mi")
    assert not torch.equal(mixed, none)
    with pytest.raises(ValueError, match="2 source models"):
        skipgrad.attack([a, b], images, labels, sgm=[0.2])


# ---- Behaviour -------------------------------------------------------------------------------

def test_same_seed_same_result_and_batching_does_not_change_randomness(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    kwargs = dict(sgm=0.3, seed=7, steps=3)
    full = skipgrad.attack(tiny_resnet, images, labels, "pgd+mi+di", **kwargs)
    assert torch.equal(full, skipgrad.attack(tiny_resnet, images, labels, "pgd+mi+di", **kwargs))
    singles = torch.cat([skipgrad.attack(tiny_resnet, images[i:i + 1], labels[i:i + 1],
                                         "pgd+mi+di", ids=[i], **kwargs) for i in range(4)])
    assert (singles == full).float().mean() > 0.99  # float sums may differ by batch, not draws
    other = skipgrad.attack(tiny_resnet, images, labels, "pgd+mi+di", sgm=0.3, seed=8, steps=3)
    assert not torch.equal(full, other)


def test_gamma_one_equals_no_sgm(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    assert torch.equal(skipgrad.attack(tiny_resnet, images, labels, "mi+ti", sgm=1.0),
                       skipgrad.attack(tiny_resnet, images, labels, "mi+ti"))


def test_sgm_changes_the_attack(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    assert not torch.equal(skipgrad.attack(tiny_resnet, images, labels, "mi", sgm=0.2),
                           skipgrad.attack(tiny_resnet, images, labels, "mi"))


def test_training_flags_are_restored(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    tiny_resnet.train()
    tiny_resnet.layer1[0].eval()
    stats = tiny_resnet.layer1[1].bn1.running_mean.clone()
    skipgrad.attack(tiny_resnet, images, labels, steps=2)
    assert tiny_resnet.training and not tiny_resnet.layer1[0].training
    assert torch.equal(stats, tiny_resnet.layer1[1].bn1.running_mean), "BN statistics changed"


def _trained_toy_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small residual net trained to separate bright-left from bright-right images."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 12, 12, generator=gen) * 0.5
    y = torch.randint(0, 2, (256,), generator=gen)
    x[y == 0, :, :, :6] += 0.3
    x[y == 1, :, :, 6:] += 0.3
    torch.manual_seed(0)
    model = TinyResNet(width=8, blocks=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:64], y[:64]


def test_white_box_attacks_lower_accuracy_and_targeted_reaches_the_target():
    model, x, y = _trained_toy_model()
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.95
    for method in ("ifgsm", "mi", "ni+di"):
        adv = skipgrad.attack(model, x, y, method, sgm=0.5, eps=0.2, step_size=0.04)
        assert (model(adv).argmax(1) == y).float().mean().item() < clean - 0.5, method
    target = 1 - y
    adv = skipgrad.attack(model, x, target, "ifgsm", targeted=True, loss="margin", eps=0.2,
                          step_size=0.04)
    assert (model(adv).argmax(1) == target).float().mean().item() > 0.8


# ---- Bad input: a clear error before any work ------------------------------------------------

class CountingModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("change,message", [
    (dict(images=torch.rand(1, 12, 12)), "shape"),
    (dict(images=torch.rand(4, 1, 12, 12) * 2), r"\[0, 1\]"),
    (dict(images=torch.full((4, 1, 12, 12), float("nan"))), "NaN"),
    (dict(images=(torch.rand(4, 1, 12, 12) * 255).to(torch.uint8)), "floating-point"),
    (dict(labels=torch.tensor([0, 1])), "labels"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0, 3.0])), "integer"),
    (dict(method="mi+foo"), "unknown attack 'foo'"),
    (dict(method="mi+ni"), "several update rules"),
    (dict(method=""), "non-empty"),
    (dict(eps=0), "eps"),
    (dict(eps=-1 / 255), "eps"),
    (dict(step_size=float("inf")), "step_size"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(norm="l3"), "norm"),
    (dict(loss="hinge"), "loss"),
    (dict(sgm=0.0), "gamma"),
    (dict(sgm=2.0), "gamma"),
    (dict(ti_kernel=4), "ti_kernel"),
    (dict(seed="0"), "seed"),
])
def test_bad_input_fails_before_any_forward_pass(tiny_resnet, tiny_batch, change, message):
    images, labels = tiny_batch
    model = CountingModel(tiny_resnet)
    kwargs = dict(images=images, labels=labels, method="mi") | change
    with pytest.raises(ValueError, match=message):
        skipgrad.attack(model, kwargs.pop("images"), kwargs.pop("labels"), kwargs.pop("method"),
                        **kwargs)
    assert model.calls == 0


def test_out_of_range_label_is_reported(tiny_resnet, tiny_batch):
    images, _ = tiny_batch
    with pytest.raises(ValueError, match="out of range for a model with 10 classes"):
        skipgrad.attack(tiny_resnet, images, torch.tensor([0, 1, 2, 10]))


def test_sgm_on_a_model_without_skips_names_it(tiny_batch):
    images, labels = tiny_batch
    plain = nn.Sequential(nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(skipgrad.NoResidualBlockError, match="Sequential"):
        skipgrad.attack(plain, images, labels, sgm=0.2)
    adv = skipgrad.attack(plain, images, labels)  # without SGM any differentiable model works
    assert adv.shape == images.shape


def test_non_finite_gradient_is_reported_per_image(tiny_batch):
    images, labels = tiny_batch

    class Broken(nn.Module):
        def forward(self, x):
            out = x.flatten(1)[:, :10] * 1.0
            return torch.where(torch.arange(4)[:, None] == 2, out * float("inf"), out)

    with pytest.raises(skipgrad.NonFiniteGradientError, match=r"positions \[2\]"):
        skipgrad.attack(Broken(), images, labels)
