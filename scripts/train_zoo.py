"""Train the bundled zoo with skipgrad's recipe, then write zoo.json and docs/zoo.md from the runs.

Usage:
    python scripts/train_zoo.py train [NAME ...]      # all of ZOO_NAMES by default
    python scripts/train_zoo.py table [LOG ...]       # zoo.json + docs/zoo.md from summary logs

``train`` writes weights into the package's weights folder and appends one JSON summary per model to
``zoo-train.jsonl`` in the current directory; SKIPGRAD_THREADS sets torch's thread count (default 2).
The same training is one command for users: ``skipgrad zoo train NAME``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from skipgrad.models.zoo import ZOO_NAMES, family_of, train_model
from skipgrad.models.zoo.training import RECIPES, WEIGHTS_DIR, weights_path

ROOT = Path(__file__).resolve().parents[1]
ZOO_JSON = ROOT / "src" / "skipgrad" / "models" / "zoo" / "zoo.json"
ZOO_DOC = ROOT / "docs" / "zoo.md"
LOG = Path("zoo-train.jsonl")


def train(names: list[str]) -> None:
    """Train each name in turn; a summary line is written as soon as each model is done."""
    torch.set_num_threads(int(os.environ.get("SKIPGRAD_THREADS", "2")))
    for name in names or list(ZOO_NAMES):
        summary = train_model(name, WEIGHTS_DIR)
        print(json.dumps(summary), flush=True)
        with LOG.open("a") as fh:
            fh.write(json.dumps(summary) + "\n")


def table(logs: list[Path]) -> None:
    """Write zoo.json and docs/zoo.md for every model whose committed weights match a logged run."""
    runs = {}
    for log in logs or [LOG]:
        for line in log.read_text().splitlines():
            run = json.loads(line)
            runs[run["name"]] = run  # the latest run of a model wins
    models = {name: _row(runs[name]) for name in ZOO_NAMES if name in runs}
    doc = {"dataset": "Fashion-MNIST (train 60k / test 10k)", "input": [1, 28, 28],
           "normalisation": "inside each model (mean 0.2860, std 0.3530)", "models": models}
    ZOO_JSON.write_text(json.dumps(doc, indent=2) + "\n")
    ZOO_DOC.write_text(_markdown(models))


def _row(run: dict) -> dict:
    from skipgrad.models.zoo.training import _sha256

    path = weights_path(run["name"])
    if _sha256(path) != run["sha256"]:
        raise SystemExit(f"{path} does not match its logged run (sha256 differs); retrain it")
    recipe = RECIPES[run["name"]]
    return {"family": family_of(run["name"]), "params": run["params"],
            "test_accuracy": round(run["test_accuracy"], 4),
            "test_accuracy_first1000": round(run["test_accuracy_first1000"], 4),
            "epochs": run["epochs"], "seed": run["seed"], "optimizer": recipe.optimizer,
            "max_lr": recipe.max_lr, "weight_decay": recipe.weight_decay,
            "train_seconds": run["train_seconds"], "file": path.name,
            "bytes": path.stat().st_size, "sha256": run["sha256"]}


def _markdown(models: dict) -> str:
    lines = [_HEADER,
             "| spec | family | params | test acc. | first 1000 | epochs | optimizer | "
             "train time | sha256 |", "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for name, row in models.items():
        lines.append(f"| `zoo:fmnist-{name}` | {row['family']} | {row['params']:,} | "
                     f"{100 * row['test_accuracy']:.2f}% | {100 * row['test_accuracy_first1000']:.1f}% "
                     f"| {row['epochs']} | {row['optimizer']} | {row['train_seconds'] / 60:.1f} min | "
                     f"`{row['sha256'][:16]}` |")
    total = sum(row["bytes"] for row in models.values())
    short = [f"`{n}` ({100 * r['test_accuracy']:.1f}%)" for n, r in models.items()
             if r["test_accuracy"] < (0.88 if n == "vit" else 0.90)]
    if short:  # the zoo's target: >= 90% test accuracy (ViT >= 88%)
        lines += ["", f"Below the zoo's accuracy target (90%, ViT 88%): {', '.join(short)}."]
    lines += ["", f"Weights: {len(models)} files, {total / 2**20:.2f} MB in total (fp32 safetensors). "
              "Full hashes are in `src/skipgrad/models/zoo/zoo.json`.", "", _RECIPE]
    return "\n".join(lines) + "\n"


_HEADER = """# The bundled Fashion-MNIST zoo

Small networks of the families that SGM (Wu et al., ICLR 2020) meets, trained by this project on
Fashion-MNIST so that transfer experiments run offline. Each takes `(N, 1, 28, 28)` images in `[0, 1]`
and returns 10 logits; normalisation (mean 0.2860, std 0.3530) is the first module of every network.
Use them as `zoo:fmnist-NAME` specs or with `skipgrad.models.zoo.load_zoo_model(NAME)`.

Accuracy is top-1 on the full 10,000-image test split; "first 1000" is the accuracy on the first 1000
test images, which `tests/test_zoo.py` re-checks against the committed weights. Train times were
measured on a shared 2-core CPU and are only indicative.
"""

_RECIPE = """## Architectures

- `resnet20`, `resnet56`: CIFAR-style post-activation ResNets (3x3 stem, three stages of 3 or 9
  torchvision `BasicBlock`s, widths 16/32/64, strided first block of stages 2 and 3 with a 1x1 conv +
  BN skip), stages in `layer1..layer3`.
- `preact-resnet20`: pre-activation ResNet (He et al., 2016) of our `PreActBasicBlock`, registered with
  SGM at import (its branch starts at `bn1`, or at `conv1` when the skip is a 1x1 projection).
- `densenet`: DenseNet-BC from torchvision's `_DenseBlock`/`_Transition`, growth 12, blocks (6, 6, 6),
  bottleneck 4, compression 0.5, strided 3x3 stem (blocks at 14x14, 7x7, 3x3).
- `vgg`: VGG with BatchNorm, 32-32-M-64-64-M-128-128-M, dropout 0.3, linear classifier.
- `mobilenetv2`: torchvision `InvertedResidual`s (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2)
  (6,64,2,1) after a strided 3x3 stem (28 -> 14 -> 7 -> 4), 1x1 conv to 256 channels.
- `cnn`: three conv + ReLU + max-pool stages (32/64/64), two linear layers, no BatchNorm, no skips.
- `vit`: timm `VisionTransformer`, 7x7 patches (16 tokens + class token), width 96, depth 6, 4 heads,
  MLP ratio 2.

## Recipe

`skipgrad.models.zoo.training.train_model` (what `skipgrad zoo train NAME` runs):

- data: the Fashion-MNIST train split (60,000 images), no augmentation; each epoch visits it in an
  order drawn from `torch.Generator().manual_seed(seed)`; `torch.manual_seed(seed)` before building
  the model fixes the initialisation and dropout. Seed 0 for every committed model.
- batch 128, cross-entropy, one-cycle learning-rate schedule over all steps;
- convolutional nets: SGD, momentum 0.9, Nesterov, weight decay 5e-4, peak lr 0.1;
- ViT: AdamW, peak lr 2e-3, weight decay 0.05 (plain SGD trains a small ViT from scratch poorly in a
  few epochs);
- epochs per model as in the table (resnet56 needs 4: with 2 it reached 88.1% and with 3
  85.5%, below the 90% target); evaluation on the full test split in eval mode;
- output: `fmnist-NAME.safetensors` (state dict; metadata: arch, name, epochs, seed, test accuracy).

Reproduce one model (CPU float results vary slightly with the thread count and the library build,
so expect the same accuracy within a few tenths of a point rather than identical bytes):

```
skipgrad zoo train NAME --out weights/
```

The committed weights were produced by `python scripts/train_zoo.py train NAME` (the same function,
writing into the package) and this page by `python scripts/train_zoo.py table LOG`.
"""


def main(argv: list[str]) -> None:
    """``train [NAME ...]`` or ``table [LOG ...]``; bare names mean ``train``."""
    if argv and argv[0] == "table":
        table([Path(p) for p in argv[1:]])
    else:
        train(argv[1:] if argv and argv[0] == "train" else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
