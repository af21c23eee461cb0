"""``skipgrad show DIR``: what an output folder holds, in words (settings, images, completeness,
evaluations), read from its run.json, manifest.csv and evaluations.json; nothing is computed."""
from __future__ import annotations

from pathlib import Path

from skipgrad.errors import UserError
from skipgrad.units import l2_text
from skipgrad.store.records import read_evaluations
from skipgrad.store.records import read_manifest, read_run, shown

_SETTINGS = ("sources", "attack", "sgm", "backward", "forward", "norm", "eps", "step_size", "steps", "loss",
             "targeted", "seed", "data")


def describe_folder(folder: Path) -> str:
    """The description of an attack folder or of a transfer/sweep/demo folder (its cells)."""
    folder = Path(folder)
    if (folder / "run.json").is_file():
        return _attack_folder(folder)
    cells = sorted(p.parent for p in folder.glob("attacks/*/run.json"))
    if cells:
        files = [p.name for p in sorted(folder.glob("*.*")) if p.is_file()]
        return "\n\n".join([f"{folder}: {len(cells)} attack folders under attacks/; files: "
                            f"{', '.join(files) or 'none yet'}"]
                           + [_attack_folder(c) for c in cells])
    raise UserError(f"{folder} is not a skipgrad output folder (no run.json, no "
                    f"attacks/*/run.json)")


def _attack_folder(folder: Path) -> str:
    run = read_run(folder) or {}
    config, env = run.get("config", {}), run.get("environment", {})
    done = len(read_manifest(folder))
    unit = env.get("eps_unit", "pixel levels out of 255")
    lines = [f"{folder}: attack folder",
             "  settings: " + ", ".join(f"{k} {shown(config[k])}" for k in _SETTINGS
                                        if k in config) + f" (eps and step in {unit})",
             f"  images: {done} finished; {_completeness(done, env)}"]
    if env.get("elapsed_seconds") is not None:
        lines.append(f"  time: last run {env['elapsed_seconds']:.1f} s, finished "
                     f"{env.get('finished', 'unknown')}; all runs "
                     f"{env.get('total_elapsed_seconds', env['elapsed_seconds']):.1f} s")
    lines += _evaluations(folder)
    if "sgm_auto" in run:
        lines.append(f"  --sgm auto: gamma {shown(run['sgm_auto'].get('chosen_gamma'))} calibrated "
                     f"on {', '.join(run['sgm_auto'].get('held_out', []))}")
    return "\n".join(lines)


def _completeness(done: int, env: dict) -> str:
    expected = env.get("images")
    if expected is None:
        return "the run has not finished (no image count recorded); re-run it to resume"
    if done < expected:
        return f"incomplete: {expected - done} of {expected} missing; re-run the command to resume"
    limit = env.get("limit")
    return "complete" + (f" (the first {limit} images of the data)" if limit else
                         " (every image of the data)")


def _evaluations(folder: Path) -> list[str]:
    targets = read_evaluations(folder)
    if not targets:
        return ["  evaluations: none yet (skipgrad evaluate DIR --target SPEC)"]
    return ["  evaluations:"] + [
        f"    {spec}: success {100 * r['success_rate']:.1f}% of {r['n']} "
        f"(clean accuracy {100 * r['clean_accuracy']:.1f}%"
        + ("" if r.get("mean_l2") is None else f", mean L2 {l2_text(r['mean_l2'])}")
        + f"), {r.get('evaluated', '')}"
        + ("" if r.get("verified", True) else "  [files NOT verified: --no-verify]")
        for spec, r in targets.items()]
