"""torchvision and timm models: configs from the libraries' own metadata, weights from local caches.

Weights are looked up in the caches first (torch hub's ``checkpoints/`` folder, the Hugging Face hub
cache); a download is attempted only when they are missing and ``SKIPGRAD_OFFLINE`` is unset, and any
failure becomes one :class:`MissingWeightsError` line that names the file and how to provide it.

A cache is shared and writable by others, so a cached file is never handed to the libraries' own
loaders (torchvision unpickles it with full pickle, which runs any code planted in it). skipgrad
reads it itself, once: the bytes are hashed and checked against the hash in the file name where it
has one (torch hub names end in ``-<first hex digits of the sha256>.pth``; Hugging Face cache blobs
are named by their full sha256), then parsed with safetensors or ``torch.load(weights_only=True)``.
A file that is present but fails any of this raises :class:`CachedWeightsError`, never "missing".
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from skipgrad.errors import MissingWeightsError, UserError
from skipgrad.models import checkpoints
from skipgrad.models.specs import ModelConfig

# torch hub's convention: "<name>-<first 8 or more hex digits of the file's sha256>.<ext>".
_HUB_HASH = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")
_FULL_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CachedWeightsError(UserError):
    """A cached weight file is present but cannot be used: unreadable, unsafe (a pickle that would
    run code), or its bytes do not match the hash its name carries."""


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


def expected_sha256(path: Path) -> str | None:
    """The sha256 (or its leading hex digits) that a cached file's name promises, if any."""
    if _FULL_SHA256.match(path.resolve().name):  # a Hugging Face blob, reached through a symlink
        return path.resolve().name
    found = _HUB_HASH.search(path.name)
    return found.group(1) if found else None


def read_cached(path: Path, spec: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256) of a cached weight file, read once: the bytes that are hashed are the
    bytes that are parsed, with the safe loaders only. Raises :class:`CachedWeightsError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CachedWeightsError(f"cached weights for {spec} at {path} cannot be read "
                                 f"({exc.strerror or exc}); {_REFETCH}") from exc
    digest = checkpoints.sha256_bytes(data)
    promised = expected_sha256(path)
    if promised is not None and not digest.startswith(promised):
        raise CachedWeightsError(
            f"cached weights for {spec} at {path} do not match the hash in their name (sha256 "
            f"{digest[:len(promised)]}..., the name says {promised}): the file is corrupt or was "
            f"replaced; {_REFETCH}")
    try:
        state = checkpoints.read_checkpoint_bytes(data, path)
    except UserError as exc:
        raise CachedWeightsError(f"cached weights for {spec} at {path} cannot be used: {exc}; "
                                 f"{_REFETCH}") from exc
    return state, digest


_REFETCH = "delete it to download it again, or pass --weights FILE"


def _download(url: str, path: Path, spec: str, where: str) -> Path:
    """``path`` if cached; else download ``url`` there (hash prefix checked by torch hub)."""
    if path.is_file():
        return path
    if not reachable(url):
        raise _missing(spec, where)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        promised = _HUB_HASH.search(path.name)
        torch.hub.download_url_to_file(url, str(path), promised.group(1) if promised else None,
                                       progress=False)
    except Exception as exc:  # noqa: BLE001 - any network or disk failure: one line, the file
        raise _missing(spec, where) from exc
    return path


def _unknown(kind: str, name: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"unknown {kind} model {name!r}{hint}")


# ---------------------------------------------------------------- torchvision

# The weights a bare ``tv:NAME`` means: the transfer literature's surrogates are torchvision's
# original ImageNet weights (``pretrained=True``, since torchvision 0.13 ``IMAGENET1K_V1``): the SGM
# release loads them through ``pretrainedmodels``, LinBP's as the original ``resnet50-19c8e357.pth``. torchvision's DEFAULT
# is a newer recipe where one exists (IMAGENET1K_V2 for ResNet-50/101/152, ...), a different
# surrogate that transfers differently: TransferAttack loads DEFAULT, and its tracker has users whose
# numbers moved by exactly this (issues #45, #60). DEFAULT stays one tag away
# (``tv:resnet50.DEFAULT`` or ``tv:resnet50.IMAGENET1K_V2``).
LITERATURE_TAG = "IMAGENET1K_V1"


def tv_weights(name: str):
    """(architecture, weights enum member) for ``resnet152`` or ``resnet152.TAG``.

    A bare name means :data:`LITERATURE_TAG` (the original weights the transfer papers attack
    from) where torchvision has it, else torchvision's DEFAULT (e.g. ``vit_h_14``, SWAG only); a
    tag is any member of the architecture's weights enum, ``DEFAULT`` included.
    """
    import torchvision.models as tvm

    arch, _, tag = name.partition(".")
    known = tvm.list_models(module=tvm)
    if arch not in known:
        raise _unknown("torchvision", arch, known)
    enum = tvm.get_model_weights(arch)
    if not tag:
        return arch, enum.__members__.get(LITERATURE_TAG, enum.DEFAULT)
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


def tv_build(name: str, *, num_classes: int | None = None) -> nn.Module:
    """Construct a torchvision architecture with random weights."""
    import torchvision.models as tvm

    arch, _ = tv_weights(name)
    kwargs = {"num_classes": num_classes} if num_classes else {}
    if arch in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)  # skip slow scipy init, unused head
    return tvm.get_model(arch, weights=None, **kwargs)


def tv_pretrained(name: str) -> tuple[nn.Module, Path, str]:
    """(model, weight file, its sha256) of a torchvision spec; the file must be cached or
    downloadable, and is read by :func:`read_cached`, never by torchvision."""
    import torchvision.models as tvm

    arch, weights = tv_weights(name)
    spec, cached = f"tv:{name}", tv_cache_path(name)
    state, digest = read_cached(_download(weights.url, cached, spec, str(cached)), spec)
    with _serving(weights, state):  # torchvision's own builder: its per-model settings and fixes
        return tvm.get_model(arch, weights=weights, progress=False), cached, digest


@contextlib.contextmanager
def _serving(weights, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """For one build, make the weights enum member hand torchvision the state dict read safely.

    torchvision's builders fetch their weights with ``weights.get_state_dict(...)``, which would
    unpickle the cached file with full pickle; an instance attribute shadows that method until the
    build returns. Should a torchvision version stop asking, the build is refused as a bug."""
    asked: list[bool] = []

    def serve(*_args: object, **_kwargs: object) -> dict[str, torch.Tensor]:
        asked.append(True)
        return dict(state)

    weights.get_state_dict = serve
    try:
        yield
    finally:
        del weights.get_state_dict
    if not asked:
        raise RuntimeError(f"torchvision built {weights} without asking for its state dict; "
                           f"skipgrad cannot vouch for how it loaded the weights")


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


def timm_build(name: str, *, num_classes: int | None = None) -> nn.Module:
    """Construct a timm architecture with random weights."""
    import timm

    kwargs = {"num_classes": num_classes} if num_classes else {}
    return timm.create_model(name, pretrained=False, **kwargs)


def timm_pretrained(name: str) -> tuple[nn.Module, Path, str]:
    """(model, weight file, its sha256) of a timm spec. The file (cached, or downloaded into the
    cache first) is read by :func:`read_cached`; timm gets the state dict, never the file, and
    applies its own key filters to it."""
    import timm

    spec = f"timm:{name}"
    path = timm_cache_path(name) or _timm_download(name, spec)
    state, digest = read_cached(path, spec)
    # source "" is timm's default branch, where a given state dict takes precedence over any hub
    model = timm.create_model(name, pretrained=True,
                              pretrained_cfg_overlay={"state_dict": state, "source": ""})
    return model, path, digest


def _timm_download(name: str, spec: str) -> Path:
    """Fetch a timm spec's weight file into its cache (Hugging Face hub, else the torch hub URL)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if not cfg.hf_hub_id:
        url = cfg.url or ""
        return _download(url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url),
                          spec, timm_where(name))
    if not reachable("https://huggingface.co"):
        raise _missing(spec, timm_where(name))
    from huggingface_hub import hf_hub_download

    for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                                        "pytorch_model.bin"]:
        with contextlib.suppress(Exception):  # the next name, then "missing" naming the cache
            return Path(hf_hub_download(cfg.hf_hub_id, filename))
    raise _missing(spec, timm_where(name))
