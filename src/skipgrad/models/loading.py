"""Spec string -> wrapped model: the one function a reader looks for is :func:`load_model`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from skipgrad.errors import UserError
from skipgrad.models import checkpoints, hub
from skipgrad.models.defenses import DefendedModel, canonical_spec, split_spec
from skipgrad.models.specs import ModelConfig, WrappedModel, parse_spec

ZOO_PREFIX = "fmnist-"


def resolve_config(spec: str, weights: str | Path | None = None) -> ModelConfig:
    """The :class:`ModelConfig` a spec stands for, without building the network or loading weights.

    ``file:PATH`` specs (and ``weights`` given for any spec) read the checkpoint's metadata only.
    A spec with defense suffixes (``+jpeg:75``, :mod:`skipgrad.models.defenses`) resolves to its
    model's config under the full canonical spec.
    """
    base, defenses = split_spec(spec)
    if defenses:
        config = resolve_config(base, weights)
        return config.replace(spec="".join([config.spec, *(f"+{d.spec}" for d in defenses)]))
    family, name = parse_spec(spec)
    if family == "file":
        return resolve_config(_arch_of_file(name), weights=name)
    config = {"tv": hub.tv_config, "timm": hub.timm_config, "zoo": _zoo_config}[family](name)
    if weights is not None:  # a local file replaces the library's weights (and their tag)
        spec = f"tv:{config.arch}" if family == "tv" else config.spec
        config = config.replace(spec=spec, weights=str(Path(weights)))
    return config


def named_spec(spec: str, weights: str | Path | None = None) -> str:
    """The spec as tables and records name a model: a hub spec with the weights it resolves to
    (``tv:resnet50`` -> ``tv:resnet50.IMAGENET1K_V1``, ``timm:resnet50`` -> its default tag),
    defenses in canonical form; ``zoo:`` and ``file:`` specs, and any spec given a local
    ``weights`` file, keep their own name (the weights are theirs). Resolves offline."""
    base, _ = split_spec(spec)
    if weights is None and parse_spec(base)[0] in ("tv", "timm"):
        return resolve_config(spec).spec
    return canonical_spec(spec)


def load_model(spec: str, *, weights: str | Path | None = None, pretrained: bool = True,
               device: str | torch.device = "cpu") -> WrappedModel | DefendedModel:
    """Build the model a spec names, load its weights, wrap it for [0, 1] inputs, eval mode.

    Args:
        spec: ``tv:NAME``, ``timm:NAME[.TAG]``, ``zoo:fmnist-NAME`` or ``file:PATH``, optionally
            followed by defenses (``+jpeg:75+bits:5``): then a :class:`DefendedModel` is returned.
        weights: a local checkpoint (safetensors, or a ``torch.save`` state dict) to load instead of
            the library's pretrained weights.
        pretrained: False builds the architecture with random weights (for listings and tests).
        device: where the model lives; inputs must be on the same device.
    Raises:
        UserError: unknown spec, unreadable checkpoint, weights that don't fit, missing weights
            (:class:`MissingWeightsError`), a cached hub file that is unsafe, unreadable or does
            not match its hash (:class:`~skipgrad.models.hub.CachedWeightsError`).
    """
    base, defenses = split_spec(spec)
    if defenses:  # evaluation-time defenses wrap the loaded model
        model = load_model(base, weights=weights, pretrained=pretrained, device=device)
        return DefendedModel(model, defenses, resolve_config(spec, weights).spec).eval()
    config = resolve_config(spec, weights)
    if config.weights is not None:
        net, classes = _net_with_file(config, Path(config.weights))
        config = config.replace(weights_sha256=checkpoints.sha256_file(config.weights),
                                num_classes=classes or config.num_classes)
    else:
        net, config = _net_pretrained(config, pretrained)
    model = WrappedModel(net, config).eval()
    for param in model.parameters():
        param.requires_grad_(False)  # attacks differentiate w.r.t. inputs only
    return model.to(device)


def _net_with_file(config: ModelConfig, path: Path) -> tuple[nn.Module, int | None]:
    state, _ = checkpoints.read_checkpoint(path)
    classes = _classes_in(state, config)
    net = _architecture(config, num_classes=classes)
    checkpoints.load_into(net, state, path, config.spec)
    return net, classes


def _net_pretrained(config: ModelConfig, pretrained: bool) -> tuple[nn.Module, ModelConfig]:
    if not pretrained:
        return _architecture(config), config
    name = config.spec.split(":", 1)[1]
    if config.family in ("tv", "timm"):  # hub files are hashed from the very bytes that load
        net, path, sha = {"tv": hub.tv_pretrained, "timm": hub.timm_pretrained}[config.family](name)
    else:
        net, path = _zoo_build(config.arch, pretrained=True), zoo_weights_path(config.arch)
        sha = checkpoints.sha256_file(path)
    return net, config.replace(weights=str(path), weights_sha256=sha)


def _architecture(config: ModelConfig, num_classes: int | None = None) -> nn.Module:
    """The network of a config with random weights."""
    name = config.spec.split(":", 1)[1]
    if config.family == "tv":
        return hub.tv_build(name, num_classes=num_classes)
    if config.family == "timm":
        return hub.timm_build(name, num_classes=num_classes)
    return _zoo_build(config.arch, pretrained=False)


def _classes_in(state: dict[str, torch.Tensor], config: ModelConfig) -> int | None:
    """Class count of a checkpoint's classifier, so e.g. a CIFAR-10 ResNet-18 loads as 10-way."""
    if config.family == "zoo":
        return None
    head = _classifier_key(config)
    if head is not None and head in state:
        return int(state[head].shape[0])
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def _classifier_key(config: ModelConfig) -> str | None:
    # timm names its classifier in the pretrained config; torchvision has no such metadata.
    if config.family != "timm":
        return None
    from timm.models import get_pretrained_cfg

    head = get_pretrained_cfg(config.spec.split(":", 1)[1]).classifier
    return f"{head}.weight" if isinstance(head, str) else None


def _arch_of_file(path: str) -> str:
    _, meta = checkpoints.read_checkpoint(path)
    arch = checkpoints.arch_from_metadata(meta)
    if arch is None:
        raise UserError(f"file:{path} does not say which architecture it holds (no 'arch' "
                        f"metadata); give the architecture as a spec and the file with --weights")
    if arch.startswith("file:"):
        raise UserError(f"file:{path} names another file ({arch}) as its architecture")
    if ":" not in arch:  # bare zoo names written by the zoo trainer
        arch = f"zoo:{arch if arch.startswith(ZOO_PREFIX) else ZOO_PREFIX + arch}"
    return arch


# ---------------------------------------------------------------- bundled Fashion-MNIST zoo

def zoo_names(defended: bool = False) -> list[str]:
    """Architectures of the bundled zoo (without the ``fmnist-`` prefix); ``defended`` adds the
    adversarially trained members (``cnn-at``, ...)."""
    try:
        from skipgrad.models.zoo import AT_NAMES, ZOO_NAMES
    except ImportError as exc:
        raise UserError(f"the bundled Fashion-MNIST zoo is not available ({exc})") from exc

    return list(ZOO_NAMES) + (list(AT_NAMES) if defended else [])


def zoo_weights_path(arch: str) -> Path:
    """Where the bundled weights of a zoo architecture live."""
    import skipgrad.models.zoo as zoo

    return zoo.weights_path(arch)


def zoo_specs(*, defended: bool = False, present: bool = False) -> list[str]:
    """Specs (``zoo:fmnist-ARCH``) of the bundled zoo, in zoo order: the one enumeration of the zoo.
    ``defended`` adds the adversarially trained members; ``present`` keeps only the members whose
    weights are on disk."""
    return [f"zoo:{ZOO_PREFIX}{arch}" for arch in zoo_names(defended)
            if not present or zoo_weights_path(arch).is_file()]


def _zoo_arch(name: str) -> str:
    if not name.startswith(ZOO_PREFIX):
        raise UserError(f"zoo models are named zoo:{ZOO_PREFIX}ARCH, got zoo:{name}")
    arch = name[len(ZOO_PREFIX):]
    if arch not in zoo_names(defended=True):
        raise hub._unknown("zoo", f"{ZOO_PREFIX}{arch}",
                           [ZOO_PREFIX + n for n in zoo_names(defended=True)])
    return arch


def _zoo_config(name: str) -> ModelConfig:
    # Zoo networks normalise inside themselves: the config reports their mean/std, and
    # ``normalized_inside`` tells the adapter not to apply them a second time.
    arch = _zoo_arch(name)
    mean, std = _zoo_norm()
    return ModelConfig(spec=f"zoo:{ZOO_PREFIX}{arch}", family="zoo", arch=arch,
                       input_size=(1, 28, 28), mean=mean, std=std, num_classes=10,
                       normalized_inside=True)


def _zoo_norm() -> tuple[tuple[float, ...], tuple[float, ...]]:
    import skipgrad.models.zoo as zoo

    mean = getattr(zoo, "FMNIST_MEAN", None)
    std = getattr(zoo, "FMNIST_STD", None)
    if mean is None or std is None:
        return (0.0,), (1.0,)
    as_tuple = lambda v: tuple(float(x) for x in (v if hasattr(v, "__iter__") else [v]))  # noqa: E731
    return as_tuple(mean), as_tuple(std)


def _zoo_build(arch: str, *, pretrained: bool) -> nn.Module:
    import skipgrad.models.zoo as zoo

    if pretrained:
        if not zoo_weights_path(arch).is_file():
            raise UserError(f"bundled weights for zoo:{ZOO_PREFIX}{arch} are missing "
                            f"({zoo_weights_path(arch)}); train them with "
                            f"`skipgrad zoo train {arch}` or pass --weights FILE")
        return zoo.load_zoo_model(arch)
    builder = getattr(zoo, "build_zoo_model", None)
    if builder is not None:
        return builder(arch)
    return zoo.load_zoo_model(arch, pretrained=False)
