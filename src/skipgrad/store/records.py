"""The records of a run folder: ``run.json`` (what was run: the identity that must match to resume,
and the environment) and ``manifest.csv`` (one row per finished image), read and written atomically.

A sharded run (torchrun) writes one manifest part per rank (``.manifest-rank<R>.csv``) that rank 0
folds into manifest.csv; a killed run may leave temporary files of atomic writes, which never
carry a final name and are removed before the folder is used again.
"""
from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from skipgrad.errors import InputError, UserError
from skipgrad.store import outdir
from skipgrad.store.atomic import atomic_write_text

if TYPE_CHECKING:
    from skipgrad.data.datasets import Sample


RUN_FORMAT = 1


# sha256: of the PNG as written, checked by evaluate (skipgrad.store.verify); empty in older folders.
MANIFEST_COLUMNS = ("id", "file", "label", "target_label", "source_pred", "sha256")
# With --forward: the prediction of the source as the forward methods modify it (source_pred is
# always the unmodified source's); a column only folders with a forward method have.
FORWARD_PRED_COLUMN = "source_pred_forward"
# The perturbation of each saved PNG against its clean image, in [0, 1] pixel units (levels / 255,
# skipgrad.store.verify.perturbation_norms): L2 over every channel and pixel, and L-inf. Folders
# made before these columns have none; their rows are rewritten without them.
NORM_COLUMNS = ("l2", "linf")


# Folders made before the group size followed --batch-size were attacked in groups of 16; their
# run.json says so, and resuming them without --batch-size keeps it.
LEGACY_GROUP_SIZE = 16


# Leftovers of atomic writes killed before their rename (data.images.atomic_write_bytes).
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def recorded_group_size(run: dict) -> int:
    config = run.get("config") or {}
    return int(config.get("group_size", LEGACY_GROUP_SIZE))


def has_finished_images(out: Path) -> bool:
    return bool(read_manifest(out)) or any(out.glob(".manifest-rank*.csv"))


def read_run(out: Path) -> dict | None:
    """The run.json of a folder, or None when there is none."""
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); it is not a skipgrad run folder") from exc


def claim_folder(out: Path, identity: dict, env: dict, notes: dict | None = None) -> None:
    """Write run.json, or check that the folder holds this same run. A folder whose run has
    finished images is refused to any other config; one with none yet is simply taken over.
    ``notes`` are further top-level records written with the claim (e.g. ``sgm_auto``)."""
    existing = read_run(out)
    if existing is None and ((out / "images").exists() or (out / "manifest.csv").exists()):
        raise UserError(f"output folder {out} holds images or a manifest but no run.json; "
                        f"use another --out")
    if existing is not None and comparable_config(existing.get("config") or {}) != identity \
            and read_manifest(out):
        raise UserError(f"output folder {out} holds another run ({_differences(existing, identity)}); "
                        f"use another --out or remove it")
    if existing is not None:  # what the folder already holds stays true in run.json
        env = _carried_over(existing.get("environment") or {}, env, bool(read_manifest(out)))
    record = {"format": RUN_FORMAT, "config": identity, "environment": env, **(notes or {})}
    atomic_write_text(out / "run.json", json.dumps(record, indent=2) + "\n")


def _carried_over(old: dict, env: dict, has_images: bool) -> dict:
    """The new environment, keeping from the old one what still describes the folder: the total
    time spent on it and, when it holds images made with a larger ``--limit`` (None = all), that
    limit rather than the smaller one of a resumption that has nothing to add."""
    env = dict(env)
    if "total_elapsed_seconds" in old:
        env["total_elapsed_seconds"] = old["total_elapsed_seconds"]
    if has_images and "limit" in old and env.get("limit") is not None and (
            old["limit"] is None or old["limit"] > env["limit"]):
        env["limit"] = old["limit"]
    return env


def comparable_config(config: dict) -> dict:
    """A recorded run config as today's identity states it: without the settings of parts its
    attack does not have (:data:`skipgrad.attacks.config.PART_SETTINGS`). Folders made before
    those settings left the identity record ``decay``, ``di_prob``, ... for every attack; they
    changed nothing there, so such a folder resumes (and compares) as the run it is."""
    from skipgrad.attacks.config import AttackSpec  # loads torch: only when a run is compared

    if "attack" not in config:
        return config
    try:
        unused = AttackSpec.parse(config["attack"], sgm=config.get("sgm")).unused_settings()
    except (InputError, TypeError, ValueError):  # not a record we can read: compared as it is
        return config
    return {k: v for k, v in config.items() if k not in unused}


def _differences(existing: dict, identity: dict) -> str:
    old = comparable_config(existing.get("config") or {})
    keys = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    return "; ".join(f"{k}: {shown(old.get(k))} there vs {shown(identity.get(k))} now"
                     for k in keys[:4])


def shown(value: object) -> str:
    """A setting as a user reads it: ``none`` / ``true`` rather than Python's None / True, and
    the backward-pass methods in the ``--backward`` grammar (``linbp:start=layer3.1,...``) rather
    than the dicts run.json records them as; every command that prints settings uses this."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if _is_method(value):
        settings = ",".join(f"{k}={shown(v)}" for k, v in value["settings"].items())
        return value["method"] + (f":{settings}" if settings else "")
    if _per_source_methods(value):  # run.json's "backward": one list of methods per source
        labels = ["+".join(map(shown, methods)) or "none" for methods in value]
        return labels[0] if len(labels) == 1 else "[" + ", ".join(labels) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _is_method(value: object) -> bool:
    """A backward-pass method as run.json records it: method, resolved settings, modules."""
    return isinstance(value, dict) and isinstance(value.get("method"), str) and \
        isinstance(value.get("settings"), dict)


def _per_source_methods(value: object) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(methods, list) and all(map(_is_method, methods)) for methods in value) and \
        any(value)


def read_manifest(out: Path) -> list[dict[str, str]]:
    """Manifest rows whose image file still exists (a row without its file is redone)."""
    return [row for row in _read_rows(out / "manifest.csv") if (out / row["file"]).is_file()]


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_manifest(out: Path, rows: Sequence[dict[str, object]]) -> None:
    """Rewrite the manifest atomically, rows ordered by id."""
    write_rows(out / "manifest.csv", rows)


def write_rows(path: Path, rows: Sequence[dict[str, object]]) -> None:
    buffer = io.StringIO()
    columns = MANIFEST_COLUMNS + tuple(
        c for c in (*NORM_COLUMNS, FORWARD_PRED_COLUMN) if any(c in r for r in rows))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: int(r["id"])))
    atomic_write_text(path, buffer.getvalue())


def manifest_part(out: Path, rank: int) -> Path:
    """Where rank ``rank`` of a sharded run lists the images it finished."""
    return out / f".manifest-rank{rank}.csv"


def merge_manifest_parts(out: Path) -> None:
    """Fold the manifest parts of a sharded run (finished or interrupted) into manifest.csv, then
    delete them; the merged manifest is in place before any part disappears, so a kill in between
    loses nothing (merging again is harmless)."""
    parts = sorted(out.glob(".manifest-rank*.csv"))
    if not parts:
        return
    rows = {row["file"]: row for row in read_manifest(out)}
    for part in parts:
        rows.update((r["file"], r) for r in _read_rows(part) if (out / r["file"]).is_file())
    write_manifest(out, list(rows.values()))
    for part in parts:
        part.unlink(missing_ok=True)


def remove_stale_temp_files(out: Path) -> int:
    """Delete temporary files left by writes that were killed before their rename (``kill -9``
    skips the cleanup in :func:`atomic_write_bytes`); they never carry a final name."""
    stale = [p for p in out.rglob(".*.tmp") if p.is_file() and _TEMP_FILE.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def prepare_folder(out: Path, identity: dict, env: dict, notes: dict | None = None) -> None:
    """Make ``out`` ready for this run (rank 0 only): tidy what a killed run left, claim
    run.json (with ``notes``, see :func:`claim_folder`)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    merge_manifest_parts(out)
    claim_folder(out, identity, env, notes)


def image_file(sample: Sample) -> str:
    """Path of a sample's adversarial PNG relative to the run folder."""
    return f"images/{sample.name}.png"


def record_finish(out: Path, images: int, seconds: float,
                  white_box: dict | None = None) -> None:
    """Add to run.json what the folder holds now and how long this invocation attacked: the
    ``images`` count, ``finished`` time, ``elapsed_seconds`` of this invocation and
    ``total_elapsed_seconds`` over every invocation that worked on the folder; ``white_box``
    (with ``--forward``: the success on the unmodified and on the modified source) replaces the
    run's ``white_box`` key."""
    run = read_run(out)
    if run is None:
        return
    if white_box is not None:
        run["white_box"] = white_box
    env = run.setdefault("environment", {})
    total = float(env.get("total_elapsed_seconds") or 0) + seconds
    env.update(images=images, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               elapsed_seconds=round(seconds, 3), total_elapsed_seconds=round(total, 3))
    atomic_write_text(out / "run.json", json.dumps(run, indent=2) + "\n")


def record_interrupted(out: Path, seconds: float) -> None:
    """Add to run.json's ``total_elapsed_seconds`` the time an interrupted invocation spent on
    the image groups it finished (their files are kept, so a resumed run's total must keep their
    time too; :func:`record_finish` then adds the resumed invocation's own)."""
    run = read_run(out)
    if run is None or seconds <= 0:
        return
    env = run.setdefault("environment", {})
    env["total_elapsed_seconds"] = round(float(env.get("total_elapsed_seconds") or 0) + seconds, 3)
    atomic_write_text(out / "run.json", json.dumps(run, indent=2) + "\n")


def calibration_targets(folder: Path) -> list[str]:
    """The models an ``--sgm auto`` run of ``folder`` calibrated its gamma on (run.json knows);
    their transfer numbers on this folder are optimistic."""
    run = read_run(folder) if Path(folder).is_dir() else None
    return list(((run or {}).get("sgm_auto") or {}).get("held_out", []))


def calibration_warning(folder: Path, targets: Sequence[str]) -> str | None:
    """One warning line when a target of an evaluation was a calibration model of ``folder``."""
    used = [t for t in targets if t in set(calibration_targets(folder))]
    if not used:
        return None
    return (f"skipgrad: warning: {', '.join(used)} chose the --sgm auto gamma of {folder} "
            f"(calibration model{'s' if len(used) > 1 else ''}); success on "
            f"{'them' if len(used) > 1 else 'it'} is optimistic, report the other targets")


EVALUATIONS_FILE = "evaluations.json"


def read_evaluations(folder: Path) -> dict[str, dict]:
    """The folder's evaluations record: target spec -> its latest result (as ``evaluate --json``
    writes it, with ``image_ids``, ``evaluated`` time and ``verified``); {} when there is none or
    it is damaged (a damaged record is replaced, never trusted)."""
    path = Path(folder) / EVALUATIONS_FILE
    try:
        targets = json.loads(path.read_text(encoding="utf-8")).get("targets", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return targets if isinstance(targets, dict) else {}


def record_evaluations(folder: Path, results: dict[str, dict], *, verified: bool) -> None:
    """Merge ``results`` (target spec -> result record) into ``evaluations.json`` under the
    folder's lock, each stamped with the time and whether the files it scored were ``verified``
    against the manifest's hashes (``evaluate --no-verify`` scores unverified files, and says so
    wherever the number is shown)."""

    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with outdir.exclusive(folder):
        targets = read_evaluations(folder)
        for spec, record in results.items():
            targets[spec] = {**record, "evaluated": when, "verified": verified}
        atomic_write_text(Path(folder) / EVALUATIONS_FILE,
                          json.dumps({"targets": targets}, indent=2) + "\n")
