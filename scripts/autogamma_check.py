"""Does ``--sgm auto`` transfer at least as well as the fixed default gamma to models it never saw?

Calibrates gamma on a few zoo models using Fashion-MNIST *train* images (as ``skipgrad attack
--sgm auto`` does for ``fmnist:test``), then attacks *test* images at every grid gamma and scores
the zoo models that were NOT used for calibration. Prints the calibration curve, the evaluation
curve, and the paired difference (McNemar) between the auto gamma and the default 0.5.

    OMP_NUM_THREADS=1 python scripts/autogamma_check.py --calibration-images 200 --eval-images 300
"""
from __future__ import annotations

import argparse

import torch

from skipgrad import AttackSpec
from skipgrad.pipeline.autogamma import CalibrationSplit, calibrate_gamma, transfer_outcomes
from skipgrad.data.datasets import open_dataset
from skipgrad.models.loading import zoo_specs
from skipgrad.pipeline.demo import DEMO_GAMMA
from skipgrad.pipeline.evaluate import load_targets
from skipgrad.pipeline.job import AttackJob, load_sources
from skipgrad.analysis.stats import paired_comparison, wilson_interval

GRID = tuple(round(0.1 * k, 1) for k in range(1, 11))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="zoo:fmnist-resnet20")
    p.add_argument("--attack", default="ifgsm")
    p.add_argument("--calibrate-on", nargs="+",
                   default=["zoo:fmnist-cnn", "zoo:fmnist-mobilenetv2"])
    p.add_argument("--calibration-images", type=int, default=200)
    p.add_argument("--eval-images", type=int, default=300)
    p.add_argument("--steps", type=int, default=10)
    return p.parse_args()


def curve_line(name: str, values: dict[float, float], mark: set[float]) -> str:
    cells = "  ".join(f"{100 * values[g]:5.1f}{'*' if g in mark else ' '}" for g in GRID)
    return f"{name:<24} {cells}"


def main() -> None:
    args = parse_args()
    device = torch.device("cpu")
    job = AttackJob(sources=(args.source,), data="fmnist:test", attack=AttackSpec.parse(args.attack, steps=args.steps))
    calib_data = open_dataset("fmnist:train", limit=args.calibration_images)
    calib = CalibrationSplit(calib_data, tuple(calib_data.samples), "fmnist:train head")
    cal = calibrate_gamma(job, [(s, None) for s in args.calibrate_on], calib, GRID, device)
    held_out = [t for t in zoo_specs(present=True) if t not in args.calibrate_on and t != args.source]
    eval_data = open_dataset("fmnist:test", limit=args.eval_images)
    split = CalibrationSplit(eval_data, tuple(eval_data.samples), "fmnist:test head")
    targets = load_targets(held_out, None, device)
    outcomes = transfer_outcomes(job, load_sources(job, device), targets, split, GRID, device)
    report(args, cal, outcomes)


def report(args: argparse.Namespace, cal, outcomes: dict[str, dict[float, torch.Tensor]]) -> None:
    chosen, default = cal.chosen, DEMO_GAMMA
    print(f"source {args.source}, {args.attack}, {args.steps} steps, eps 16/255")
    print(f"calibration: {len(cal.ids)} fmnist:train images on {', '.join(cal.held_out)}")
    print(f"{'gamma':<24} " + "  ".join(f"{g:5g} " for g in GRID))
    for target, scores in cal.scores.items():
        print(curve_line(f"  {target.split(':')[-1]}", scores, {chosen}))
    print(curve_line("  mean (calibration)", cal.mean_curve(), {chosen}))
    print(f"auto gamma = {chosen:g}; default = {default:g}\n")
    print(f"evaluation: {args.eval_images} fmnist:test images on models not used for calibration")
    for target, by_gamma in outcomes.items():
        rates = {g: float(v.double().mean()) for g, v in by_gamma.items()}
        print(curve_line(f"  {target.split(':')[-1]}", rates, {chosen, default}))
    pooled = {g: torch.cat([outcomes[t][g] for t in outcomes]) for g in GRID}
    print(curve_line("  mean (held-out)", {g: float(v.double().mean()) for g, v in pooled.items()},
                     {chosen, default}))
    print()
    for target, by_gamma in [*outcomes.items(), ("pooled", pooled)]:
        c = paired_comparison(by_gamma[default], by_gamma[chosen])
        lo, hi = c.ci95
        n_ok = int(by_gamma[chosen].sum())
        w_lo, w_hi = wilson_interval(n_ok, c.n)
        print(f"{target:<24} auto {100 * c.rate_b:5.1f}% [{100 * w_lo:.1f}, {100 * w_hi:.1f}]  "
              f"default {100 * c.rate_a:5.1f}%  diff {100 * c.difference:+5.1f} pts "
              f"[{100 * lo:+.1f}, {100 * hi:+.1f}] (Newcombe)  McNemar p {c.p_value:.2g}")


if __name__ == "__main__":
    main()
