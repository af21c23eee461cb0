"""The companion transformations at equal compute, behind docs/protocol.md: MI, MI+DI, MI+SI, VMI,
MI+Admix, MI+SIA and MI+BSR, each with and without SGM, from PreAct ResNet-20, compared (1) at the
usual 10 iterations, where they cost 1 to 21 gradient evaluations per step, and (2) at one common
budget of about BUDGET gradient evaluations per image (iterations = budget / cost per step).

    python scripts/companion_study.py --out runs/companions [--limit 150] [--reference-limit 100]
        [--replication DIR] [--rescore]

L-inf eps 16 levels, step eps/T, MI decay 1.0, each part at its published defaults (docs/
protocol.md), SGM at gamma 0.5. Scored on the eight plain zoo models (the source's row is its
white-box rate). Paired per image (McNemar's exact test): each companion against MI at the same
budget and SGM setting, and SGM against no SGM for each companion. Each (budget, attack) cell is
an ordinary attack folder under OUT/<budget>/, so re-running resumes; OUT/<budget>.json holds the
rows and per-image outcomes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_replication import SEED, retrained_targets  # noqa: E402
from forward_study import score  # noqa: E402

from skipgrad.analysis.effects import backward_effects, sgm_effects  # noqa: E402
from skipgrad.attacks.config import AttackSpec  # noqa: E402
from skipgrad.models.loading import zoo_specs  # noqa: E402
from skipgrad.pipeline.job import AttackJob, RunOptions  # noqa: E402
from skipgrad.pipeline.transfer import ModelRef, TransferPlan  # noqa: E402

SOURCE = "zoo:fmnist-preact-resnet20"
GAMMA = 0.5
EPS = 16
ATTACKS = ("mi", "mi+di", "mi+si", "vmi", "mi+admix", "mi+sia", "mi+bsr")
BUDGET = 100
REFERENCE_STEPS = 10


def steps_for(attack: str, budget: int | None) -> int:
    """Iterations of ``attack`` at ``budget`` gradient evaluations per image (the nearest whole
    number, at least 1); ``None``: the usual 10."""
    if budget is None:
        return REFERENCE_STEPS
    per_step = AttackSpec().with_method(attack).gradient_evaluations_per_step
    return max(1, round(budget / per_step))


def spec_for(attack: str, budget: int | None) -> AttackSpec:
    steps = steps_for(attack, budget)
    return AttackSpec(eps=EPS / 255, step_size=EPS / steps / 255, steps=steps).with_method(attack)


def plan_for(attack: str, budget: int | None, targets: list[str]) -> TransferPlan:
    spec = spec_for(attack, budget)
    return TransferPlan(sources=(ModelRef(SOURCE),), attacks=(attack,), gammas=(None, GAMMA),
                        targets=tuple(ModelRef(t) for t in targets),
                        template=AttackJob(sources=(), data="fmnist:test", attack=spec),
                        title=f"{attack}, {spec.steps} iterations, "
                              f"{spec.gradient_evaluations} gradient evaluations")


def folder_name(budget: int | None) -> str:
    return "ten-iterations" if budget is None else f"budget{budget}"


def run_budget(budget: int | None, out: Path, limit: int, targets: list[str], rescore: bool
               ) -> dict:
    """Every attack of one budget, with and without SGM."""
    opts = RunOptions(limit=limit, batch_size=250, quiet=True)
    rows, outcomes, cost = [], {}, {}
    for attack in ATTACKS:
        # One root per attack: cell folders are named by attack and gamma only, and the
        # iteration count differs between attacks at an equal budget.
        root = out / folder_name(budget) / attack.replace("+", "-")
        plan = plan_for(attack, budget, targets)
        found, scored = score(plan, root, opts, rescore)
        rows += found
        outcomes.update(scored)
        spec = plan.template.attack
        cost[attack] = {"steps": spec.steps, "per_step": spec.gradient_evaluations_per_step,
                        "gradient_evaluations": spec.gradient_evaluations}
    return {"budget": budget, "limit": limit, "targets": targets, "cost": cost,
            "rows": [r.to_json() for r in rows],
            "outcomes": [[*key, [int(v) for v in success.tolist()]]
                         for key, success in outcomes.items()]}


def effects_of(record: dict) -> tuple[list, list]:
    """(companion vs MI at the same SGM setting, SGM vs none for each attack)."""
    outcomes = {tuple(item[:-1]): torch.tensor(item[-1], dtype=torch.bool)
                for item in record["outcomes"]}
    # Re-key each companion as a "method" on MI, so that backward_effects pairs it with MI.
    as_methods = {(s, "mi", g, None if a == "mi" else a, t): v
                  for (s, a, g, _, t), v in outcomes.items()}
    return backward_effects(as_methods), sgm_effects(outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/companions"))
    parser.add_argument("--limit", type=int, default=150, help="images at the equal budget")
    parser.add_argument("--reference-limit", type=int, default=100,
                        help="images at the usual 10 iterations")
    parser.add_argument("--replication", type=Path, default=None)
    parser.add_argument("--rescore", action="store_true")
    args = parser.parse_args()
    targets = retrained_targets(args.replication) if args.replication else zoo_specs(present=True)
    suffix = f".seed{SEED}" if args.replication else ""
    for budget, limit in ((BUDGET, args.limit), (None, args.reference_limit)):
        path = args.out / f"{folder_name(budget)}{suffix}.json"
        if path.is_file() and not args.rescore:
            continue
        scoring = args.rescore or args.replication is not None
        if scoring and not (args.out / f"{folder_name(budget)}.json").is_file():
            continue  # never attacked: nothing to score
        record = run_budget(budget, args.out, limit, targets, scoring)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
