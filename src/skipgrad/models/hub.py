"""torchvision and timm models: configs from the libraries' own metadata, weights from local caches.

Weights are looked up in the caches first (torch hub's ``checkpoints/`` folder, the Hugging Face hub
cache); a download is attempted only when they are missing and ``SKIPGRAD_OFFLINE`` is unset, and any
failure becomes one :class:`MissingWeightsError` line that names the file and how to provide it.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from torch import nn

from skipgrad.errors import MissingWeightsError, UserError
from skipgrad.models.specs import ModelConfig


def offline() -> bool:
    """True when downloads must not even be attempted."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("SKIPGRAD_OFFLINE", "HF_HUB_OFFLINE"))


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the host of ``url``? Checked before any download so that an
    offline machine fails in a moment instead of after the hub client's retry back-off."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(url).hostname
    if offline() or not host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _missing(spec: str, where: str) -> MissingWeightsError:
    return MissingWeightsError(f"weights for {spec} are not in the local cache ({where}); "
                               f"run once with network access or pass --weights FILE")


def _unknown(kind: str, name: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"unknown {kind} model {name!r}{hint}")


# ---------------------------------------------------------------- torchvision

def tv_weights(name: str):
    """(architecture, weights enum member) for ``resnet152`` or ``resnet152.IMAGENET1K_V1``."""
    import torchvision.models as tvm

    arch, _, tag = name.partition(".")
    known = tvm.list_models(module=tvm)
    if arch not in known:
        raise _unknown("torchvision", arch, known)
    enum = tvm.get_model_weights(arch)
    if not tag:
        return arch, enum.DEFAULT
    if tag not in enum.__members__:
        raise UserError(f"unknown weights {tag!r} for tv:{arch} "
                        f"(available: {', '.join(enum.__members__)})")
    return arch, enum[tag]


def tv_config(name: str) -> ModelConfig:
    """Config of a torchvision classifier from its weight metadata (no construction, no download)."""
    arch, weights = tv_weights(name)
    tf = weights.transforms()
    size = int(tf.crop_size[0])
    return ModelConfig(
        spec=f"tv:{arch}.{weights.name}", family="tv", arch=arch, input_size=(3, size, size),
        mean=tuple(float(m) for m in tf.mean), std=tuple(float(s) for s in tf.std),
        interpolation=str(tf.interpolation.value), num_classes=len(weights.meta["categories"]))


def tv_cache_path(name: str) -> Path:
    """Where torch hub keeps this spec's weight file."""
    _, weights = tv_weights(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def tv_build(name: str, *, pretrained: bool, num_classes: int | None = None) -> nn.Module:
    """Construct a torchvision model; with ``pretrained`` its weights must be cached or downloadable."""
    import torchvision.models as tvm

    arch, weights = tv_weights(name)
    if not pretrained:
        kwargs = {"num_classes": num_classes} if num_classes else {}
        if arch in ("inception_v3", "googlenet"):
            kwargs.update(aux_logits=False, init_weights=False)  # skip slow scipy init, unused head
        return tvm.get_model(arch, weights=None, **kwargs)
    cached = tv_cache_path(name)
    if not cached.is_file() and not reachable(weights.url):
        raise _missing(f"tv:{name}", str(cached))
    try:  # torchvision reads the cache first and only downloads when the file is absent
        return tvm.get_model(arch, weights=weights, progress=False)
    except Exception as exc:
        raise _missing(f"tv:{name}", str(cached)) from exc


# ---------------------------------------------------------------- timm

def timm_config(name: str) -> ModelConfig:
    """Config of a timm model (``arch`` or ``arch.tag``) from its pretrained_cfg."""
    import timm
    from timm.models import get_pretrained_cfg

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise _unknown("timm", arch, timm.list_models())
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:
        tags = [t.split(".", 1)[-1] for t in timm.list_pretrained(f"{arch}.*")]
        raise UserError(f"unknown tag in timm:{name} (available: {', '.join(tags) or 'none'})") from exc
    full = f"{arch}.{cfg.tag}" if cfg.tag else arch
    return ModelConfig(
        spec=f"timm:{full}", family="timm", arch=arch, input_size=tuple(cfg.input_size),
        mean=tuple(float(m) for m in cfg.mean), std=tuple(float(s) for s in cfg.std),
        interpolation=cfg.interpolation or "bilinear", num_classes=int(cfg.num_classes or 1000))


def timm_cache_path(name: str) -> Path | None:
    """The cached weight file of a timm spec, or None when nothing is cached."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    for candidate in _timm_candidates(cfg):
        if candidate is not None and Path(candidate).is_file():
            return Path(candidate)
    return None


def _timm_candidates(cfg) -> list[str | None]:
    found: list[str | None] = []
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                                    "pytorch_model.bin"]
        for filename in names if try_to_load_from_cache else []:
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            found.append(hit if isinstance(hit, str) else None)
    if cfg.url:
        found.append(str(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)))
    return found


def timm_where(name: str) -> str:
    """Human description of where a timm spec's weights would be cached."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg.hf_hub_id:
        from huggingface_hub.constants import HF_HUB_CACHE

        return f"{HF_HUB_CACHE}/models--{cfg.hf_hub_id.replace('/', '--')}"
    return str(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url or "?"))


def timm_build(name: str, *, pretrained: bool, num_classes: int | None = None) -> nn.Module:
    """Construct a timm model; pretrained weights come from the local cache (or a download)."""
    import timm

    kwargs = {"num_classes": num_classes} if num_classes else {}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    cached = timm_cache_path(name)
    if cached is not None:  # load the cached file directly: no hub round-trip
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    url = "https://huggingface.co" if cfg.hf_hub_id else (cfg.url or "")
    if not reachable(url):
        raise _missing(f"timm:{name}", timm_where(name))
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise _missing(f"timm:{name}", timm_where(name)) from exc
