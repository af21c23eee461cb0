"""``skipgrad inspect SPEC``: what every backward-pass method would change in a model, then SGM's
blocks and gradient split on a few images of the data (:mod:`skipgrad.backward.inspect` does the
analysis; this module loads the model and the images and decides what can be inspected)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from skipgrad.backward.inspect import (format_method_changes, format_report, inspect_model,
                                       method_changes, report_json)
from skipgrad.backward.registry import parse_plan
from skipgrad.data.datasets import open_dataset
from skipgrad.errors import MissingWeightsError, UserError, first_line
from skipgrad.models import WrappedModel, load_model
from skipgrad.pipeline.device import resolve_device
from skipgrad.pipeline.job import sgm_problem


@dataclass(frozen=True)
class Inspection:
    """What ``inspect`` found: the text to print, the JSON record, and why the weights are random
    (None when they are the real ones)."""

    text: str
    record: dict
    random_weights_reason: str | None


def inspect_spec(spec: str, *, weights: str | None = None, backward: list[str | None] | None = None,
                 data: str = "fmnist:test", limit: int = 8, channels: int | None = None,
                 gamma: float = 0.2, device: str = "auto",
                 forward: list[str | None] | None = None) -> Inspection:
    """Inspect model ``spec``: the modules each backward-pass method (all registered ones, or
    those of ``backward``) and each forward method (all, or those of ``forward``) would change,
    then SGM's blocks and gradient split at ``gamma`` on the first ``limit`` images of ``data``.
    Asking for one kind by name lists only that kind. A method asked for by name that does not
    apply, or a model that nothing applies to, is a one-line UserError."""
    model, missing = _load(spec, weights, resolve_device(device))
    spec = model.config.spec
    asked = {"backward": backward, "forward": forward}
    listed = {kind: method_changes(model, _choices(values, kind), kind)
              for kind, values in asked.items()
              if values or not any(asked.values())}  # none asked: every method of both kinds
    problem = sgm_problem(model)
    _check_inspectable(spec, listed, problem is None, asked)
    parts = ["\n\n".join(format_method_changes(found, spec, kind)
                         for kind, found in listed.items())]
    record = {"spec": spec, "random_weights": missing is not None, "data": data,
              **{kind: [m.to_json() for m in found] for kind, found in listed.items()}}
    if problem is None:
        images, labels = _batch(model, data, limit, channels)
        # Name the spec in the report rather than the wrapper class every loaded model shares.
        report = dataclasses.replace(inspect_model(model, gamma, images, labels), model=spec)
        parts.append("\n" + format_report(report))
        record.update(images=len(labels), **report_json(report))
    else:
        parts.append(f"\nSGM: {problem}")
    return Inspection("\n".join(parts), record, missing)


def _choices(values: list[str | None] | None, kind: str):
    """The methods ``--backward`` or ``--forward`` (``kind``) asks to list (None: every
    registered method of that kind)."""
    if not values:
        return None
    return [choice for v in values if v for choice in parse_plan(v, kind).methods]


def _check_inspectable(spec: str, listed: dict[str, list], has_blocks: bool,
                       asked: dict[str, list | None]) -> None:
    """Refuse, in one line, a method asked for by name that does not apply, or a model that no
    method and not SGM applies to."""
    for kind, methods in listed.items():
        refused = [m for m in methods if not m.applies]
        if asked[kind] and refused:
            raise UserError(f"--{kind} {refused[0].label} on {spec}: {refused[0].reason}")
    if not has_blocks and not any(m.applies for found in listed.values() for m in found):
        raise UserError(f"{spec} has no residual or dense block SGM can decay (e.g. VGG, "
                        f"Inception-v3) and no backward-pass method applies to it; there is "
                        f"nothing to inspect")


def _load(spec: str, weights: str | None, device: torch.device) -> tuple[WrappedModel, str | None]:
    """(model, why its weights are random or None): missing hub weights fall back to random ones,
    because which blocks exist and which are decayed does not depend on the weights."""
    try:
        return load_model(spec, weights=weights, device=device), None
    except MissingWeightsError as exc:
        return load_model(spec, weights=weights, pretrained=False, device=device), first_line(exc)


def _batch(model: WrappedModel, data: str, limit: int, channels: int | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of ``data`` and their labels; labels outside the model's
    classes (Fashion-MNIST into a 10-class model is fine, ImageNet labels into it are not) are
    replaced by the model's own predictions so the loss stays defined."""
    dataset = open_dataset(data, limit=limit, channels=channels)
    device = next(model.parameters()).device
    images = dataset.load(dataset.samples).to(device)
    labels = torch.tensor([s.label for s in dataset.samples], device=device)
    if int(labels.max()) >= model.config.num_classes or int(labels.min()) < 0:
        with torch.no_grad():
            labels = model(images).argmax(dim=1)
    return images, labels
