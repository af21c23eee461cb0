"""Methods that change the gradient, by name, and the ``METHOD[:key=value,...]`` notation of the
command line.

A method is registered once with a factory ``factory(model, **settings) -> BackwardContext``, a
one-line summary, the settings it accepts with their types and its *kind*: ``"backward"`` for the
methods that change only the backward pass (``--backward``, ``attack(backward=...)``) and
``"forward"`` for those that change the forward pass too (Ghost networks, IAA: ``--forward``,
``attack(forward=...)``). Both kinds share this registry and this notation; each listing and each
parser asks for one kind. Defaults are read from the factory's signature, so the record in run.json
always holds the *resolved* settings. Several methods for one source model are joined with ``+``::

    linbp                                   # defaults
    linbp:branch_scale=0.5+bpa:start=layer4 # two methods, entered in this order
    iaa:beta=20,residual_scale=0.98/0.87/0.73/0.19   # a per-stage list: values joined by "/"
    none                                    # nothing (one entry of a per-source list)

Values are typed by the method's declaration: ``float``, ``int``, ``str`` (e.g. a module name such
as ``layer3.1``), ``tuple`` (a list of floats written ``a/b/c``), and ``none`` where a setting
accepts None. Users add their own method with :func:`register_method`; a name is never silently
redefined.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from torch import nn

from skipgrad.backward.base import BackwardContext
from skipgrad.errors import InputError

Factory = Callable[..., BackwardContext]
Value = float | int | str | tuple[float, ...] | None
_TYPES = (float, int, str, tuple)
KINDS = ("backward", "forward")
_TYPE_NAMES = {float: "float", int: "int", str: "str", tuple: "float/float/..."}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# A "+" starts the next method only when a name follows (so that "1e+3" stays one value).
_METHOD_SEPARATOR = re.compile(r"\+(?=\s*[A-Za-z_])")


class BackwardSpecError(InputError):
    """A ``METHOD[:key=value,...]`` text or a method's settings cannot be used (one-line reason);
    for forward methods too (one notation, one error)."""


@dataclass(frozen=True)
class Setting:
    """One setting a method accepts: its value types (in parsing order) and whether None is
    allowed (written ``none``)."""

    types: tuple[type, ...]
    allow_none: bool = False

    @classmethod
    def of(cls, declared: type | None | Sequence[type | None]) -> "Setting":
        """From a declaration such as ``float`` or ``(str, None)``."""
        values = list(declared) if isinstance(declared, (tuple, list)) else [declared]
        types = tuple(t for t in values if t is not None)
        if not types or any(t not in _TYPES for t in types):
            raise TypeError(f"setting types must be float, int, str or tuple (optionally with "
                            f"None), got {declared!r}")
        return cls(types, None in values)

    def describe(self) -> str:
        names = [_TYPE_NAMES[t] for t in self.types] + (["none"] if self.allow_none else [])
        return "|".join(names)

    def parse(self, text: str) -> Value:
        """The typed value of ``text``; raises ValueError naming the accepted types."""
        text = text.strip()
        if self.allow_none and text.lower() == "none":
            return None
        for kind in self.types:
            value = _convert(kind, text)
            if value is not None:
                return value
        raise ValueError(f"{text!r} is not {self.describe()}")

    def check(self, value: object) -> Value:
        """A Python value given directly (API, TOML): same types as :meth:`parse` accepts."""
        if value is None and self.allow_none:
            return None
        if isinstance(value, str) and str not in self.types:
            return self.parse(value)
        for kind in self.types:
            if kind is tuple and isinstance(value, (list, tuple)):
                numbers = _floats(value)
                if numbers is not None:
                    return numbers
            elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    return float(value)
            elif isinstance(value, kind) and not isinstance(value, bool):
                return value
        raise ValueError(f"{value!r} is not {self.describe()}")


def _convert(kind: type, text: str) -> Value:
    if kind is str:
        return text if text else None
    if kind is tuple:
        return _floats([_convert(float, part) for part in text.split("/")])
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if kind is int or math.isfinite(value) else None


def _floats(values: Sequence[object]) -> tuple[float, ...] | None:
    """A non-empty sequence of finite real numbers as a tuple of floats, else None."""
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float))
                         or not math.isfinite(v) for v in values):
        return None
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: how to build it, what it does, which settings it takes, and its kind
    (``"backward"``: changes only the backward pass; ``"forward"``: changes the forward pass)."""

    name: str
    factory: Factory
    summary: str
    settings: Mapping[str, Setting]
    defaults: Mapping[str, Value]
    kind: str = "backward"

    def resolve(self, given: Mapping[str, object]) -> dict[str, Value]:
        """Defaults overlaid with ``given``, each value checked against its declared type."""
        self.check_keys(given)
        resolved = dict(self.defaults)
        for key, value in given.items():
            try:
                resolved[key] = self.settings[key].check(value)
            except ValueError as exc:
                raise BackwardSpecError(f"{self.name}:{key}: {exc}") from None
        missing = [k for k in self.settings if k not in resolved]
        if missing:
            raise BackwardSpecError(f"{self.name} needs {missing[0]}=... ({self._known_settings()})")
        return resolved

    def check_keys(self, keys: Iterable[str]) -> None:
        """Refuse a key this method does not take, listing the ones it does."""
        unknown = [k for k in keys if k not in self.settings]
        if unknown:
            raise BackwardSpecError(f"{self.name} has no setting {unknown[0]!r} "
                                    f"({self._known_settings()})")

    def _known_settings(self) -> str:
        if not self.settings:
            return "it takes no settings"
        return "known: " + ", ".join(f"{k} ({s.describe()})" for k, s in self.settings.items())


class MethodRegistry:
    """Name -> :class:`MethodInfo`. Refuses a second registration of a name."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodInfo] = {}

    def register(self, info: MethodInfo) -> None:
        if info.name in self._methods:
            raise ValueError(f"{self._methods[info.name].kind} method {info.name!r} is already "
                             f"registered with skipgrad")
        self._methods[info.name] = info

    def get(self, name: str, kind: str | None = None) -> MethodInfo:
        """The method ``name``; with ``kind``, only a method of that kind (a method of the other
        kind is refused with a pointer to where it belongs)."""
        info = self._methods.get(name)
        if info is None:
            raise BackwardSpecError(f"unknown {kind or 'backward or forward'} method {name!r} "
                                    f"(known: {self.known(kind)})")
        if kind is not None and info.kind != kind:
            raise BackwardSpecError(f"{name} is a {info.kind} method (--{info.kind} {name}, "
                                    f"attack(..., {info.kind}=...)), not a {kind} method "
                                    f"(known: {self.known(kind)})")
        return info

    def known(self, kind: str | None = None) -> str:
        return ", ".join(sorted(self.names(kind))) or "none registered"

    def names(self, kind: str | None = None) -> list[str]:
        """Registered names (of one kind, or all), in registration order."""
        return [n for n, info in self._methods.items() if kind is None or info.kind == kind]

    def __contains__(self, name: object) -> bool:
        return name in self._methods


METHODS = MethodRegistry()


def register_method(name: str, factory: Factory, *, summary: str,
                    settings: Mapping[str, type | None | Sequence[type | None]] | None = None,
                    kind: str = "backward") -> None:
    """Make a method available by name (``--backward NAME``, ``attack(backward=)``; with
    ``kind="forward"``: ``--forward NAME``, ``attack(forward=)``).

    Args:
        name: lower-case identifier, e.g. ``"linbp"``; a name already registered raises.
        factory: ``factory(model, **settings)`` returning a :class:`BackwardContext` (a subclass
            itself works: its ``__init__`` is the factory). Defaults of the settings are read from
            its signature; a setting without a default must be given every time.
        summary: one line for listings (``skipgrad inspect``).
        settings: the keyword settings accepted and their types: ``float``, ``int``, ``str``,
            ``tuple`` (a list of floats, written ``a/b/c``), or a tuple of them, possibly adding
            ``None`` (written ``none`` on the command line), e.g. ``(str, None)``.
        kind: ``"backward"`` if the method changes only the backward pass (its context keeps
            forward values identical), ``"forward"`` if it changes forward values too (its context
            sets ``changes_forward = True``).

    Example::

        class Halve(skipgrad.BackwardContext): ...      # halves the gradient through every ReLU

        skipgrad.register_method("halve", Halve, summary="ReLU gradients x 0.5")
    """
    if not isinstance(name, str) or not _NAME.match(name) or name == "none":
        raise ValueError(f"backward method names are lower-case identifiers other than 'none', "
                         f"got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory of {name} must be callable, got {type(factory).__name__}")
    if kind not in KINDS:
        raise ValueError(f"a method's kind is one of {', '.join(KINDS)}, got {kind!r}")
    declared = {key: Setting.of(types) for key, types in (settings or {}).items()}
    METHODS.register(MethodInfo(name, factory, summary, declared, _defaults(factory, declared),
                                kind))


def _defaults(factory: Factory, declared: Mapping[str, Setting]) -> dict[str, Value]:
    parameters = inspect.signature(factory).parameters
    missing = [key for key in declared if key not in parameters]
    if missing:
        raise TypeError(f"{getattr(factory, '__name__', factory)} takes no keyword {missing[0]!r}")
    return {key: declared[key].check(p.default) for key, p in parameters.items()
            if key in declared and p.default is not inspect.Parameter.empty}


@dataclass(frozen=True)
class MethodChoice:
    """One method with its resolved settings (defaults included), in declaration order."""

    name: str
    settings: tuple[tuple[str, Value], ...] = ()

    @property
    def info(self) -> MethodInfo:
        return METHODS.get(self.name)

    @property
    def label(self) -> str:
        """``name`` plus the settings that differ from their defaults: ``linbp:branch_scale=0.5``."""
        defaults = self.info.defaults
        changed = [(k, v) for k, v in self.settings if k not in defaults or defaults[k] != v]
        return self.name + (":" + ",".join(f"{k}={_show(v)}" for k, v in changed) if changed else "")

    def build(self, model: nn.Module) -> BackwardContext:
        """The context of this method on ``model`` (raises NothingToChangeError and the like)."""
        return self.info.factory(model, **dict(self.settings))

    def to_json(self) -> dict:
        return {"method": self.name, "settings": dict(self.settings)}


def _show(value: Value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "/".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class BackwardPlan:
    """The methods of one kind for one source model, entered in order (``a+b``)."""

    methods: tuple[MethodChoice, ...]

    @property
    def label(self) -> str:
        """Canonical text, e.g. ``linbp:branch_scale=0.5+bpa``; parses back to the same plan."""
        return "+".join(m.label for m in self.methods)

    @property
    def names(self) -> list[str]:
        """Method labels, one per method (transfer rows carry these)."""
        return [m.label for m in self.methods]

    def build(self, model: nn.Module) -> list[BackwardContext]:
        """One context per method on ``model``."""
        return [choice.build(model) for choice in self.methods]

    def __add__(self, other: "BackwardPlan") -> "BackwardPlan":
        return combine([self, other])

    def __str__(self) -> str:
        return self.label


def choose(name: str, **settings: object) -> MethodChoice:
    """A :class:`MethodChoice` from Python values: ``choose("linbp", branch_scale=0.5)``."""
    info = METHODS.get(name)
    resolved = info.resolve(settings)
    return MethodChoice(name, tuple((k, resolved[k]) for k in info.settings if k in resolved))


def parse_method(text: str, kind: str = "backward") -> MethodChoice:
    """``NAME[:key=value,...]`` -> :class:`MethodChoice` of a method of ``kind``."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    info = METHODS.get(name, kind)
    given: dict[str, Value] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise BackwardSpecError(f"{name}: {item!r} is not key=value")
        info.check_keys([key])
        if key in given:
            raise BackwardSpecError(f"{name}: {key} is given twice")
        try:
            given[key] = info.settings[key].parse(raw)
        except ValueError as exc:
            raise BackwardSpecError(f"{name}:{key}: {exc}") from None
    return choose(name, **given)


def parse_backward(text: str) -> BackwardPlan | None:
    """``METHOD[:key=value,...][+METHOD...]`` -> :class:`BackwardPlan`; ``none`` -> None.
    Backward methods only (what ``--backward`` takes)."""
    return parse_plan(text, "backward")


def parse_forward(text: str) -> BackwardPlan | None:
    """Like :func:`parse_backward`, for the methods that change the forward pass (``--forward``)."""
    return parse_plan(text, "forward")


def parse_plan(text: str, kind: str) -> BackwardPlan | None:
    """``METHOD[:key=value,...][+METHOD...]`` of methods of ``kind`` -> plan; ``none`` -> None."""
    if not isinstance(text, str) or not text.strip():
        raise BackwardSpecError(f"a {kind} method is written METHOD[:key=value,...] "
                                f"(known: {METHODS.known(kind)}), got {text!r}")
    if text.strip().lower() == "none":
        return None
    parts = [p.strip() for p in _METHOD_SEPARATOR.split(text)]
    if any(p.lower() == "none" for p in parts):
        raise BackwardSpecError(f"'none' cannot be combined with other methods in {text!r}")
    return combine([BackwardPlan((parse_method(p, kind),)) for p in parts])


def combine(plans: Iterable[BackwardPlan | None]) -> BackwardPlan | None:
    """Methods of several plans, in order (repeated ``--backward`` on one source); None if none.
    A method named twice is refused (its second context would redefine the first's backward)."""
    methods = [m for plan in plans if plan is not None for m in plan.methods]
    names = [m.name for m in methods]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise BackwardSpecError(f"{METHODS.get(twice).kind} method {twice} is given twice for "
                                f"one source")
    return BackwardPlan(tuple(methods)) if methods else None


def as_plan(value: object, kind: str = "backward") -> BackwardPlan | None:
    """A plan of methods of ``kind`` from the Python API's forms: a ``METHOD[...]`` string, a
    :class:`BackwardPlan`, a :class:`MethodChoice`, or None."""
    if value is None:
        return None
    if isinstance(value, (BackwardPlan, MethodChoice)):
        plan = value if isinstance(value, BackwardPlan) else BackwardPlan((value,))
        for choice in plan.methods:
            METHODS.get(choice.name, kind)  # a method of the other kind is refused
        return plan
    if isinstance(value, str):
        return parse_plan(value, kind)
    example = "'linbp:branch_scale=0.5'" if kind == "backward" else "'iaa:beta=20'"
    raise BackwardSpecError(f"a {kind} method is a string such as {example}, "
                            f"got {type(value).__name__}")


def per_source(value: object, count: int,
               kind: str = "backward") -> tuple[BackwardPlan | None, ...]:
    """One plan (or None) per source model: a single value applies to all ``count`` sources; a
    list or tuple gives one entry per source, in order."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise BackwardSpecError(f"{kind} has {len(value)} entries for {count} source "
                                    f"models; give one for all or one per source")
        return tuple(as_plan(v, kind) for v in value)
    return (as_plan(value, kind),) * count


def describe(plans: Sequence[BackwardPlan | None]) -> str:
    """Short text of per-source plans for messages: ``linbp`` or ``linbp, none``."""
    labels = [p.label if p is not None else "none" for p in plans]
    return labels[0] if len(set(labels)) == 1 else ", ".join(labels)


def known_methods(kind: str | None = "backward") -> list[MethodInfo]:
    """The registered methods of ``kind`` (``None``: of both kinds), in registration order."""
    return [METHODS.get(name) for name in METHODS.names(kind)]


def register_builtin_methods() -> None:
    """Register the methods skipgrad ships (called once, when :mod:`skipgrad.backward` loads)."""
    from skipgrad.backward.backward_propagation_attack import bpa
    from skipgrad.backward.ghost_networks import ghost
    from skipgrad.backward.intrinsic_adversarial_attack import iaa
    from skipgrad.backward.linear_backprop import linbp
    from skipgrad.backward.pay_no_attention import pna
    from skipgrad.backward.token_gradient_regularization import tgr

    register_method("linbp", linbp, settings={"start": (int, str, None), "branch_scale": float},
                    summary="LinBP (Guo et al., NeurIPS 2020): branch ReLUs linear in the backward "
                            "pass from block start on, branch gradients norm-matched")
    register_method("bpa", bpa, settings={"start": (int, str, None), "relu_temperature": float,
                                          "pool_temperature": (float, None)},
                    summary="BPA (Wang et al., NeurIPS 2023): max-pool backward by a softmax over "
                            "each window, ReLU backward by the SiLU derivative, from start on")
    register_method("pna", pna, summary="PNA (Wei et al., AAAI 2022): attention maps constant in "
                                        "the backward pass")
    register_method("tgr", tgr, summary="TGR (Zhang et al., CVPR 2023): attention, Q/K/V and MLP "
                                        "gradients scaled, extreme tokens zeroed per image",
                    settings={"attention_scale": float, "qkv_scale": float, "mlp_scale": float,
                              "top_k": int})
    register_method("ghost", ghost, kind="forward",
                    settings={"erosion": float, "dropout": (float, None), "seed": (int, None)},
                    summary="Ghost networks (Li et al., AAAI 2020): each residual block's skip x "
                            "U[1-erosion, 1+erosion] per channel, drawn anew at every forward")
    register_method("iaa", iaa, kind="forward",
                    settings={"beta": float, "residual_scale": (float, tuple)},
                    summary="IAA (Zhu et al., ICLR 2022): ReLU -> Softplus(beta), each residual "
                            "branch x its stage's residual_scale")


def resolved_settings(choice: MethodChoice, context: BackwardContext) -> dict[str, Value]:
    """A choice's settings with each default ``None`` replaced by what the built context chose,
    when it exposes it as an attribute of the same name (LinBP's ``start`` -> ``"layer3.1"``)."""
    settings = dict(choice.settings)
    for key, value in settings.items():
        chosen = getattr(context, key, None)
        if value is None and isinstance(chosen, (int, float, str)) and not isinstance(chosen, bool):
            settings[key] = chosen
    return settings


__all__ = ["BackwardPlan", "BackwardSpecError", "KINDS", "METHODS", "MethodChoice", "MethodInfo",
           "Setting", "as_plan", "choose", "combine", "describe", "known_methods",
           "parse_backward", "parse_forward", "parse_method", "parse_plan", "per_source",
           "register_builtin_methods", "resolved_settings", "register_method"]
