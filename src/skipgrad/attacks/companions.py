"""Companion parts of the gradient estimate: input copies whose gradients are averaged (SI,
Admix, SIA, BSR, with DI on each copy) and variance tuning (VT).

The attack loop (:mod:`skipgrad.attacks.loop`) asks for one gradient per step. A copy part
replaces that gradient by the mean of the gradients of several transformed copies of the input;
the parts nest in a fixed order (Admix mixtures, then scale copies, then BSR, then SIA, then DI on
each copy), so that ``admix+bsr`` averages over 3 x 5 x 20 copies. VT wraps the whole estimate:
it adds the variance of the estimate around the iterate, measured at the previous step. Every
other part of the loop (update rule, TI, SGM and the backward-pass methods, ensembles) applies to
the estimate unchanged, so any composition is one configuration of the one loop. The cost of each
part in model evaluations is :attr:`AttackSpec.evaluation_costs`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from skipgrad.attacks.block_transforms import (apply_shuffle, apply_structure, draw_shuffle,
                                               draw_structure)
from skipgrad.attacks.config import AttackSpec
from skipgrad.attacks.randomness import PerImageRandom, uniform_in_ball
from skipgrad.attacks.transforms import apply_diversity, draw_diversity
from skipgrad.errors import InputError

Transform = Callable[[torch.Tensor], torch.Tensor]
Factor = Callable[[], Iterator[Transform]]


def copy_transforms(spec: AttackSpec, x: torch.Tensor, rng: PerImageRandom) -> Iterator[Transform]:
    """The input copies of one gradient estimate at ``x``: differentiable functions of the input
    (N, C, H, W) whose gradients the estimate averages; one identity copy without copy parts.

    The random parameters of a copy are drawn from the per-image streams when the copy is
    produced, so only one copy's parameters are held at a time and each image's draws follow
    the same order whatever batch it is in. Admix alone also reads the other images of ``x``.
    """
    factors: list[Factor] = []
    if spec.admix:
        factors.append(lambda: _mixtures(spec, x, rng))
    if spec.admix or spec.scale_invariance:
        count = spec.admix_scales if spec.admix else spec.si_copies
        factors.append(lambda: _scales(count))
    if spec.block_shuffle_rotation:
        factors.append(lambda: _shuffles(spec, x, rng))
    if spec.structure_invariance:
        factors.append(lambda: _structures(spec, x, rng))
    if spec.input_diversity:
        factors.append(lambda: _diversity(spec, x, rng))
    return _product(factors, lambda v: v)


def _product(factors: Sequence[Factor], inner: Transform) -> Iterator[Transform]:
    # Every combination of one transform per factor; a factor is re-entered (and so draws anew)
    # for every transform of the factors before it.
    if not factors:
        yield inner
        return
    for transform in factors[0]():
        yield from _product(factors[1:], _then(inner, transform))


def _then(first: Transform, second: Transform) -> Transform:
    return lambda v: second(first(v))


def _scales(count: int) -> Iterator[Transform]:
    """SI (Lin et al., ICLR 2020, "Nesterov Accelerated Gradient and Scale Invariance for
    Adversarial Attacks"): the copies ``x / 2**i`` for i < count; also Admix's scales."""
    for i in range(count):
        yield lambda v, divisor=2**i: v / divisor


def _mixtures(spec: AttackSpec, x: torch.Tensor, rng: PerImageRandom) -> Iterator[Transform]:
    """Admix (Wang et al., ICCV 2021, "Admix: Enhancing the Transferability of Adversarial
    Attacks"): ``admix_mixes`` copies ``x + eta * x'``, each with its own other image ``x'`` of
    the batch, taken as it is now and as a constant (no gradient flows into it)."""
    for _ in range(spec.admix_mixes):
        added = spec.admix_eta * x.detach()[admix_partners(rng, x.shape[0])]
        yield lambda v, added=added: v + added


def admix_partners(rng: PerImageRandom, count: int) -> list[int]:
    """For each of ``count`` images, the batch position of the image it is mixed with: uniform
    among the *other* images (one draw from the image's stream), itself in a batch of one.

    Which image that is depends on the batch (the draw does not): Admix is the one part whose
    result depends on how the images are grouped. The authors permute the batch, which can
    pair an image with itself; skipgrad never does while there is another image.
    """
    partners = []
    for i, u in enumerate(rng.uniform((1,))[:, 0].tolist()):
        if count == 1:
            partners.append(i)
            continue
        j = min(int(u * (count - 1)), count - 2)
        partners.append(j + (j >= i))  # skip the image itself
    return partners


def _shuffles(spec: AttackSpec, x: torch.Tensor, rng: PerImageRandom) -> Iterator[Transform]:
    """BSR (Wang et al., CVPR 2024): ``bsr_copies`` block-shuffled, block-rotated copies."""
    for _ in range(spec.bsr_copies):
        draws = draw_shuffle(rng, tuple(x.shape[-2:]), spec.bsr_blocks, spec.bsr_max_angle)
        yield lambda v, draws=draws: apply_shuffle(v, draws)


def _structures(spec: AttackSpec, x: torch.Tensor, rng: PerImageRandom) -> Iterator[Transform]:
    """SIA (Wang et al., ICCV 2023): ``sia_copies`` copies with a random transformation per
    block."""
    for _ in range(spec.sia_copies):
        draws = draw_structure(rng, tuple(x.shape[1:]), spec.sia_blocks)
        yield lambda v, draws=draws: apply_structure(v, draws)


def _diversity(spec: AttackSpec, x: torch.Tensor, rng: PerImageRandom) -> Iterator[Transform]:
    """DI (Xie et al., CVPR 2019) on each copy, with its own draw, closest to the model as in
    the authors' DI-TI-SI compositions."""
    draws = draw_diversity(rng, tuple(x.shape[-2:]), spec.di_prob, spec.di_scale)
    yield lambda v: apply_diversity(v, draws)


class VarianceTuning:
    """VT (Wang & He, CVPR 2021, "Enhancing the Transferability of Adversarial Attacks through
    Variance Tuning"): step t uses ``g_t + v_{t-1}``, where ``v_t`` is the mean gradient at
    ``vt_neighbours`` points uniform in the ball of radius ``vt_beta * eps`` around the iterate
    ``x_t`` minus ``g_t``, and ``v_0 = 0``.

    As the authors (and torchattacks' VMI/VNI-FGSM): the neighbours are around ``x_t`` even
    for NI, whose ``g_t`` is taken at the look-ahead point; they are not clipped to [0, 1]; each
    neighbour's gradient is the full estimate (every copy part and DI, fresh draws); TI, if any,
    smooths the tuned gradient. The last step skips the neighbours: their variance would only
    serve a step that never comes. L2 attacks sample the L2 ball (the paper's box is the L-inf
    ball).
    """

    def __init__(self, spec: AttackSpec, rng: PerImageRandom,
                 estimate: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._spec, self._rng, self._estimate = spec, rng, estimate
        self._variance: torch.Tensor | None = None

    def tune(self, grad: torch.Tensor, x: torch.Tensor, last: bool = False) -> torch.Tensor:
        """The tuned gradient of the step at iterate ``x`` whose estimate is ``grad``."""
        tuned = grad if self._variance is None else grad + self._variance
        if not last:
            self._variance = self._neighbour_mean(x) - grad
        return tuned

    def _neighbour_mean(self, x: torch.Tensor) -> torch.Tensor:
        spec, total = self._spec, torch.zeros_like(x)
        for _ in range(spec.vt_neighbours):
            offset = uniform_in_ball(self._rng, tuple(x.shape[1:]), spec.vt_beta * spec.eps,
                                     spec.norm, x.device)
            total += self._estimate(x + offset.to(x.dtype))
        return total / spec.vt_neighbours


def check_input_size(spec: AttackSpec, shape: Sequence[int]) -> None:
    """Refuse, before any model call, block parts with more blocks per side than pixels."""
    height, width = shape[-2:]
    for on, field, blocks in ((spec.structure_invariance, "sia_blocks", spec.sia_blocks),
                              (spec.block_shuffle_rotation, "bsr_blocks", spec.bsr_blocks)):
        if on and blocks > min(height, width):
            raise InputError(f"{field}={blocks} blocks per side do not fit {height}x{width} "
                             f"images; use at most {min(height, width)}")
