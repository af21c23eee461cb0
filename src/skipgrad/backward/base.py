"""The contract every backward-pass method shares: a context around the gradient computation.

A backward-pass method (SGM, LinBP, BPA, PNA, TGR, ...) changes only how gradients flow back
through a source model; forward values stay identical. Each one is a :class:`BackwardContext`:

* it decides *what* to change when it is built, by module type and structure (never by name), and
  raises a :class:`NothingToChangeError` (a ``ValueError``) when the model has nothing it applies
  to -- never a silent no-op;
* entering it attaches hooks (or swaps forwards), exiting removes every one of them, also when the
  body raises; it may be entered again after it exits, but not while it is active;
* it lists what it changes (:attr:`BackwardContext.changes`) for ``skipgrad inspect`` and run.json;
* it may *claim* modules whose backward it redefines outright (a ReLU made linear, a max-pool
  made soft): two active contexts claiming the same module raise :class:`BackwardConflictError`
  instead of silently composing into something neither paper describes. Methods that only scale a
  gradient (SGM) claim nothing and compose with everything.

The forward-side methods (Ghost networks, IAA) keep the same contract but change the forward pass
too; they say so with :attr:`BackwardContext.changes_forward`, so that reports can add the
white-box success on the unmodified source. A method that draws random numbers takes them from
the attack's per-image streams when the attack loop hands them over
(:meth:`BackwardContext.follow_attack`).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Iterator, Optional, Protocol

import torch
from torch import nn

from skipgrad.errors import InputError


class Removable(Protocol):
    """Anything with ``remove()``: a hook handle or a group of them."""

    def remove(self) -> None: ...


Attacher = Callable[[], Removable]


class RandomStreams(Protocol):
    """Per-image random streams (:class:`skipgrad.attacks.randomness.PerImageRandom`)."""

    def __len__(self) -> int: ...

    def uniform(self, shape: tuple[int, ...],
                device: torch.device | str = "cpu") -> torch.Tensor: ...


# (seed or None for the attack's own seed, stream name) -> the streams of the attack's images.
StreamFactory = Callable[[Optional[int], str], RandomStreams]


class NothingToChangeError(InputError):
    """The model holds nothing that a backward-pass method applies to."""


class BackwardConflictError(InputError):
    """Two active backward-pass methods would redefine the backward of the same module."""


@dataclass(frozen=True)
class Change:
    """One module whose backward a method changes, and how (for inspect and run.json)."""

    module: str
    what: str


class HandleGroup:
    """Several hook handles (or other removables) removed as one."""

    def __init__(self, handles: Iterable[Removable]) -> None:
        self._handles = list(handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class ForwardSwap:
    """Replaces one module's ``forward`` by an instance attribute until :meth:`remove`.

    Used where a method redefines an operator's backward outright (a ReLU made linear, a soft
    max-pool): a forward hook cannot, because in-place ReLUs have already overwritten their input
    when the hook runs. Hooks other code registers on the module keep running around the swap.
    """

    def __init__(self, module: nn.Module, forward: Callable[..., object]) -> None:
        self._module = module
        self._previous = module.__dict__.get("forward")  # an earlier instance-level forward
        module.forward = forward

    def remove(self) -> None:
        if self._previous is not None:
            self._module.forward = self._previous
        else:
            self._module.__dict__.pop("forward", None)


@contextlib.contextmanager
def evaluation_mode(models: Iterable[nn.Module]) -> Iterator[None]:
    """Put every module of ``models`` in eval mode (no batch statistics, no dropout masks) and
    restore each module's own flag afterwards, also when the body raises. The one such context:
    the attack loop and ``inspect`` both use it."""
    models = list(models)
    states = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in states:
            module.training = training


def model_label(model: nn.Module) -> str:
    """How messages name a model: its spec when it is a loaded model (``zoo:fmnist-cnn``; every
    loaded model shares one wrapper class), else its class."""
    spec = getattr(getattr(model, "config", None), "spec", None)
    return spec if isinstance(spec, str) else type(model).__name__


def module_names(model: nn.Module) -> dict[int, str]:
    """``id(module) -> qualified name`` for every submodule (the root is ``""``)."""
    return {id(m): name for name, m in model.named_modules()}


# Which active context has claimed a module's backward; weak so that models can be freed.
_CLAIMS: "weakref.WeakKeyDictionary[nn.Module, BackwardContext]" = weakref.WeakKeyDictionary()


class BackwardContext:
    """Base class of the backward-pass methods; see the module docstring for the contract.

    Subclasses set :attr:`method`, and in ``__init__`` call ``super().__init__(model)`` and then
    :meth:`_set_plan` with their attachers, the changes they make and the modules they claim.
    """

    method: ClassVar[str] = "backward"
    # True for methods that change forward values (Ghost, IAA): predictions of the source differ.
    changes_forward: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.method} needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.changes: list[Change] = []
        self._attachers: list[Attacher] = []
        self._claimed: list[tuple[str, nn.Module]] = []
        self._handles: list[Removable] = []

    def _set_plan(self, attachers: list[Attacher], changes: list[Change],
                  claims: Iterable[tuple[str, nn.Module]] = ()) -> None:
        """Record what entering the context will do. ``claims`` are ``(name, module)`` pairs
        whose backward this method redefines outright (see :class:`BackwardConflictError`)."""
        self._attachers = attachers
        self.changes = changes
        self._claimed = list(claims)

    def follow_attack(self, streams: StreamFactory) -> None:
        """Called by the attack loop before entering: ``streams(seed, name)`` gives per-image
        random streams of the attacked images. Methods that draw random numbers take theirs from
        it, so that an image's draws depend on the run seed and its id only; others ignore it."""

    def __enter__(self) -> "BackwardContext":
        if self._handles:
            raise RuntimeError(f"this {self.method} context is already active")
        self._claim()
        try:
            for attach in self._attachers:
                self._handles.append(attach())
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove()

    def _claim(self) -> None:
        for name, module in self._claimed:
            owner = _CLAIMS.get(module)
            if owner is not None and owner is not self:
                self._release()
                both_forward = self.changes_forward and owner.changes_forward
                pass_, hint = ("forward", "") if both_forward else \
                    ("backward", " (e.g. a later start= for one of them)")
                raise BackwardConflictError(
                    f"{self.method} and {owner.method} would both redefine the {pass_} pass of "
                    f"{name or model_label(self.model)} ({type(module).__name__}); use one of "
                    f"them for this module{hint}")
            _CLAIMS[module] = self

    def _release(self) -> None:
        for _, module in self._claimed:
            if _CLAIMS.get(module) is self:
                del _CLAIMS[module]

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._release()

    @property
    def active(self) -> bool:
        """Whether hooks are currently attached."""
        return bool(self._handles)
