"""Reading local weight files safely: safetensors, or ``torch.load(weights_only=True)``; nothing else.

Pickled checkpoints can run code when loaded, so arbitrary pickles are never unpickled.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from skipgrad.errors import UserError

# Checkpoints written by training scripts nest the weights under one of these keys.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Keys that may name the architecture inside a checkpoint (safetensors metadata or a dict).
ARCH_KEYS = ("skipgrad.spec", "spec", "arch", "architecture")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints don't fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (state dict, metadata) of a weights file; raises :class:`UserError` when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        return _read_torch(path)
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign files: name the file, not the parser's internals
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read weights file {path}: {first}") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        meta = dict(handle.metadata() or {})
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    return state, meta


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise UserError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    meta = {k: str(v) for k, v in obj.items() if k in ARCH_KEYS and isinstance(v, str)}
    for key in _NESTED_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"weights file {path} contains no tensors")
    return state, meta


def arch_from_metadata(meta: dict[str, str]) -> str | None:
    """The model spec a checkpoint names for itself, if any."""
    for key in ARCH_KEYS:
        if meta.get(key):
            return meta[key]
    if "config" in meta:  # a JSON blob some writers use
        try:
            return json.loads(meta["config"]).get("spec")
        except (ValueError, AttributeError):
            return None
    return None


def load_into(net: nn.Module, state: dict[str, torch.Tensor], path: str | Path, spec: str) -> None:
    """Load ``state`` into ``net`` strictly, forgiving the usual wrapper prefixes."""
    state = _strip_prefixes(state, set(net.state_dict()))
    missing, unexpected = _key_diff(net, state)
    if missing or unexpected:
        raise UserError(f"weights {path} do not fit {spec}: "
                        f"{len(missing)} missing keys (e.g. {_few(missing)}), "
                        f"{len(unexpected)} unexpected (e.g. {_few(unexpected)})")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc))
        raise UserError(f"weights {path} do not fit {spec}: {line}") from exc


def _strip_prefixes(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    # DataParallel adds "module.", our own WrappedModel adds "net."; drop whichever makes keys fit.
    for prefix in ("module.", "net.", "model."):
        if not (set(state) & wanted) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _key_diff(net: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(net.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) or "-"
