"""Reading local weight files safely: safetensors, or ``torch.load(weights_only=True)``; nothing else.

Pickled checkpoints can run code when loaded, so arbitrary pickles are never unpickled: PyTorch's
``weights_only`` unpickler accepts tensors, containers and numbers and refuses every other global
before calling it. A file that needs more is refused with instructions to convert it. For a legacy
file you trust, setting the environment variable named by ``TRUST_PICKLE_ENV`` to ``1`` loads it
with full pickle (which runs whatever code it contains), with a warning on stderr.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from skipgrad.errors import UserError

# Checkpoints written by training scripts nest the weights under one of these keys.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Keys that may name the architecture inside a checkpoint (safetensors metadata or a dict).
ARCH_KEYS = ("skipgrad.spec", "spec", "arch", "architecture")
# The opt-in for full pickle is an environment variable with a name nobody sets by accident.
TRUST_PICKLE_ENV = "SKIPGRAD_TRUST_PICKLE_I_KNOW_THIS_RUNS_CODE"
_CONVERT_HINT = ("load it yourself in a trusted environment and save its state dict with "
                 "safetensors (safetensors.torch.save_file(model.state_dict(), 'w.safetensors')) "
                 "or torch.save(model.state_dict(), ...)")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints don't fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes already in memory."""
    return hashlib.sha256(data).hexdigest()


def read_checkpoint_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The state dict held by a weight file's ``data``, with the same safe loaders and refusals as
    :func:`read_checkpoint` (``path`` gives the format by its suffix and names the file)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            return load(data)
        return _read_torch(path, io.BytesIO(data))[0]
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign files: name the file, not the parser's internals
        raise UserError(f"cannot read weights file {path}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


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
        raise UserError(f"cannot read weights file {path}: {_first_line(exc)}") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        meta = dict(handle.metadata() or {})
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    return state, meta


def _read_torch(path: Path, source: io.BytesIO | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    obj = _unpickle(path, source)
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


def _unpickle(path: Path, source: io.BytesIO | None = None) -> object:
    """torch.load (of ``source``, else of ``path``) with the weights-only unpickler; arbitrary
    objects are refused, not built."""
    source = source if source is not None else str(path)
    if os.environ.get(TRUST_PICKLE_ENV) == "1":
        print(f"skipgrad: WARNING: {TRUST_PICKLE_ENV}=1: loading {path} with full pickle, which "
              f"runs any code the file contains", file=sys.stderr)
        return torch.load(source, map_location="cpu", weights_only=False)
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol is noise here
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"cannot read weights file {path}: refused: it is a pickle that needs "
                        f"arbitrary objects ({_blocked(exc)}), and unpickling those can run "
                        f"any code; {_CONVERT_HINT}") from exc


def _blocked(exc: BaseException) -> str:
    # torch's message names the refused global on a line mentioning "GLOBAL posix.system ...".
    for line in str(exc).splitlines():
        if "GLOBAL" in line:
            return line.strip().rstrip(".")[:160]
    return "not only tensors and containers"


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
    """Load ``state`` into ``net`` strictly, forgiving the usual wrapper prefixes.

    Refusals are one line naming the first mismatched tensor (in the model's own key order):
    missing, unexpected, of another shape, not floating point where weights are, or holding NaN.
    """
    state = _strip_prefixes(state, set(net.state_dict()))
    problem = first_mismatch(net.state_dict(), state)
    if problem:
        raise UserError(f"weights {path} do not fit {spec}: {problem}")
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


def first_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """A description of the first tensor of ``state`` that does not fit ``expected``, or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        return (f"tensor {missing[0]!r} is missing ({len(missing)} missing, "
                f"{len(unexpected)} unexpected in all)")
    if unexpected:
        return f"tensor {unexpected[0]!r} is not in the model ({len(unexpected)} unexpected in all)"
    for key, want in expected.items():
        have = state[key]
        if tuple(have.shape) != tuple(want.shape):
            return (f"tensor {key!r} has shape {tuple(have.shape)} in the file but the model "
                    f"expects {tuple(want.shape)}")
        if want.is_floating_point() and not have.is_floating_point():
            return f"tensor {key!r} is {have.dtype} in the file but the model expects {want.dtype}"
        if have.is_floating_point() and torch.isnan(have).any():
            return f"tensor {key!r} contains NaN values (a broken or diverged checkpoint)"
    return None
