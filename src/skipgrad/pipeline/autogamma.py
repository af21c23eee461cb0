"""``--sgm auto``: choose the SGM gamma by transfer to local held-out models on a calibration split.

The best gamma depends on the source's depth and on the data (on Fashion-MNIST a 20-layer ResNet is
hurt by the paper's 0.2, see docs/autogamma.md), so ``auto`` measures it: the attack, with the run's
own settings, is crafted from the source at every gamma of a grid on a small *calibration split*,
rounded to 8-bit levels as the saved files are, and scored on held-out models; the gamma with the
highest mean success is chosen (ties to the largest gamma, :func:`skipgrad.analysis.selection.best_gamma`).

Calibration split, never overlapping the attacked images:

- ``fmnist:test`` -> the first N images of ``fmnist:train`` (another split, so disjoint);
- ``fmnist:train`` or a folder -> the N images right *after* the attacked range, i.e. ids
  ``limit .. limit+N-1``, which needs ``--limit`` (without it every image is attacked);
- ``--calibrate-data SPEC`` -> its first N images; if it is the attacked data, the rule above.

Everything is deterministic: fixed image groups by id (as the runner does), the run's seed, and a
tie rule. The choice, the split and the whole curve go into run.json under ``sgm_auto``.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from skipgrad.data.datasets import ImageDataset, Sample, open_dataset
from skipgrad.analysis.selection import DEFAULT_GAMMAS, best_gamma
from skipgrad.gamma import check_gamma
from skipgrad.analysis.success import succeeded
from skipgrad.errors import UserError
from skipgrad.models.loading import zoo_specs
from skipgrad.store.records import LEGACY_GROUP_SIZE, comparable_config, read_run
from skipgrad.pipeline.job import (AttackJob, check_job, job_record, load_sources, numerics, on_device, require_sgm)
from skipgrad.pipeline.device import default_group_size, resolve_device, resolve_group_size
from skipgrad.pipeline.transfer import model_refs_of
from skipgrad.store import outdir
from skipgrad.pipeline.engine import image_groups, predict

DEFAULT_CALIBRATION_IMAGES = 200


@dataclass(frozen=True)
class CalibrationSplit:
    """Images gamma is calibrated on, and the rule that keeps them apart from the attacked ones."""

    data: ImageDataset
    samples: tuple[Sample, ...]
    rule: str

    def ids(self) -> list[int]:
        return [s.id for s in self.samples]


@dataclass(frozen=True)
class GammaCalibration:
    """The calibration curve (held-out model -> gamma -> success) and the gamma it selects."""

    gammas: tuple[float, ...]
    held_out: tuple[str, ...]
    data: str
    ids: tuple[int, ...]
    rule: str
    scores: dict[str, dict[float, float]]
    chosen: float

    def mean_curve(self) -> dict[float, float]:
        """Gamma -> mean success over the held-out models (the quantity maximised)."""
        return {g: sum(s[g] for s in self.scores.values()) / len(self.scores) for g in self.gammas}

    def to_json(self, settings: dict) -> dict:
        """The ``sgm_auto`` record of run.json; ``settings`` identifies it for reuse on resume."""
        key = lambda g: f"{g:g}"  # noqa: E731 - JSON object keys are strings
        return {"chosen_gamma": self.chosen,
                "criterion": "max mean success on held-out models; ties -> largest gamma",
                "gammas": list(self.gammas), "held_out": list(self.held_out),
                "calibration_data": self.data, "calibration_ids": list(self.ids),
                "split_rule": self.rule, "n": len(self.ids),
                "mean": {key(g): v for g, v in self.mean_curve().items()},
                "scores": {t: {key(g): v for g, v in c.items()} for t, c in self.scores.items()},
                "settings": settings}


def calibration_split(data: str, limit: int | None, n: int, calibrate_data: str | None = None,
                      channels: int | None = None) -> CalibrationSplit:
    """The N calibration images for attacked data ``data`` (first ``limit`` images); see the module
    docstring for the rules."""
    if n < 1:
        raise UserError(f"--calibrate-images must be a positive integer, got {n}")
    source = calibrate_data or ("fmnist:train" if data == "fmnist:test" else data)
    if source != data:
        chosen = open_dataset(source, limit=n, channels=channels)
        return CalibrationSplit(chosen, tuple(chosen.samples), f"first {n} images of {source} "
                                f"(the attacked images come from {data})")
    if limit is None:
        raise UserError(f"--sgm auto calibrates on images after the attacked range of {data}, so "
                        f"it needs --limit (or give --calibrate-data)")
    chosen = open_dataset(data, limit=limit + n, channels=channels)
    after = tuple(s for s in chosen.samples if s.id >= limit)
    if len(after) < n:
        raise UserError(f"{data} has only {len(after)} images after the first {limit}; --sgm auto "
                        f"needs {n} (lower --calibrate-images or --limit)")
    return CalibrationSplit(chosen, after, f"images {limit}..{limit + n - 1} of {data}, after "
                                           f"the attacked range 0..{limit - 1}")


def default_held_out(sources: Sequence[str], data: str) -> list[str]:
    """Half of the bundled zoo models other than the sources (every other one, in zoo order;
    Fashion-MNIST data only): the other half stays unseen, for an honest evaluation."""
    if not data.startswith("fmnist:"):
        raise UserError(f"--sgm auto needs --calibrate-on SPEC (held-out models) for data {data}; "
                        f"only Fashion-MNIST has a bundled default (the zoo)")
    others = [spec for spec in zoo_specs(present=True) if spec not in sources]
    held = others[::2]
    if not held:
        raise UserError("--sgm auto found no zoo model other than the source; give --calibrate-on")
    return held


def attack_at(job: AttackJob, models: Sequence[torch.nn.Module], split: CalibrationSplit,
              gamma: float, device: torch.device, group_size: int | None = None) -> torch.Tensor:
    """Adversarial images of the split at ``gamma`` (1.0 = no SGM), rounded to 8-bit levels like
    the saved PNGs, attacked in fixed groups by id as the runner does (``group_size``, default
    the device's), so that the curve is reproducible."""
    from skipgrad.attacks.loop import attack_with

    spec = dataclasses.replace(job.attack, sgm=None if gamma == 1.0 else gamma)
    out = []
    for group in image_groups(split.samples, group_size or default_group_size(device)):
        clean = on_device(split.data.load(group), job, device)
        labels = _labels(group, spec.targeted, device)
        with numerics(job, device):  # the run's own numerics: amp, channels-last
            adv = attack_with(list(models), clean, labels, spec, ids=[s.id for s in group])
        out.append(adv.detach().clamp(0, 1).mul(255).round().div(255))
    return torch.cat(out)


def _labels(samples: Sequence[Sample], targeted: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor([s.target if targeted else s.label for s in samples], device=device)


def transfer_outcomes(job: AttackJob, sources: Sequence[torch.nn.Module],
                      targets: dict[str, torch.nn.Module], split: CalibrationSplit,
                      gammas: Sequence[float], device: torch.device,
                      log: Callable[[str], None] = lambda _m: None, group_size: int | None = None,
                      ) -> dict[str, dict[float, torch.Tensor]]:
    """Per-image success (bool) of the attack at each gamma on each target: target -> gamma ->
    vector in split order (untargeted: label left; targeted: target reached; all images count)."""
    truth = torch.tensor([s.label for s in split.samples])
    goals = _labels(split.samples, True, torch.device("cpu")) if job.attack.targeted else None
    outcomes: dict[str, dict[float, torch.Tensor]] = {t: {} for t in targets}
    for gamma in gammas:
        adv = attack_at(job, sources, split, gamma, device, group_size)
        for spec, model in targets.items():
            preds = torch.cat([predict([model], chunk) for chunk in adv.split(256)])
            outcomes[spec][gamma] = succeeded(preds, truth, goals)
        rates = {spec: 100 * v[gamma].double().mean().item() for spec, v in outcomes.items()}
        log(f"    gamma {gamma:g}: " + ", ".join(f"{s} {r:.1f}%" for s, r in rates.items()))
    return outcomes


def calibrate_gamma(job: AttackJob, held_out: Sequence[tuple[str, str | None]],
                    split: CalibrationSplit, gammas: Sequence[float], device: torch.device,
                    log: Callable[[str], None] = lambda _m: None,
                    group_size: int | None = None) -> GammaCalibration:
    """Measure the held-out transfer curve on the split and pick its best gamma."""
    from skipgrad.pipeline.evaluate import load_targets

    grid = tuple(sorted({check_gamma(g) for g in gammas}))
    if not grid:
        raise UserError("--sgm auto needs a gamma grid inside (0, 1]")
    if job.attack.targeted and any(s.target is None for s in split.samples):
        raise UserError(f"--targeted --sgm auto needs target labels on the calibration images "
                        f"too, and {split.data.spec} has none (give --calibrate-data)")
    sources = load_sources(job, device)
    _require_blocks(sources, job.attack.sgm_official)
    targets = load_targets([s for s, _ in held_out], [w for _, w in held_out], device)
    outcomes = transfer_outcomes(job, sources, targets, split, grid, device, log, group_size)
    scores = {t: {g: float(v.double().mean()) for g, v in c.items()} for t, c in outcomes.items()}
    mean = {g: sum(s[g] for s in scores.values()) / len(scores) for g in grid}
    return GammaCalibration(grid, tuple(targets), split.data.spec, tuple(split.ids()), split.rule,
                            scores, best_gamma(mean))


def _require_blocks(models: Sequence[torch.nn.Module], official: bool) -> None:
    for model in models:
        require_sgm(model, official=official, flag="--sgm auto")


@dataclass(frozen=True)
class AutoGammaRequest:
    """What ``--sgm auto`` was asked to do (beyond the attack job itself)."""

    held_out: tuple[tuple[str, str | None], ...] = ()   # (spec, weights); empty -> zoo default
    images: int = DEFAULT_CALIBRATION_IMAGES
    gammas: tuple[float, ...] = DEFAULT_GAMMAS
    calibrate_data: str | None = None
    group_size: int | None = None  # the attack's (--batch-size); None: the device's default


def resolve_auto_gamma(job: AttackJob, out: Path, request: AutoGammaRequest, limit: int | None,
                       device: torch.device,
                       log: Callable[[str], None] = lambda _m: None) -> tuple[float, dict]:
    """(chosen gamma, run.json record). A record already in ``out/run.json`` with the same settings
    is reused, so resuming a run does not calibrate again (the result would be identical)."""
    held = request.held_out or tuple((s, None) for s in default_held_out(job.sources, job.data))
    split = calibration_split(job.data, limit, request.images, request.calibrate_data,
                              job.channels)
    group_size = request.group_size or default_group_size(device)
    settings = _settings(job, held, request, split, group_size)
    previous = (read_run(out) or {}).get("sgm_auto") if out.is_dir() else None
    if previous and _comparable(previous.get("settings")) == settings:
        log(f"--sgm auto: reusing gamma {previous['chosen_gamma']:g} recorded in {out}/run.json")
        return float(previous["chosen_gamma"]), previous
    log(f"--sgm auto: calibrating on {len(split.samples)} images ({split.rule}), held-out "
        f"models: {', '.join(s for s, _ in held)}")
    calibration = calibrate_gamma(job, held, split, request.gammas, device, log, group_size)
    return calibration.chosen, calibration.to_json(settings)


def _settings(job: AttackJob, held: Sequence[tuple[str, str | None]], request: AutoGammaRequest,
              split: CalibrationSplit, group_size: int) -> dict:
    # Plain JSON types only, so the comparison with a record read back from run.json is exact.
    # The calibration attacks with SGM at every gamma, so SGM's own settings are part of it.
    with_sgm = dataclasses.replace(job, attack=dataclasses.replace(job.attack, sgm=1.0))
    attack = {k: v for k, v in job_record(with_sgm).items() if k != "sgm"}
    # The group size is left out when it is the one every run had before it became --batch-size,
    # so that records made then are still reused.
    groups = {} if group_size == LEGACY_GROUP_SIZE else {"group_size": group_size}
    return json.loads(json.dumps({
        "attack": attack, "held_out": [list(h) for h in held], "gammas": list(request.gammas),
        "calibration_data": split.data.spec, "calibration_ids": split.ids(), **groups}))


def _comparable(settings: object) -> object:
    """A recorded calibration's settings as :func:`_settings` states them today (records made
    before the settings of absent parts left the identity hold them: see
    :func:`skipgrad.store.records.comparable_config`)."""
    if not isinstance(settings, dict) or not isinstance(settings.get("attack"), dict):
        return settings
    attack = comparable_config({**settings["attack"], "sgm": 1.0})
    return {**settings, "attack": {k: v for k, v in attack.items() if k != "sgm"}}


def format_calibration(record: dict) -> str:
    """One line per gamma of the calibration curve, the chosen one marked."""
    lines = [f"--sgm auto: mean transfer to {', '.join(record['held_out'])} on {record['n']} "
             f"calibration images"]
    for key, value in record["mean"].items():
        mark = "  <- chosen" if float(key) == record["chosen_gamma"] else ""
        lines.append(f"    gamma {key:>4}: {100 * value:5.1f}%{mark}")
    return "\n".join(lines)


def with_auto_gamma(job: AttackJob, out: Path, flags: Mapping[str, object],
                    log: Callable[[str], None] = lambda _m: None) -> tuple[AttackJob, dict]:
    """``--sgm auto`` for ``attack``: the job with the calibrated gamma and the run.json record.
    ``flags`` are the parsed command line (``calibrate_*``, ``device``, ``batch_size``, ``limit``).
    The calibration attacks with the run's own numerics (``--amp``, ``--channels-last``);
    ``--compile`` is refused: compiled kernels round differently from the eager ones the
    calibration would measure."""
    check_job(job)  # bad settings and a bad --out fail before the (long) calibration
    if job.compile:
        raise UserError("--sgm auto cannot calibrate a --compile run (compiled kernels round "
                        "differently); calibrate without --compile, then pass the chosen "
                        "--sgm GAMMA with --compile")
    outdir.refuse_data_overlap(out, job.data)
    device = resolve_device(str(flags.get("device") or "auto"))
    held = model_refs_of(flags.get("calibrate_on"), flags.get("calibrate_weights"), "calibrate")
    request = AutoGammaRequest(tuple((r.spec, r.weights) for r in held),
                               flags.get("calibrate_images") or DEFAULT_CALIBRATION_IMAGES,
                               flags.get("calibrate_gammas") or DEFAULT_GAMMAS,
                               flags.get("calibrate_data"),
                               resolve_group_size(out, flags.get("batch_size"), device))
    chosen, record = resolve_auto_gamma(job, out, request, flags.get("limit"), device, log)
    return dataclasses.replace(job, attack=dataclasses.replace(job.attack, sgm=chosen)), record
