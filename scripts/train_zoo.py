"""Train zoo models with skipgrad's recipe into the package's weights folder, one summary per line.

Usage: python scripts/train_zoo.py [NAME ...]   (all of ZOO_NAMES by default)
Set SKIPGRAD_THREADS to choose torch's thread count (default 2).
Summaries are appended to zoo-train.jsonl; scripts/zoo_table.py turns them into zoo.json + docs.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from skipgrad.models.zoo import ZOO_NAMES, train_model
from skipgrad.models.zoo.training import WEIGHTS_DIR


def main(names: list[str]) -> None:
    """Train each name in turn; a summary line is written as soon as each model is done."""
    torch.set_num_threads(int(os.environ.get("SKIPGRAD_THREADS", "2")))
    log = Path("zoo-train.jsonl")
    for name in names or list(ZOO_NAMES):
        summary = train_model(name, WEIGHTS_DIR)
        print(json.dumps(summary), flush=True)
        with log.open("a") as fh:
            fh.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
