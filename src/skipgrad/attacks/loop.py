"""The one iterative attack loop; every attack is a composition of its parts.

An attack = objective (``losses``) + gradient estimate (the mean over input copies: DI, and the
companion parts SI, Admix, SIA, BSR of ``companions``; VT's variance term) + optional gradient
transform (TI; SGM and the other backward-pass methods as contexts around the source models) +
update rule (sign, momentum, Nesterov) + projection. ``"mi+di+ti+si"`` with ``sgm=0.2`` and
``backward="linbp"`` is a configuration of this loop, not a class.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from skipgrad.attacks.companions import VarianceTuning, check_input_size, copy_transforms
from skipgrad.attacks.config import AttackSpec
from skipgrad.attacks.losses import attack_objective
from skipgrad.attacks.randomness import PerImageRandom, stream_factory, uniform_in_ball
from skipgrad.attacks.transforms import gaussian_kernel, smooth_gradient
from skipgrad.attacks.updates import l1_normalise, project, quantise_in_ball, steepest_direction
from skipgrad.backward import BackwardContext, check_gamma, skip_gradient
from skipgrad.backward.base import evaluation_mode
from skipgrad.backward.registry import BackwardPlan
from skipgrad.errors import InputError


class NonFiniteGradientError(InputError, FloatingPointError):
    """A source model produced NaN or inf logits or gradients for some images; the attribute
    ``positions`` lists their indices in the batch. An input error (the model given, e.g. a broken
    checkpoint), and still a ``FloatingPointError`` as before."""

    def __init__(self, message: str, positions: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.positions: list[int] = list(positions)


def attack(
    model: nn.Module | Sequence[nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    method: str = "ifgsm",
    *,
    sgm: float | None | Sequence[float | None] = None,
    sgm_official: bool = False,
    backward: str | BackwardPlan | None | Sequence[str | BackwardPlan | None] = None,
    forward: str | BackwardPlan | None | Sequence[str | BackwardPlan | None] = None,
    eps: float = 16 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    norm: str = "linf",
    loss: str = "ce",
    targeted: bool = False,
    seed: int = 0,
    ids: Sequence[int] | torch.Tensor | None = None,
    decay: float = 1.0,
    di_prob: float = 0.5,
    di_scale: float = 1.1,
    ti_kernel: int = 7,
    **settings: object,
) -> torch.Tensor:
    """Craft adversarial examples with a composable iterative attack, optionally with SGM.

    Args:
        model: a module taking images in [0, 1] (normalisation inside), or a list of them: an
            ensemble whose per-model objectives are averaged.
        images: float tensor (N, C, H, W) in [0, 1]; not modified.
        labels: int64 (N,): true labels (untargeted) or target labels (``targeted=True``).
        method: ``ifgsm``, ``pgd``, ``mi``, ``ni``, ``di``, ``ti`` and the companion parts
            ``si``, ``vt``, ``admix``, ``sia``, ``bsr`` composed with ``+`` (aliases ``vmi``,
            ``vni``, ``sini``; see :class:`AttackSpec`).
        sgm: SGM decay gamma in (0, 1] for every source, a list with one entry per source
            (``None`` = no SGM for that source), or ``None`` for no SGM at all.
        sgm_official: use the authors' hook placement (torchvision ResNet/DenseNet only).
        backward: backward-pass methods (LinBP, BPA, PNA, TGR, ... see
            :mod:`skipgrad.backward.registry`) for every source, written
            ``"METHOD[:key=value,...]"`` and joined with ``+`` (``"linbp:branch_scale=0.5+bpa"``),
            or a list with one entry per source (``None`` = none for that source). They are
            entered after SGM, in the order given, around the whole loop.
        forward: methods that change the source's forward pass too (``"ghost"``,
            ``"iaa:beta=20,residual_scale=0.98/0.87/0.73/0.19"``; see
            :mod:`skipgrad.backward.ghost_networks` and :mod:`skipgrad.backward.intrinsic_adversarial_attack`), in the same forms
            as ``backward`` and entered after it. Their random draws (Ghost) come from each
            image's own stream of ``seed``.
        eps, step_size: ball radius and step in [0, 1] pixel units (16/255 and 2/255 in the paper).
        steps: iterations (10 in the paper). norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"`` or ``"margin"``. targeted: aim for ``labels`` instead of away from them.
        seed, ids: the run seed and per-image ids; each image's random draws (PGD start, DI, the
            companion parts) come from its own stream, so results do not depend on batching,
            except Admix's, which mixes each image with others of its batch. ``ids`` defaults
            to 0..N-1.
        decay: MI/NI momentum decay. di_prob, di_scale: DI probability and canvas scale.
        ti_kernel: TI Gaussian kernel size (odd).
        settings: the companion parts' settings, as :class:`AttackSpec` fields (``si_copies``,
            ``vt_neighbours``, ``vt_beta``, ``admix_scales``, ``admix_mixes``, ``admix_eta``,
            ``sia_copies``, ``sia_blocks``, ``bsr_copies``, ``bsr_blocks``, ``bsr_max_angle``).

    Returns:
        Adversarial images in [0, 1] on 8-bit levels: ``round(adv*255)`` is within the eps-ball of
        ``round(images*255)`` (L-inf: at most ``floor(eps*255)`` levels per pixel; L2: an integer
        sum of squared level differences of at most ``(eps*255)**2``; see
        :func:`~skipgrad.attacks.updates.quantise_in_ball`).

    Models are switched to eval mode during the attack and restored afterwards.
    """
    spec = AttackSpec.parse(method, eps=eps, step_size=step_size, steps=steps, norm=norm,
                            loss=loss, targeted=targeted, decay=decay, di_prob=di_prob,
                            di_scale=di_scale, ti_kernel=ti_kernel,
                            sgm=tuple(sgm) if isinstance(sgm, (list, tuple)) else sgm,
                            sgm_official=sgm_official, backward=backward, seed=seed,
                            forward=forward, **settings)
    return attack_with(model, images, labels, spec, ids=ids)


def attack_with(model: nn.Module | Sequence[nn.Module], images: torch.Tensor,
                labels: torch.Tensor, spec: AttackSpec,
                ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """:func:`attack` with its parameters in one :class:`AttackSpec` (what the runner and the
    calibration pass along); same checks, same result."""
    sources = _as_sources(model)
    contexts = backward_contexts(sources, spec)
    _check_images(images)
    _check_labels(labels, images)
    check_input_size(spec, images.shape)
    labels = labels.long()  # int32 is accepted; the losses index with int64
    image_ids = _check_ids(ids, images.shape[0])
    rng = PerImageRandom(spec.seed, image_ids)
    for context in contexts:  # methods that draw (Ghost) take per-image streams of the run seed
        context.follow_attack(stream_factory(spec.seed, image_ids))
    with contextlib.ExitStack() as stack:
        stack.enter_context(evaluation_mode(sources))
        for context in contexts:
            stack.enter_context(context)
        adv = run_attack(sources, images.detach(), labels, spec, rng)
    return quantise_in_ball(adv, images.detach(), spec.eps, spec.norm)


def run_attack(sources: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
               spec: AttackSpec, rng: PerImageRandom) -> torch.Tensor:
    """The loop itself, on validated inputs; SGM and the backward-pass methods, if any, are already
    attached to the sources."""
    kernel = gaussian_kernel(spec.ti_kernel).to(images) if spec.translation_invariance else None
    x_adv = random_start(images, spec, rng) if spec.random_start else images.clone()
    momentum = torch.zeros_like(images)
    tuning = VarianceTuning(spec, rng, lambda x: input_gradient(sources, x, labels, spec, rng)) \
        if spec.variance_tuning else None
    for step in range(spec.steps):
        query = x_adv
        if spec.update == "ni":  # Nesterov look-ahead (Lin et al., ICLR 2020)
            query = x_adv + spec.step_size * spec.decay * _lookahead(momentum, spec.norm)
        grad = input_gradient(sources, query, labels, spec, rng)
        if tuning is not None:  # before TI, which smooths the tuned gradient (Wang & He)
            grad = tuning.tune(grad, x_adv, last=step == spec.steps - 1)
        if kernel is not None:
            grad = smooth_gradient(grad, kernel)
        if spec.update in ("mi", "ni"):
            momentum = spec.decay * momentum + l1_normalise(grad)
            grad = momentum
        x_adv = project(x_adv + spec.step_size * steepest_direction(grad, spec.norm),
                        images, spec.eps, spec.norm)
    return x_adv


def input_gradient(sources: Sequence[nn.Module], x: torch.Tensor, labels: torch.Tensor,
                   spec: AttackSpec, rng: PerImageRandom) -> torch.Tensor:
    """Gradient of the ensemble-averaged objective w.r.t. ``x``, averaged over the input copies
    of the estimate (``companions.copy_transforms``: DI and the copy parts; ``x`` itself without
    them). One copy and one source at a time, so that memory grows with the largest source, not
    with the sources' sum or the number of copies."""
    total, copies = torch.zeros_like(x), 0
    for transform in copy_transforms(spec, x, rng):
        for model in sources:
            x_var = x.detach().requires_grad_(True)
            logits = model(transform(x_var))
            _check_logits(logits, labels)
            objective = attack_objective(logits, labels, spec.loss, spec.targeted).sum()
            (grad,) = torch.autograd.grad(objective / len(sources), x_var)
            total += grad
        copies += 1
    _check_finite(total, "gradient")
    return total / copies


def random_start(images: torch.Tensor, spec: AttackSpec, rng: PerImageRandom) -> torch.Tensor:
    """A uniform random point of the ball (PGD, Madry et al., ICLR 2018)."""
    delta = uniform_in_ball(rng, tuple(images.shape[1:]), spec.eps, spec.norm, images.device)
    return project(images + delta.to(images.dtype), images, spec.eps, spec.norm)


def _lookahead(momentum: torch.Tensor, norm: str) -> torch.Tensor:
    # L-inf: the accumulated (mean-abs normalised) momentum as in Lin et al.; L2: its unit vector,
    # so that the look-ahead is measured in the same units as the step.
    return momentum if norm == "linf" else steepest_direction(momentum, norm)


def _as_sources(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(model, nn.Module):
        return [model]
    if not isinstance(model, Sequence) or not model:
        raise InputError(f"attack needs an nn.Module or a non-empty list of them as the source, "
                         f"got {type(model).__name__}")
    for m in model:
        if not isinstance(m, nn.Module):
            raise InputError(f"source models must be nn.Module, got {type(m).__name__}")
    return list(model)


def backward_contexts(sources: Sequence[nn.Module], spec: AttackSpec) -> list[BackwardContext]:
    """Every context that changes the sources' gradient, in the order they are entered: per
    source, SGM first, then the backward-pass methods in the order given, then the methods that
    change the forward pass. Built here, before any gradient, so that a method with nothing to
    change in a source raises before the attack."""
    gammas = spec.sgm_per_source(len(sources))
    plans = spec.backward_per_source(len(sources))
    forwards = spec.forward_per_source(len(sources))
    contexts: list[BackwardContext] = []
    for model, gamma, plan, forward in zip(sources, gammas, plans, forwards):
        if gamma is not None:
            contexts.append(skip_gradient(model, check_gamma(gamma), official=spec.sgm_official))
        for chosen in (plan, forward):
            if chosen is not None:
                contexts += chosen.build(model)
    return contexts


def _check_images(images: object) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise InputError("images must be a floating-point tensor (N, C, H, W) in [0, 1]")
    if images.dim() != 4 or images.shape[0] == 0:
        raise InputError(f"images must have shape (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    _check_finite(images, "images", InputError)
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise InputError(f"images must be in [0, 1] (normalise inside the model); "
                         f"got values in [{low:.4g}, {high:.4g}]")


def _check_labels(labels: object, images: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise InputError("labels must be an integer tensor of shape (N,)")
    if labels.shape != (images.shape[0],):
        raise InputError(f"labels must have shape ({images.shape[0]},) to match the images, "
                         f"got {tuple(labels.shape)}")
    if labels.device != images.device:
        raise InputError(f"labels are on {labels.device} but images on {images.device}")
    if labels.numel() and labels.min().item() < 0:
        raise InputError("labels must be >= 0")


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise InputError(f"a source model returned shape {tuple(logits.shape)}; expected logits "
                         f"(N={labels.shape[0]}, num_classes)")
    if labels.max().item() >= logits.shape[1]:
        raise InputError(f"label {labels.max().item()} is out of range for a model with "
                         f"{logits.shape[1]} classes")
    _check_finite(logits, "logits")


def _check_finite(x: torch.Tensor, what: str,
                  error: type[Exception] = NonFiniteGradientError) -> None:
    if torch.isfinite(x).all():  # one reduction on the hot path; per-image detail only on failure
        return
    bad = ~torch.isfinite(x.detach()).flatten(1).all(dim=1)
    if bad.any():
        positions = bad.nonzero().flatten().tolist()
        message = f"non-finite {what} (NaN or inf) for images at batch positions {positions[:20]}"
        if error is NonFiniteGradientError:  # its positions let callers name the files (engine)
            raise NonFiniteGradientError(message, positions)
        raise error(message)


def _check_ids(ids: Sequence[int] | torch.Tensor | None, n: int) -> list[int]:
    if ids is None:
        return list(range(n))
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if len(ids) != n:
        raise InputError(f"ids has {len(ids)} entries for {n} images")
    return [int(i) for i in ids]
