"""``skipgrad models``: resolve specs offline and describe them (input size, mean/std, weights)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from skipgrad.errors import UserError
from skipgrad.models import hub
from skipgrad.models.loading import zoo_weights_path
from skipgrad.models.defenses import defense_help, split_spec
from skipgrad.models.presets import (WU2020, check_builds, fmnist_defended_preset, fmnist_preset,
                                     get_preset)
from skipgrad.models.specs import ModelConfig
from skipgrad.models.loading import resolve_config


def weight_status(config: ModelConfig) -> str:
    """Where this spec's pretrained weights are, or that they are missing (never downloads)."""
    name = config.spec.split(":", 1)[1]
    if config.family == "zoo":
        path: Path | None = zoo_weights_path(config.arch)
        return "bundled" if path.is_file() else "not trained yet"
    path = hub.tv_cache_path(name) if config.family == "tv" else hub.timm_cache_path(name)
    return "cached" if path is not None and path.is_file() else "not cached"


def _roles(preset_name: str | None) -> dict[str, list[str]]:
    presets = [get_preset(preset_name)] if preset_name else _default_presets()
    roles: dict[str, list[str]] = {}
    for preset in presets:
        for spec in preset.sources:
            roles.setdefault(spec, []).append(f"{preset.name} source")
        for spec in preset.targets:
            roles.setdefault(spec, []).append(f"{preset.name} target")
    return roles


def _default_presets() -> list:
    try:
        return [fmnist_preset(), fmnist_defended_preset(), WU2020]
    except UserError:  # no zoo in this install: still list the paper's models
        return [WU2020]


def model_rows(preset: str | None = None, specs: Sequence[str] = ()) -> list[dict]:
    """One dict per spec (the given ``specs``, else every spec of the presets, or of ``preset``),
    each named as it resolves (``tv:resnet50`` -> ``tv:resnet50.IMAGENET1K_V1``); each
    architecture is constructed (without weights) to prove it resolves."""
    roles_of = ({spec: ["given"] for spec in specs} if specs and not preset else
                {**_roles(preset), **{spec: ["given"] for spec in specs}})
    rows = []
    for spec, roles in roles_of.items():
        config = resolve_config(split_spec(spec)[0])  # a defended spec builds its model
        rows.append({"spec": resolve_config(spec).spec, "roles": roles, "input_size": list(config.input_size),
                     "mean": list(config.mean), "std": list(config.std),
                     "interpolation": config.interpolation, "num_classes": config.num_classes,
                     "params": check_builds(config), "weights": weight_status(config)})
    return rows


def rows_table(rows: list[dict]) -> str:
    """Fixed-width table of :func:`model_rows`."""
    header = ["spec", "role", "input", "mean", "std", "interp", "params", "weights"]
    body = [[r["spec"], ", ".join(r["roles"]), "x".join(map(str, r["input_size"])),
             _triple(r["mean"]), _triple(r["std"]), r["interpolation"],
             f"{r['params'] / 1e6:.1f}M", r["weights"]] for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _triple(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def defenses_table() -> str:
    """The evaluation-time defenses any target spec can take: grammar, summary, then one line per
    parameter with its range (and default for the options)."""
    lines = ["Target defenses (append to any target spec; applied to the input left to right, "
             "evaluation only, refused as attack sources):"]
    for defense in defense_help():
        lines.append(f"  {defense['syntax']}")
        lines.append(f"      {defense['summary']}")
        for param in defense["parameters"]:
            default = "required" if param["required"] else f"default {param['default']}"
            lines.append(f"      {param['symbol']}: {param['description']}, {_range(param)}, {default}")
    return "\n".join(lines)


def _range(param: dict) -> str:
    kind = {"int": "integer", "float": "number"}[param["type"]]
    low = "[" if param["min_inclusive"] else "("
    lo, hi = (f"{v:g}" if param["type"] == "float" else str(v) for v in (param["min"], param["max"]))
    return f"{'odd ' if param['odd_only'] else ''}{kind} in {low}{lo}, {hi}]"
