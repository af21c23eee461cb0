"""Checks the claims of docs/study.md on models the study never saw.

The zoo recipe is re-run with seed 1 (a different initialisation, data order and dropout) for the
convolutional targets; the study's finished attack folders are then scored on these retrained models,
and the paired SGM effects are tabulated exactly as in the study. An SGM effect that is a property of
the source's gradients should reappear on an independently trained copy of the same target family;
one that does not is most likely specific to the one target network the study happened to use.

    python scripts/fmnist_replication.py --study runs/study --out runs/replication

Training the six seed-1 models takes about 40 CPU-minutes on 2 cores (skipped for files that exist).
Writes OUT/replication.json and the replication tables of docs/study.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fmnist_study import effects_section, replace_section, run_grid

from skipgrad.models.zoo.training import train_model

REPLICATED = ("cnn", "vgg", "resnet20", "preact-resnet20", "densenet", "mobilenetv2")
SEED = 1


def retrained_targets(out: Path) -> list[str]:
    """``file:`` specs of the seed-1 models, training those that are missing."""
    specs = []
    for name in REPLICATED:
        path = out / f"fmnist-{name}-seed{SEED}.safetensors"
        if not path.exists():
            result = train_model(name, out / "tmp", seed=SEED)
            Path(result["path"]).replace(path)
            (out / f"fmnist-{name}-seed{SEED}.json").write_text(json.dumps(result, indent=1))
        specs.append(f"file:{path}")
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("runs/study"),
                        help="the output folder of scripts/fmnist_study.py")
    parser.add_argument("--out", type=Path, default=Path("runs/replication"))
    parser.add_argument("--limit", type=int, default=1000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    targets = retrained_targets(args.out)
    rows, effects = run_grid(args.study, args.limit, quick=False, evaluate_only=True,
                             targets=targets)
    (args.out / "replication.json").write_text(json.dumps(
        {"rows": [r.to_json() for r in rows], "effects": [e.to_json() for e in effects]}, indent=1))
    command = (f"python scripts/fmnist_replication.py --study {args.study} --out {args.out} "
               f"--limit {args.limit}")
    replace_section("replication tables", effects_section(rows, effects, command))


if __name__ == "__main__":
    main()
