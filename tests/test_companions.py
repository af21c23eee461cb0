"""The companion parts (SI, VT, Admix, SIA, BSR) inside the one attack loop: against peers and
hand-written references, their transforms against their definitions, and their properties."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import skipgrad
from skipgrad.attacks.block_transforms import (SIA_DROPOUT, SIA_NOISE, SIA_OPERATIONS,
                                               BlockOperation, ShuffleDraw, StructureDraw,
                                               apply_shuffle, apply_structure, block_lengths,
                                               draw_shuffle, draw_structure, lowpass_matrix,
                                               rotate_block)
from skipgrad.attacks.companions import admix_partners
from skipgrad.attacks.config import AttackSpec
from skipgrad.attacks.loop import input_gradient, run_attack
from skipgrad.attacks.randomness import PerImageRandom
from skipgrad.attacks.transforms import gaussian_kernel, smooth_gradient
from skipgrad.attacks.updates import quantise_in_ball
from tests.conftest import TinyResNet, randomise_batchnorm

torchattacks = pytest.importorskip("torchattacks")

# Small copy counts so that every composition runs in a moment on the tiny model.
SMALL = dict(si_copies=2, vt_neighbours=2, admix_mixes=2, admix_scales=2, sia_copies=2,
             bsr_copies=2)
NEW_ATTACKS = ["si", "vmi", "vni", "admix", "sia", "bsr", "mi+di+ti+si+vt", "ni+pgd+di+admix",
               "mi+sia+bsr"]
EPS = {"linf": 16 / 255, "l2": 1.5}
STEP = {"linf": 2 / 255, "l2": 0.3}


def levels(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round()


# ---- Results equal the peers' where the randomness can be matched ----------------------------

def test_sini_equals_torchattacks_sinifgsm(tiny_resnet, tiny_batch):
    """SI-NI-FGSM is deterministic: the same iterates as torchattacks to the last bit (a batch of
    4 makes its mean loss an exact rescaling of skipgrad's summed one)."""
    images, labels = tiny_batch
    peer = torchattacks.SINIFGSM(tiny_resnet, eps=16 / 255, alpha=2 / 255, steps=4, decay=0.9, m=5)
    want = peer(images, labels)
    spec = AttackSpec.parse("sini", steps=4, decay=0.9)
    got = run_attack([tiny_resnet], images, labels, spec, PerImageRandom(0, range(4)))
    assert torch.equal(got, want)
    assert torch.equal(skipgrad.attack(tiny_resnet, images, labels, "ni+si", steps=4, decay=0.9),
                       quantise_in_ball(want, images, 16 / 255, "linf"))


def _sini_with_l1_norm(model, x0, y, steps, alpha, eps, mu, m):
    """SI-NI-FGSM with the paper's formula, g / ||g||_1, instead of the mean |g| of the authors'
    code: a different look-ahead, so a different attack."""
    x, g = x0.clone(), torch.zeros_like(x0)
    for _ in range(steps):
        query = (x + alpha * mu * g).detach().requires_grad_(True)
        loss = sum(F.cross_entropy(model(query / 2**i), y, reduction="sum") for i in range(m))
        (grad,) = torch.autograd.grad(loss / m, query)
        g = mu * g + grad / grad.abs().sum(dim=(1, 2, 3), keepdim=True)
        x = torch.min(torch.max(x + alpha * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return x


def test_momentum_normalisation_is_the_mean_absolute_value_as_the_authors_code(tiny_resnet,
                                                                               tiny_batch):
    """Peers differ here: Lin et al.'s and Dong et al.'s formulas divide by the L1 norm, their code
    (and torchattacks, TransferAttack) by the mean |g|. The two agree for MI (a common factor)
    but not for NI's look-ahead; skipgrad follows the code (``updates.l1_normalise``)."""
    images, labels = tiny_batch
    spec = AttackSpec.parse("sini", steps=4, decay=1.0, eps=32 / 255, step_size=4 / 255)
    ours = run_attack([tiny_resnet], images, labels, spec, PerImageRandom(0, range(4)))
    paper = _sini_with_l1_norm(tiny_resnet, images, labels, 4, 4 / 255, 32 / 255, 1.0, 5)
    assert not torch.equal(ours, paper)


class ScriptedRandom:
    """Stands in for the per-image streams: hands out pre-drawn uniforms in order, so that a peer
    can be fed the very same draws."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self._draws = iter(draws)

    def uniform(self, shape, device="cpu"):
        draw = next(self._draws)
        assert tuple(draw.shape[1:]) == tuple(shape)
        return draw.to(device)


class _ScriptedNoise:
    """What torchattacks' ``torch.randn_like(x).uniform_(-r, r)`` gets: the same points as
    skipgrad's ``(2u - 1) * r`` (how a uniform draw is scaled is not what is compared)."""

    def __init__(self, u: torch.Tensor) -> None:
        self.u = u

    def uniform_(self, low: float, high: float) -> torch.Tensor:
        assert low == -high
        return (2 * self.u - 1) * high


def _neighbour_draws(shape, count, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("name,peer", [("vmi", "VMIFGSM"), ("vni", "VNIFGSM")])
def test_vmi_and_vni_equal_torchattacks_on_the_same_neighbours(tiny_resnet, tiny_batch,
                                                              monkeypatch, name, peer):
    """VT's neighbours are random; fed the same ones, skipgrad's VMI/VNI-FGSM and torchattacks'
    take the same steps to the last bit: the variance is the neighbours' mean gradient minus the
    (look-ahead, for NI) gradient, added at the next step, neighbours around the iterate."""
    images, labels = tiny_batch
    steps, neighbours = 3, 4
    draws = _neighbour_draws(images.shape, steps * neighbours)
    scripted = iter(draws)
    monkeypatch.setattr(torch, "randn_like", lambda x: _ScriptedNoise(next(scripted)))
    attack = getattr(torchattacks, peer)(tiny_resnet, eps=16 / 255, alpha=2 / 255, steps=steps,
                                         decay=0.8, N=neighbours, beta=1.5)
    want = attack(images, labels)
    monkeypatch.undo()
    spec = AttackSpec.parse(name, steps=steps, decay=0.8, vt_neighbours=neighbours, vt_beta=1.5)
    got = run_attack([tiny_resnet], images, labels, spec, ScriptedRandom(draws))
    assert torch.equal(got, want)


def _vmi_ti_reference(model, x0, y, offsets, steps, alpha, eps, beta, kernel):
    """VMI-TI-FGSM as the authors' release orders it: TI smooths the tuned gradient g + v."""
    def grad_at(point):
        point = point.detach().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(point), y, reduction="sum"), point)[0]

    x, g, v, offsets = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), iter(offsets)
    for _ in range(steps):
        new = grad_at(x)
        current = smooth_gradient(new + v, kernel)
        g = g + current / current.abs().mean(dim=(1, 2, 3), keepdim=True)
        v = sum(grad_at(x + (2 * next(offsets) - 1) * beta * eps) for _ in range(2)) / 2 - new
        x = torch.min(torch.max(x + alpha * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return x


def test_vt_with_ti_smooths_the_tuned_gradient(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    draws = _neighbour_draws(images.shape, 2 * 3)
    spec = AttackSpec.parse("vmi+ti", steps=3, vt_neighbours=2, ti_kernel=5)
    got = run_attack([tiny_resnet], images, labels, spec, ScriptedRandom(draws))
    want = _vmi_ti_reference(tiny_resnet, images, labels, draws, 3, 2 / 255, 16 / 255, 1.5,
                             gaussian_kernel(5))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # float sums in another order


def test_admix_gradient_is_the_mean_over_mixtures_and_scales(tiny_resnet, tiny_batch):
    """Admix (Wang et al. 2021, Eq. 4): the mean of the gradients at (x + eta x') / 2**i over the
    mixtures and scales, x' another image of the batch held constant."""
    images, labels = tiny_batch
    spec = AttackSpec.parse("admix", admix_mixes=2, admix_scales=3, admix_eta=0.3)
    got = input_gradient([tiny_resnet], images, labels, spec, PerImageRandom(4, range(4)))
    twin = PerImageRandom(4, range(4))  # admix draws one uniform per image and mixture, nothing else
    partners = [admix_partners(twin, 4) for _ in range(2)]
    x = images.clone().requires_grad_(True)
    loss = sum(F.cross_entropy(tiny_resnet((x + 0.3 * images[p]) / 2**i), labels, reduction="sum")
               for p in partners for i in range(3))
    (want,) = torch.autograd.grad(loss / 6, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ---- Admix's partners: from each image's stream, among the other images of the batch ------------

def test_admix_partners_are_other_images_of_the_batch_uniformly():
    counts = torch.zeros(3, 3)
    for seed in range(300):
        for i, j in enumerate(admix_partners(PerImageRandom(seed, range(3)), 3)):
            counts[i, j] += 1
    assert counts.diagonal().sum() == 0, "an image was mixed with itself"
    off = counts[~torch.eye(3, dtype=torch.bool)] / 300
    assert ((off - 0.5).abs() < 0.1).all()
    assert admix_partners(PerImageRandom(0, [7]), 1) == [0]  # alone: itself


def test_admix_depends_on_the_batch_and_nothing_else(tiny_resnet, tiny_batch):
    """Admix is batch-dependent by design; what it reads of the batch is only the other images:
    four copies of one image (distinct ids) get the same result as that image alone, while four
    distinct images do not."""
    images, labels = tiny_batch
    kwargs = dict(steps=3, seed=2, **SMALL)
    same = images[:1].repeat(4, 1, 1, 1)
    together = skipgrad.attack(tiny_resnet, same, labels[:1].repeat(4), "mi+admix", **kwargs)
    for i in range(4):
        alone = skipgrad.attack(tiny_resnet, same[i:i + 1], labels[:1], "mi+admix", ids=[i],
                                **kwargs)
        assert (alone == together[i:i + 1]).float().mean() > 0.99  # float sums differ by batch
    batch = input_gradient([tiny_resnet], images, labels, AttackSpec.parse("admix", **SMALL),
                           PerImageRandom(0, range(4)))
    single = input_gradient([tiny_resnet], images[:1], labels[:1],
                            AttackSpec.parse("admix", **SMALL), PerImageRandom(0, range(1)))
    assert (batch[0] - single[0]).abs().max() > 1e-3 * single[0].abs().max()


# ---- SIA's transformations against their definitions ------------------------------------------

def test_sia_applies_each_blocks_operation():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 6, 7, generator=gen)
    noise = torch.rand(2, 4, 3, generator=gen)
    ops = (BlockOperation("vertical_flip", 0.0, (True, True)),
           BlockOperation("horizontal_shift", 0.5, (True, True)),
           BlockOperation("noise", 0.0, (True, True), noise),
           BlockOperation("dropout", 0.0, (True, False)))
    draw = StructureDraw(rows=(0, 2, 6), cols=(0, 3, 7), operations=ops)
    got = apply_structure(image[None], [draw])[0]
    top = torch.cat([image[:, :2, :3].flip(-2), image[:, :2, 3:].roll(2, dims=-1)], -1)
    noisy = (image[:, 2:, :3] + (2 * noise - 1) * SIA_NOISE).clamp(0, 1)
    dropped = image[:, 2:, 3:] * torch.tensor([1.0, 0.0])[:, None, None] / (1 - SIA_DROPOUT)
    torch.testing.assert_close(got, torch.cat([top, torch.cat([noisy, dropped], -1)], -2))


@pytest.mark.parametrize("name,expected", [
    ("vertical_shift", lambda b: b.roll(1, dims=-2)),  # int(0.25 * 5)
    ("horizontal_flip", lambda b: b.flip(-1)),
    ("rotate180", lambda b: b.rot90(2, dims=(-2, -1))),
    ("scale", lambda b: 0.25 * b),
    ("resize", lambda b: F.interpolate(F.interpolate(b[None], size=(5, 7), mode="bilinear"),
                                       size=(5, 8), mode="bilinear")[0].clamp(0, 1)),
])
def test_sia_whole_image_operations(name, expected):
    image = torch.rand(3, 5, 8, generator=torch.Generator().manual_seed(1))
    draw = StructureDraw((0, 5), (0, 8), (BlockOperation(name, 0.25, (True,) * 3),))
    torch.testing.assert_close(apply_structure(image[None], [draw])[0], expected(image))


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_sia_dct_keeps_the_lowest_frequencies(n):
    """A projection onto the DCT-II cosines of the lowest n - int(0.4 n) frequencies."""
    lowpass = lowpass_matrix(n).double()
    keep = n - int(0.4 * n)
    torch.testing.assert_close(lowpass, lowpass.T)
    torch.testing.assert_close(lowpass @ lowpass, lowpass, atol=1e-6, rtol=0)
    i = torch.arange(n, dtype=torch.float64)
    for k in range(n):
        cosine = torch.cos(math.pi * (2 * i + 1) * k / (2 * n))
        torch.testing.assert_close(lowpass @ cosine, cosine if k < keep else 0 * cosine,
                                   atol=1e-6, rtol=0)


def test_sia_draws_distinct_cuts_and_every_operation_equally_often():
    draws = draw_structure(PerImageRandom(0, range(1500)), (2, 12, 10), blocks=3)
    names = [op.name for d in draws for op in d.operations]
    for name in SIA_OPERATIONS:
        assert abs(names.count(name) / len(names) - 0.1) < 0.015, name
    for d in draws:
        assert d.rows[0] == 0 and d.rows[-1] == 12 and len(d.rows) == 4
        assert d.cols[0] == 0 and d.cols[-1] == 10 and len(d.cols) == 4
        assert all(a < b for a, b in zip(d.rows, d.rows[1:])), d.rows
        blocks = [(r1 - r0, c1 - c0) for r0, r1 in zip(d.rows, d.rows[1:])
                  for c0, c1 in zip(d.cols, d.cols[1:])]
        for op, (h, w) in zip(d.operations, blocks):
            assert (op.noise is not None) == (op.name == "noise")
            if op.noise is not None:
                assert op.noise.shape == (2, h, w) and 0 <= op.noise.min() <= op.noise.max() < 1


# ---- BSR's transformation against its definition ----------------------------------------------

def test_rotate_block_turns_about_the_centre():
    square = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotate_block(square, 90), square.rot90(-1, dims=(1, 2)),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate_block(square, 30)[:, 2, 2], square[:, 2, 2])  # the centre
    wide = torch.rand(1, 3, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rotate_block(wide, 180), wide.flip((1, 2)), atol=1e-5, rtol=0)
    assert torch.equal(rotate_block(wide, 0), wide)
    corners = rotate_block(torch.ones(1, 9, 9), 45)[0]
    assert corners[0, 0] == 0 and corners[4, 4] == 1  # zero where the turned block is not


def test_bsr_shuffles_block_rows_and_columns_and_rotates_each_block():
    image = torch.arange(2 * 6 * 7, dtype=torch.float32).view(2, 6, 7)
    draw = ShuffleDraw(heights=(2, 4), widths=(3, 4), row_order=(1, 0), col_order=(1, 0),
                       angles=(0.0, 180.0, 0.0, 0.0))
    got = apply_shuffle(image[None], [draw])[0]
    b = {(r, c): image[:, r0:r1, c0:c1] for r, (r0, r1) in enumerate([(0, 2), (2, 6)])
         for c, (c0, c1) in enumerate([(0, 3), (3, 7)])}
    want = torch.cat([torch.cat([b[1, 1], b[1, 0].flip((1, 2))], -1),
                      torch.cat([b[0, 1], b[0, 0]], -1)], -2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_bsr_draws_permutations_and_angles_in_range():
    for d in draw_shuffle(PerImageRandom(3, range(300)), (12, 10), blocks=3, max_angle=24.0):
        assert sum(d.heights) == 12 and sum(d.widths) == 10 and min(d.heights + d.widths) >= 1
        assert sorted(d.row_order) == [0, 1, 2] and sorted(d.col_order) == [0, 1, 2]
        assert len(d.angles) == 9 and all(-24 <= a <= 24 for a in d.angles)
    image = torch.rand(1, 1, 12, 10)
    unrotated = draw_shuffle(PerImageRandom(0, range(1)), (12, 10), blocks=2, max_angle=0.0)
    assert torch.equal(apply_shuffle(image, unrotated).flatten().sort().values,
                       image.flatten().sort().values)  # shuffled, nothing lost


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=6), st.integers(0, 40))
def test_bsr_block_lengths_fill_the_side_without_empty_blocks(weights, extra):
    length = len(weights) + extra
    lengths = block_lengths(weights, length)
    assert sum(lengths) == length and min(lengths) >= 1 and len(lengths) == len(weights)


# ---- Properties of every composition -------------------------------------------------------------

@pytest.mark.parametrize("method", NEW_ATTACKS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bound_holds_and_input_is_untouched(tiny_resnet, tiny_batch, method, norm):
    images, labels = tiny_batch
    images = images * 0.999 + 0.0004  # off the 8-bit levels
    before = images.clone()
    adv = skipgrad.attack(tiny_resnet, images, labels, method, sgm=0.5, norm=norm, eps=EPS[norm],
                          step_size=STEP[norm], steps=2, **SMALL)
    assert torch.equal(images, before), "the input was modified"
    assert adv.shape == images.shape and adv.dtype == images.dtype
    assert torch.equal(levels(adv), adv * 255)
    delta = levels(adv) - levels(images)
    if norm == "linf":
        assert delta.abs().max() <= 16
    else:
        assert (delta.flatten(1).norm(dim=1) <= EPS[norm] * 255 + 1e-4).all()
    assert delta.abs().sum() > 0


PER_IMAGE = "pgd+mi+di+si+vt+sia+bsr"  # every part whose draws are per image
ONE_COPY = SMALL | {"si_copies": 1, "sia_copies": 1, "bsr_copies": 1}


def test_per_image_parts_same_seed_same_result_and_batching_does_not_matter(tiny_resnet,
                                                                           tiny_batch):
    images, labels = tiny_batch
    kwargs = dict(seed=7, steps=2, **ONE_COPY)
    full = skipgrad.attack(tiny_resnet, images, labels, PER_IMAGE, **kwargs)
    assert torch.equal(full, skipgrad.attack(tiny_resnet, images, labels, PER_IMAGE, **kwargs))
    singles = torch.cat([skipgrad.attack(tiny_resnet, images[i:i + 1], labels[i:i + 1],
                                         PER_IMAGE, ids=[i], **kwargs) for i in range(4)])
    assert (singles == full).float().mean() > 0.99  # float sums may differ by batch, not draws
    other = skipgrad.attack(tiny_resnet, images, labels, PER_IMAGE, **(kwargs | {"seed": 8}))
    assert not torch.equal(full, other)


class RowCounter(nn.Module):
    """Counts the images a model is evaluated on (each forward here is followed by a backward)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("method", ["ifgsm", "mi+di+ti", "si", "vmi", "ni+vt+si", "admix",
                                    "sia", "bsr", "mi+di+admix+sia+vt"])
def test_declared_cost_is_the_number_of_model_evaluations(tiny_batch, method):
    images, labels = tiny_batch
    torch.manual_seed(0)
    sources = [RowCounter(randomise_batchnorm(TinyResNet(width=4, blocks=1), s)) for s in (1, 2)]
    spec = AttackSpec.parse(method, steps=2, **SMALL)
    skipgrad.attack(sources, images, labels, method, steps=2, **SMALL)
    for source in sources:
        assert source.rows == len(images) * spec.gradient_evaluations, method


def test_published_defaults_and_their_costs():
    assert AttackSpec.parse("si").evaluation_costs == {"si": 5}
    vmi = AttackSpec.parse("vmi")
    assert (vmi.vt_neighbours, vmi.vt_beta, vmi.gradient_evaluations_per_step) == (20, 1.5, 21)
    assert vmi.gradient_evaluations == 10 * 21 - 20  # the last step needs no variance
    admix = AttackSpec.parse("admix")
    assert (admix.admix_mixes, admix.admix_scales, admix.admix_eta) == (3, 5, 0.2)
    assert admix.gradient_evaluations_per_step == 15
    sia, bsr = AttackSpec.parse("sia"), AttackSpec.parse("bsr")
    assert (sia.sia_copies, sia.sia_blocks, sia.gradient_evaluations_per_step) == (20, 3, 20)
    assert (bsr.bsr_copies, bsr.bsr_blocks, bsr.bsr_max_angle) == (20, 2, 24.0)
    # VMI-DI-TI-SI of Wang & He: 5 scale copies at the iterate and at each of 20 neighbours.
    assert AttackSpec.parse("mi+di+ti+si+vt").gradient_evaluations_per_step == 5 * 21
    assert AttackSpec.parse("mi+di+ti").gradient_evaluations == 10


# ---- Names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,canonical", [
    ("vmi", "mi+vt"), ("vni", "ni+vt"), ("sini", "ni+si"), ("si+mi", "mi+si"),
    ("bsr+sia+di+vni", "ni+di+vt+sia+bsr"),
    ("mi+di+ti", "mi+di+ti"), ("pgd", "pgd"), ("admix+ti+mi+di", "mi+di+ti+admix"),
])
def test_names_spell_the_parts_in_one_order(name, canonical):
    spec = AttackSpec.parse(name)
    assert spec.name == canonical
    assert AttackSpec.parse(canonical) == spec


@pytest.mark.parametrize("change,message", [
    (dict(method="vmi+vt"), r"names a component twice; vmi = mi\+vt"),
    (dict(method="vmi+ni"), r"several update rules \(mi, ni\); pick one; vmi = mi\+vt"),
    (dict(method="si+admix"), "already averages over SI's scale copies"),
    (dict(method="mi+foo"), "known: .*si, vt, admix, sia, bsr, vmi, vni, sini"),
    (dict(method="si", si_copies=0), "si_copies must be a positive integer"),
    (dict(method="vt", vt_neighbours=2.5), "vt_neighbours must be a positive integer"),
    (dict(method="vt", vt_beta=0.0), "vt_beta must be a finite number > 0"),
    (dict(method="admix", admix_eta=-0.1), "admix_eta must be a finite number in"),
    (dict(method="bsr", bsr_max_angle=200), "bsr_max_angle"),
    (dict(method="sia", sia_blocks=13), r"sia_blocks=13 blocks per side do not fit 12x12"),
    (dict(method="bsr", bsr_blocks=20), r"bsr_blocks=20 blocks per side do not fit 12x12"),
])
def test_bad_companion_settings_fail_before_any_forward_pass(tiny_resnet, tiny_batch, change,
                                                             message):
    images, labels = tiny_batch
    model = RowCounter(tiny_resnet)
    kwargs = dict(change)
    with pytest.raises(ValueError, match=message):
        skipgrad.attack(model, images, labels, kwargs.pop("method"), **kwargs)
    assert model.rows == 0
