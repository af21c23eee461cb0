"""The Fashion-MNIST study of the forward-side methods behind docs/forward.md: Ghost networks and
IAA from every zoo source they apply to, with I-FGSM and MI, with and without SGM, each paired
with the same attack without the method on the same images, scored on the plain zoo, its
adversarially trained members and the input-transformation defenses (the targets of
scripts/backward_study.py), with McNemar's exact test and Benjamini-Hochberg correction.

    python scripts/forward_study.py --out runs/forward [--limit 500] [--replication DIR]
        [--rescore] [--write-docs]

IAA's beta and lambda were tuned by its authors on ImageNet ResNets. The study runs two IAA
settings per source: the published one carried over to the zoo (``published_iaa``) and the one a
small grid picks on a calibration split (``calibrate_iaa``: the first CALIBRATION_IMAGES images of
the Fashion-MNIST *train* split, scored on the held-out half of the zoo that ``--sgm auto`` uses,
never on the test images the study attacks). ``--replication DIR`` scores the finished folders on
the seed-1 retrained targets of scripts/fmnist_replication.py (trained into DIR where missing).

Each cell is an ordinary attack folder under OUT/SOURCE/, so re-running resumes; each source's
rows, per-image outcomes and calibration are saved in OUT/SOURCE/forward.json (``.seed1.json``
for the replication), which --collect-only puts together without running anything.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backward_study import (ATTACKS, STUDY_GAMMA, _is_defended, effect_tables,  # noqa: E402
                            study_targets)
from fmnist_replication import SEED, retrained_targets  # noqa: E402
from fmnist_study import effects_matrix, replace_section  # noqa: E402

from skipgrad.analysis.effects import backward_effects, transfer_q_values  # noqa: E402
from skipgrad.errors import UserError  # noqa: E402
from skipgrad.pipeline.job import AttackJob, RunOptions  # noqa: E402
from skipgrad.pipeline.transfer import (ModelRef, TransferPlan, cell_folder,  # noqa: E402
                                        run_transfer, score_finished)

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_IMAGES = 300
# The zoo's stages run at 28x28, 14x14 and 7x7 (ResNets) like ImageNet ResNet's layer2..layer4 on
# 224x224 inputs, and its DenseNet's three dense blocks like DenseNet-121's last three: the
# published per-stage lambdas (TransferAttack's model_related/iaa.py) carried over by position.
PUBLISHED_RESNET = "iaa:beta=20,residual_scale=0.87/0.73/0.19"
PUBLISHED = {"preact-resnet20": PUBLISHED_RESNET, "resnet20": PUBLISHED_RESNET,
             "resnet56": PUBLISHED_RESNET, "densenet": "iaa:beta=35,residual_scale=0.8/0.8/0.44",
             "vgg": "iaa:beta=20"}  # VGG: Softplus only (no residual branch to scale)
# The calibration grid: beta from very smooth to near-ReLU, lambda from none to strong scaling.
BETAS = (5, 10, 20, 40)
SCALES = ("1", "0.7", "0.4")
# (zoo source, SGM applies): every zoo source; where a method does not apply, the refusal is
# recorded (Ghost needs a declared skip: not DenseNet, VGG or the ViT; IAA needs ReLUs or
# residual branches: not the ViT). ResNet-56 last: it costs about as much as the others together.
SOURCES = (("preact-resnet20", True), ("resnet20", True), ("mobilenetv2", True),
           ("densenet", True), ("vgg", False), ("vit", True), ("resnet56", True))


def iaa_grid(source: str) -> list[str]:
    """The calibration grid of IAA settings for ``source`` (beta only where nothing is residual)."""
    scales = ("1",) if source == "vgg" else SCALES
    return [f"iaa:beta={b}" + ("" if s == "1" else f",residual_scale={s}")
            for b in BETAS for s in scales]


def calibrate_iaa(source: str, log=print) -> dict:
    """Mean I-FGSM success over the held-out zoo half for every grid setting, on the first
    CALIBRATION_IMAGES training images (rounded to 8-bit levels as saved files are), and the
    best setting (ties: the earlier grid entry)."""
    import skipgrad
    from skipgrad.analysis.success import succeeded
    from skipgrad.data.datasets import open_dataset
    from skipgrad.models.loading import load_model
    from skipgrad.pipeline.autogamma import default_held_out

    spec = f"zoo:fmnist-{source}"
    held_out = default_held_out([spec], "fmnist:test")
    data = open_dataset("fmnist:train", limit=CALIBRATION_IMAGES)
    x = data.load(data.samples)
    y = torch.tensor([s.label for s in data.samples])
    model = load_model(spec).eval()
    targets = {t: load_model(t).eval() for t in held_out}
    scores: dict[str, dict[str, float]] = {}
    for setting in [None, *iaa_grid(source)]:
        try:
            adv = skipgrad.attack(model, x, y, "ifgsm", eps=16 / 255, step_size=2 / 255, steps=10,
                                  forward=setting)
        except ValueError as exc:  # e.g. a residual_scale on a network with no residual branch
            log(f"  {source} {setting}: {exc}")
            continue
        adv = adv.detach().clamp(0, 1).mul(255).round().div(255)
        with torch.no_grad():
            scores[setting or "none"] = {t: float(succeeded(m(adv).argmax(1), y).double().mean())
                                         for t, m in targets.items()}
        mean = sum(scores[setting or "none"].values()) / len(targets)
        log(f"  {source} {setting or 'no IAA'}: mean held-out success {100 * mean:.1f}%")
    means = {k: sum(v.values()) / len(v) for k, v in scores.items() if k != "none"}
    best = max(means, key=lambda k: (means[k], -list(means).index(k)))
    return {"images": f"first {CALIBRATION_IMAGES} of fmnist:train", "held_out": held_out,
            "scores": scores, "mean": {k: sum(v.values()) / len(v) for k, v in scores.items()},
            "best": best}


def methods_of(source: str, calibration: dict | None) -> list[str]:
    """Ghost at the paper's erosion, IAA as published (where there is a published analogue) and
    IAA as calibrated (when it differs)."""
    methods = ["ghost"]
    if source in PUBLISHED:
        methods.append(PUBLISHED[source])
    if calibration and calibration["best"] not in methods:
        methods.append(calibration["best"])
    return methods


def plan_for(source: str, sgm: bool, targets: list[str], forward: str | None) -> TransferPlan:
    return TransferPlan(sources=(ModelRef(f"zoo:fmnist-{source}"),), attacks=ATTACKS,
                        gammas=(None, STUDY_GAMMA) if sgm else (None,),
                        targets=tuple(ModelRef(t) for t in targets),
                        template=AttackJob(sources=(), data="fmnist:test"),
                        title=f"{forward or 'no forward method'} from {source}",
                        forward=(forward,) if forward else ())


def score(plan: TransferPlan, root: Path, opts: RunOptions, rescore: bool) -> tuple[list, dict]:
    """Attack and score one plan, or with ``rescore`` only score its finished folders."""
    if rescore:
        return score_finished(plan, root, opts)
    result = run_transfer(plan, root, opts)
    return result.rows, result.outcomes


def run_source(source: str, sgm: bool, out: Path, limit: int, targets: list[str],
               rescore: bool) -> dict:
    """Baseline and every method of one source; the method's outcomes keyed with its label in the
    method slot, so that :func:`backward_effects` pairs them with the baseline. With ``rescore``
    the finished folders are only scored (the replication, or a newer table)."""
    opts = RunOptions(limit=limit, batch_size=250, quiet=True)
    root = out / source
    record: dict = {"source": source, "limit": limit, "targets": targets, "rows": [],
                    "outcomes": [], "skipped": [], "white_box": {}}
    calibration_path = root / "iaa_calibration.json"
    if calibration_path.is_file():
        calibration = json.loads(calibration_path.read_text())
    elif rescore or not _applies(source, "iaa", record):
        calibration = None
    else:
        print(f"calibrating IAA on {source}")
        calibration = calibrate_iaa(source)
        root.mkdir(parents=True, exist_ok=True)
        calibration_path.write_text(json.dumps(calibration, indent=1) + "\n")
    record["calibration"] = calibration
    methods = [m for m in methods_of(source, calibration) if _applies(source, m, record)]
    if not methods:
        return record  # nothing to compare: no baseline attacks either
    for forward in [None, *methods]:
        plan = plan_for(source, sgm, targets, forward)
        try:
            rows, outcomes = score(plan, root, opts, rescore)
        except UserError as exc:
            if "is not a finished attack folder" in str(exc):  # a part that never ran
                print(f"not scored {source} × {forward}: {exc}")
                continue
            if forward is None or f"--forward {forward} on " not in str(exc):
                raise
            print(f"skipped {source} × {forward}: {exc}")
            record["skipped"].append(f"{source} × {forward}: {exc}")
            continue
        record["rows"] += [r.to_json() for r in rows]
        record["outcomes"] += [[s, a, g, forward, t, [int(v) for v in success.tolist()]]
                               for (s, a, g, _, t), success in outcomes.items()]
        if forward is not None:
            record["white_box"][forward] = _white_box(plan, root)
    return record


def _applies(source: str, method: str, record: dict) -> bool:
    """Whether ``method`` applies to the zoo source (a one-image, one-step attack); a refusal is
    recorded in ``record["skipped"]`` with its message."""
    import skipgrad
    from skipgrad.models.loading import load_model

    try:
        skipgrad.attack(load_model(f"zoo:fmnist-{source}"), torch.rand(1, 1, 28, 28),
                        torch.tensor([0]), "ifgsm", steps=1, forward=method)
    except ValueError as exc:
        print(f"skipped {source} × {method}: {exc}")
        record["skipped"].append(f"{source} × {method}: {exc}")
        return False
    return True


def _white_box(plan: TransferPlan, root: Path) -> dict:
    """Per (attack, gamma): white-box success on the unmodified and on the modified source."""
    source = plan.sources[0]
    found = {}
    for _, attack, gamma, backward in plan.cells():
        run = json.loads((cell_folder(root, source, attack, gamma, backward,
                                      plan.forward_of(source)) / "run.json").read_text())
        found[attack if gamma is None else f"{attack}+sgm {gamma:g}"] = run.get("white_box")
    return found


def collect(outs: list[Path], suffix: str = "") -> tuple[list, list, list[str], dict]:
    """Rows, paired effects, refusals and per-source records of every saved source."""
    from skipgrad.pipeline.report import TransferRow

    rows, effects, skipped, records = [], [], [], {}
    for source, _ in SOURCES:
        path = next((p for p in (o / source / f"forward{suffix}.json" for o in outs)
                     if p.is_file()), None)
        if path is None:
            continue
        record = json.loads(path.read_text())
        records[source] = record
        skipped += record["skipped"]
        rows += [TransferRow.from_json(r) for r in record["rows"]]
        outcomes = {tuple(item[:-1]): torch.tensor(item[-1], dtype=torch.bool)
                    for item in record["outcomes"]}
        effects += backward_effects(outcomes)
    return rows, effects, skipped, records


def calibration_table(records: dict) -> str:
    """Mean held-out success (%) of every grid setting per source; the chosen one in bold."""
    lines = []
    for source, record in records.items():
        calibration = record.get("calibration")
        if not calibration:
            continue
        mean = calibration["mean"]
        cells = [f"**{k} {100 * v:.1f}**" if k == calibration["best"] else f"{k} {100 * v:.1f}"
                 for k, v in mean.items()]
        lines.append(f"- `{source}` (held out: {', '.join(t.removeprefix('zoo:fmnist-') for t in calibration['held_out'])}): "
                     + "; ".join(cells))
    return "\n".join(lines)


def summary_table(effects: list, q: dict, alpha: float = 0.05) -> str:
    """Per source, method and SGM setting (both attacks together): the mean and range of the
    transfer effects (points) and the significant gains / losses, on plain and defended targets."""
    groups: dict[tuple, dict[str, list]] = {}
    for e in effects:
        if e.target == e.source:
            continue
        key = (e.source.removeprefix("zoo:fmnist-"), e.method, "yes" if e.gamma else "no")
        groups.setdefault(key, {"plain": [], "defended": []})[
            "defended" if _is_defended(e.target) else "plain"].append(e)
    lines = ["| source | method | SGM | plain: mean (range), sig. +/− | "
             "defended: mean (range), sig. +/− |", "|---|---|---|---|---|"]
    for (source, method, sgm), parts in groups.items():
        cells = []
        for part in (parts["plain"], parts["defended"]):
            d = [100 * e.comparison.difference for e in part]
            up = sum(q[id(e)] < alpha and e.comparison.difference > 0 for e in part)
            down = sum(q[id(e)] < alpha and e.comparison.difference < 0 for e in part)
            cells.append(f"{sum(d) / len(d):+.1f} ({min(d):+.1f} … {max(d):+.1f}), {up}/{down}"
                         if d else "–")
        lines.append(f"| {source} | `{method}` | {sgm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def white_box_table(records: dict) -> str:
    """White-box success of each method's attack on the unmodified and the modified source."""
    lines = ["| source | method | attack | unmodified source | modified source |",
             "|---|---|---|---:|---:|"]
    for source, record in records.items():
        for method, cells in record.get("white_box", {}).items():
            for cell, rates in cells.items():
                # (records written before the labels matched the effect tables: "mi sgm=0.5")
                cell = cell.replace(" sgm=None", "").replace(" sgm=", "+sgm ")
                if rates:
                    lines.append(f"| {source} | `{method}` | {cell} | "
                                 f"{100 * rates['source_success']:.1f}% | "
                                 f"{100 * rates['modified_source_success']:.1f}% |")
    return "\n".join(lines)


def tables(rows: list, effects: list, skipped: list[str], records: dict, command: str) -> str:
    return "\n".join([
        f"Generated by `{command}`.", "",
        *([f"Not run: {s}" for s in skipped] + [""] if skipped else []),
        "#### IAA calibration grid: mean I-FGSM success (%) on the held-out zoo half, "
        f"first {CALIBRATION_IMAGES} training images (chosen setting in bold; `none`: no IAA)", "",
        calibration_table(records), "",
        "#### Summary: effect on transfer (points), I-FGSM and MI together", "",
        "Mean and range over the transfer cells; significant gains / losses after "
        "Benjamini-Hochberg over all transfer cells of the study (McNemar, q < 0.05).", "",
        summary_table(effects, transfer_q_values(effects)), "",
        *effect_tables(rows, effects, row=lambda e: (f"`{e.method}`", e.variant),
                       white_box="white-box on the unmodified source (source = target)",
                       title="Fashion-MNIST transfer success with forward methods",
                       before_details=(
                           "#### White-box success on the unmodified and on the modified source "
                           "(run.json)", "", white_box_table(records), ""))])


def replication_tables(effects: list, command: str) -> str:
    return "\n".join([
        f"Generated by `{command}`: the study's attack folders scored on the seed-1 retrained "
        "targets (`-seed1`: the zoo recipe with seed 1, never seen by the calibration).", "",
        "Bold with `*`: significant after Benjamini-Hochberg correction over all cells of this "
        "table (McNemar exact test, q < 0.05).", "",
        effects_matrix(effects, columns=("method", "attack"),
                       row=lambda e: (f"`{e.method}`", e.variant))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/forward"))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--only", default=None, help="comma-separated zoo sources")
    parser.add_argument("--replication", type=Path, default=None,
                        help="score the finished folders on the seed-1 models in this folder")
    parser.add_argument("--rescore", action="store_true",
                        help="score the finished folders again (e.g. for a newer table), attack "
                             "nothing")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--write-docs", action="store_true",
                        help="also rewrite the generated tables of docs/forward.md")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    suffix = f".seed{SEED}" if args.replication else ""
    if not args.collect_only:
        targets = retrained_targets(args.replication) if args.replication else study_targets()
        for source, sgm in SOURCES:
            path = args.out / source / f"forward{suffix}.json"
            if (only and source not in only) or (path.is_file() and not args.rescore):
                continue
            record = run_source(source, sgm, args.out, args.limit, targets,
                                args.replication is not None or args.rescore)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record) + "\n")
    rows, effects, skipped, records = collect([args.out], suffix)
    (args.out / f"forward_study{suffix}.json").write_text(json.dumps(
        {"limit": args.limit, "gamma": STUDY_GAMMA, "skipped": skipped,
         "rows": [r.to_json() for r in rows], "effects": [e.to_json() for e in effects]},
        indent=1))
    print(effects_matrix(effects, columns=("method", "attack"),
                         row=lambda e: (e.method, e.variant)))
    if args.write_docs:
        command = f"python scripts/forward_study.py --limit {args.limit}" + (
            f" --replication {args.replication}" if args.replication else "")
        page = ROOT / "docs" / "forward.md"
        if args.replication:
            replace_section("forward replication tables", replication_tables(effects, command), page)
        else:
            replace_section("forward study tables",
                            tables(rows, effects, skipped, records, command), page)


if __name__ == "__main__":
    main()
