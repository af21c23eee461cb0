"""The protocol study behind docs/protocol.md: does a method's transfer effect on the Fashion-MNIST
zoo depend on the iteration budget, the step rule and the radius of the attack?

    python scripts/protocol_study.py --out runs/protocol [--settings 16:eps/T:10,...]
        [--replication DIR] [--rescore] [--write-docs]

I-FGSM (no random start) from PreAct ResNet-20, ResNet-56 and VGG, plain, with SGM (gamma 0.5,
the study's), with LinBP and with BPA (each at its defaults; SGM not on VGG, which has no skip),
at eps 8 and 16 (in 8-bit levels), 10, 50, 100 and 300 iterations, each at step eps/T and at a
fixed 1 level (LinBP's protocol: 300 iterations at 1/255 on ImageNet). Scored on the eight plain
zoo models (the source's own row is its white-box rate), each method paired with the plain attack
of the same setting on the same images (McNemar's exact test, Benjamini-Hochberg over every
transfer cell of the study).

A 300-iteration cell costs 30 times a 10-iteration one, so the longest budgets run on fewer
images (IMAGES; ResNet-56, which costs twice the others together, on half as many). Each setting
is a folder OUT/eps<E>-<rule>-T<T>/ of ordinary attack folders (re-running resumes); each
(setting, source) saves its rows and per-image outcomes in OUT/.../SOURCE.json. ``--rescore``
scores finished folders again (nothing is attacked), ``--replication DIR`` on the seed-1 targets.
"""
from __future__ import annotations

import argparse
import dataclasses
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

GAMMA = 0.5
SOURCES = ("preact-resnet20", "vgg", "resnet56")  # cheapest first
RESIDUAL = {"preact-resnet20", "resnet56"}
METHODS = ("linbp", "bpa")
ITERATIONS = (10, 50, 100, 300)
IMAGES = {10: 500, 50: 200, 100: 100, 300: 50}
HALF_IMAGES = {"resnet56"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One attack protocol: radius (levels), step rule and number of iterations."""

    eps: int
    rule: str  # "eps/T" or "1"
    steps: int

    @property
    def step(self) -> float:
        """Step length in levels."""
        return self.eps / self.steps if self.rule == "eps/T" else 1.0

    @property
    def folder(self) -> str:
        return f"eps{self.eps}-{'epsT' if self.rule == 'eps/T' else 'step1'}-T{self.steps}"

    @property
    def label(self) -> str:
        return f"ε {self.eps}, T {self.steps}, step {'ε/T' if self.rule == 'eps/T' else '1'}"

    def images(self, source: str) -> int:
        n = IMAGES[self.steps]
        return n // 2 if source in HALF_IMAGES else n

    def template(self) -> AttackJob:
        spec = AttackSpec(eps=self.eps / 255, step_size=self.step / 255, steps=self.steps)
        return AttackJob(sources=(), data="fmnist:test", attack=spec)


def all_settings() -> list[Setting]:
    """Shortest budgets first (a run cut short still covers every budget up to where it stopped),
    eps 16 (the paper's) before 8 at each budget."""
    return [Setting(eps, rule, steps) for steps in ITERATIONS for eps in (16, 8)
            for rule in ("eps/T", "1")]


def parse_settings(text: str) -> list[Setting]:
    """``16:eps/T:10,8:1:300`` -> settings."""
    out = []
    for item in text.split(","):
        eps, rule, steps = item.split(":")
        out.append(Setting(int(eps), rule, int(steps)))
    return out


def plans(setting: Setting, source: str, targets: list[str]) -> list[TransferPlan]:
    """Plain and SGM (one plan), LinBP alone, BPA alone: four cells, not their product."""
    common = dict(sources=(ModelRef(f"zoo:fmnist-{source}"),), attacks=("ifgsm",),
                  targets=tuple(ModelRef(t) for t in targets), template=setting.template())
    gammas = (None, GAMMA) if source in RESIDUAL else (None,)
    return [TransferPlan(gammas=gammas, title=setting.label, **common),
            *(TransferPlan(gammas=(None,), backward=(m,), backward_baseline=False,
                           title=f"{setting.label}, {m}", **common) for m in METHODS)]


def run_cell(setting: Setting, source: str, out: Path, targets: list[str], rescore: bool
             ) -> dict:
    """Attack (or score the finished folders of) one setting and source."""
    root = out / setting.folder / source
    opts = RunOptions(limit=setting.images(source), batch_size=250, quiet=True)
    rows, outcomes = [], {}
    for plan in plans(setting, source, targets):
        found, scored = score(plan, root, opts, rescore)
        rows += found
        outcomes.update(scored)
    return {"setting": dataclasses.asdict(setting), "source": source,
            "images": setting.images(source), "targets": targets,
            "rows": [r.to_json() for r in rows],
            "outcomes": [[*key, [int(v) for v in success.tolist()]]
                         for key, success in outcomes.items()]}


def collect(out: Path, suffix: str = "") -> list[tuple[Setting, dict]]:
    """Every saved (setting, source) record, in study order."""
    found = []
    for setting in all_settings():
        for source in SOURCES:
            path = out / setting.folder / f"{source}{suffix}.json"
            if path.is_file():
                found.append((setting, json.loads(path.read_text())))
    return found


def effects_of(record: dict) -> list:
    """SGM, LinBP and BPA, each against the plain attack of the same setting and images."""
    outcomes = {tuple(item[:-1]): torch.tensor(item[-1], dtype=torch.bool)
                for item in record["outcomes"]}
    return sgm_effects(outcomes) + backward_effects(outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/protocol"))
    parser.add_argument("--settings", default=None, help="EPS:RULE:T,... (default: all)")
    parser.add_argument("--sources", default=None, help="comma-separated zoo sources")
    parser.add_argument("--replication", type=Path, default=None)
    parser.add_argument("--rescore", action="store_true",
                        help="score the finished folders again, attack nothing")
    args = parser.parse_args()
    settings = parse_settings(args.settings) if args.settings else all_settings()
    sources = args.sources.split(",") if args.sources else SOURCES
    plain_zoo = [s for s in zoo_specs(present=True) if "-at" not in s]
    targets = retrained_targets(args.replication) if args.replication else plain_zoo
    suffix = f".seed{SEED}" if args.replication else ""
    for setting in settings:
        for source in sources:
            path = args.out / setting.folder / f"{source}{suffix}.json"
            if path.is_file() and not args.rescore:
                continue
            scoring = args.rescore or args.replication is not None
            if scoring and not (args.out / setting.folder / f"{source}.json").is_file():
                continue  # never attacked: nothing to score
            print(f"== {setting.label} from {source} on {setting.images(source)} images",
                  flush=True)
            record = run_cell(setting, source, args.out, targets, scoring)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
