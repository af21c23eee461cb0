"""``skipgrad demo``: the bundled Fashion-MNIST transfer benchmark, and its paired SGM statistics.

With ``--backward METHOD`` every attack also runs with that backward-pass method, without and with
SGM, and the report adds the method's paired effects.

The demo is an ordinary transfer experiment (:func:`skipgrad.pipeline.transfer.run_transfer`): one residual
source of the bundled zoo, I-FGSM, MI and DI each without and with SGM, every zoo model as a target
(the source itself gives the white-box row), plus two cheap defended targets (:data:`DEMO_DEFENDED`). On top of the matrix it reports, for every attack and
target, the *paired* effect of SGM on the same images (McNemar's exact test), an examples figure, and
a short reading of the result in ``report.md``.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from skipgrad.data.fmnist import FMNIST_CLASSES
from skipgrad.store.atomic import atomic_write_bytes, atomic_write_text
from skipgrad.data.images import read_image
from skipgrad.pipeline.report import TransferRow, markdown_table, short_name
from skipgrad.analysis.stats import PairedComparison, benjamini_hochberg, paired_comparison

# Chosen from the study in docs/study.md: of the sources where SGM gains on this data, the one whose
# six attacks fit the demo's five minutes on 2 CPU cores (ResNet-56 gains more but takes ~3x as
# long; `--source zoo:fmnist-resnet56`). That page also has the sources where SGM does not help.
DEMO_SOURCE = "zoo:fmnist-preact-resnet20"
DEMO_GAMMA = 0.5
DEMO_ATTACKS = ("ifgsm", "mi", "di")
DEMO_IMAGES = 1000
# Defended targets, chosen for cost: the adversarially trained CNN and the plain CNN behind a real
# JPEG round trip are both ~1 ms per image to score (docs/study.md has every defense).
DEMO_DEFENDED = ("zoo:fmnist-cnn-at", "zoo:fmnist-cnn+jpeg:75")


@dataclass(frozen=True)
class SGMEffect:
    """SGM at ``gamma`` vs the same attack without SGM, on one target, same images; both with the
    same backward-pass methods ``backward`` (a label, or None)."""

    source: str
    attack: str
    gamma: float
    target: str
    comparison: PairedComparison
    backward: str | None = None

    def to_json(self) -> dict:
        c = self.comparison
        return {"source": self.source, "attack": self.attack, "sgm": self.gamma,
                "backward": self.backward, "target": self.target, "n": c.n,
                "baseline": c.rate_a, "with_sgm": c.rate_b,
                "difference": c.difference, "ci95": list(c.ci95), "only_baseline": c.only_a,
                "only_sgm": c.only_b, "mcnemar_p": c.p_value}

    @property
    def variant(self) -> str:
        """The attack both cells share, e.g. ``mi`` or ``mi+linbp``."""
        return self.attack if self.backward is None else f"{self.attack}+{self.backward}"

    @property
    def change(self) -> str:
        """What the compared cell adds: ``SGM (γ=0.5)``."""
        return f"SGM (γ={self.gamma:g})"


@dataclass(frozen=True)
class BackwardEffect:
    """A backward-pass method vs the same attack without it (same SGM gamma or none), on one
    target, same images."""

    source: str
    attack: str
    gamma: float | None
    method: str
    target: str
    comparison: PairedComparison

    @property
    def variant(self) -> str:
        """The attack both cells share, e.g. ``mi`` or ``mi+sgm 0.5``."""
        return self.attack if self.gamma is None else f"{self.attack}+sgm {self.gamma:g}"

    @property
    def change(self) -> str:
        """What the compared cell adds: the method's label."""
        return self.method

    def to_json(self) -> dict:
        c = self.comparison
        return {"source": self.source, "attack": self.attack, "sgm": self.gamma,
                "backward": self.method, "target": self.target, "n": c.n,
                "without_method": c.rate_a, "with_method": c.rate_b,
                "difference": c.difference, "ci95": list(c.ci95), "only_without": c.only_a,
                "only_with": c.only_b, "mcnemar_p": c.p_value}


def zoo_targets() -> list[str]:
    """Specs of every zoo model whose weights are present."""
    from skipgrad.models.zoo import ZOO_NAMES, weights_path

    return [f"zoo:fmnist-{name}" for name in ZOO_NAMES if weights_path(name).exists()]


def defended_targets() -> list[str]:
    """The demo's defended targets whose (base) weights are present."""
    from skipgrad.models.defenses import split_spec
    from skipgrad.models.zoo import weights_path

    return [spec for spec in DEMO_DEFENDED
            if weights_path(split_spec(spec)[0].removeprefix("zoo:")).exists()]


def sgm_effects(outcomes: dict[tuple, torch.Tensor]) -> list[SGMEffect]:
    """Pair every SGM cell with the no-SGM cell of the same source, attack, backward-pass
    methods and target (outcome keys: ``(source, attack, gamma, backward, target)``)."""
    effects = []
    for (source, attack, gamma, backward, target), success in outcomes.items():
        baseline = outcomes.get((source, attack, None, backward, target))
        if gamma is None or baseline is None:
            continue
        effects.append(SGMEffect(source, attack, gamma, target,
                                 paired_comparison(baseline, success), backward))
    return effects


def backward_effects(outcomes: dict[tuple, torch.Tensor]) -> list[BackwardEffect]:
    """Pair every cell with a backward-pass method with the cell without it (same source,
    attack, gamma and target)."""
    effects = []
    for (source, attack, gamma, backward, target), success in outcomes.items():
        baseline = outcomes.get((source, attack, gamma, None, target))
        if backward is None or baseline is None:
            continue
        effects.append(BackwardEffect(source, attack, gamma, backward, target,
                                      paired_comparison(baseline, success)))
    return effects


def effects_markdown(effects: Sequence[SGMEffect | BackwardEffect],
                     q_values: dict[int, float] | None = None) -> str:
    """A table of paired effects (SGM, or a backward-pass method): percentage points, 95%
    interval, McNemar p, and with ``q_values`` (from :func:`transfer_q_values`) the
    Benjamini-Hochberg q (``-`` for white-box cells, outside the family)."""
    sgm = all(isinstance(e, SGMEffect) for e in effects)
    what = "SGM" if sgm else "method"
    q_head, q_rule = (" BH q |", "---:|") if q_values is not None else ("", "")
    lines = [f"| source | attack | {'γ' if sgm else 'method'} | target | without {what} | "
             f"with {what} | Δ (points) | 95% CI | only w/o / only with | McNemar p |{q_head}",
             f"|---|---|---:|---|---:|---:|---:|---|---:|---:|{q_rule}"]
    for e in effects:
        c = e.comparison
        lo, hi = c.ci95
        key = f"{e.gamma:g}" if isinstance(e, SGMEffect) else e.method
        lines.append(f"| {short_name(e.source)} | {e.variant} | {key} | {short_name(e.target)} "
                     f"| {100 * c.rate_a:.1f} | {100 * c.rate_b:.1f} | {100 * c.difference:+.1f} "
                     f"| [{100 * lo:+.1f}, {100 * hi:+.1f}] | {c.only_a} / {c.only_b} "
                     f"| {c.p_value:.2g} |" + _q_cell(q_values, e))
    return "\n".join(lines) + "\n"


def _q_cell(q_values: dict[int, float] | None, effect: object) -> str:
    if q_values is None:
        return ""
    q = q_values.get(id(effect))
    return f" {q:.2g} |" if q is not None else " - |"


def transfer_q_values(effects: Sequence[SGMEffect]) -> dict[int, float]:
    """Benjamini-Hochberg q-values of the transfer effects (white-box cells, where the target is
    the source, are left out of the family), keyed by ``id(effect)``."""
    transfer = [e for e in effects if e.target != e.source]
    return dict(zip(map(id, transfer), benjamini_hochberg([e.comparison.p_value for e in transfer])))


def summarise_effects(effects: Sequence[SGMEffect | BackwardEffect], source: str) -> list[str]:
    """Plain sentences: per attack and change (SGM, or a backward-pass method), on how many
    transfer targets it helped or hurt significantly, by McNemar's test and after
    Benjamini-Hochberg correction over all the transfer comparisons given."""
    transfer = [e for e in effects if e.target != source]
    q_values = transfer_q_values(transfer)
    sentences = []
    for variant, change in dict.fromkeys((e.variant, e.change) for e in transfer):
        rows = [e for e in transfer if (e.variant, e.change) == (variant, change)]
        better = [e for e in rows if e.comparison.difference > 0 and e.comparison.p_value < 0.05]
        worse = [e for e in rows if e.comparison.difference < 0 and e.comparison.p_value < 0.05]
        mean = 100 * sum(e.comparison.difference for e in rows) / len(rows)
        sentences.append(
            f"- {variant} + {change} vs {variant}: mean change {mean:+.1f} points over "
            f"{len(rows)} transfer targets; significantly better on {len(better)} "
            f"({sum(q_values[id(e)] < 0.05 for e in better)} corrected), significantly worse on "
            f"{len(worse)} ({sum(q_values[id(e)] < 0.05 for e in worse)} corrected).")
    if sentences:
        sentences.append(f"Significant: McNemar's exact test p < 0.05; corrected: Benjamini-Hochberg "
                         f"q < 0.05 over all {len(transfer)} transfer comparisons above.")
    return sentences


def run_demo(out: Path, *, limit: int | None = None, device: str = "auto", quiet: bool = False,
             seed: int = 0, batch_size: int | None = None, source: str = DEMO_SOURCE,
             gamma: float = DEMO_GAMMA, backward: str | None = None,
             log: Callable[[str], None] = print) -> Path:
    """Run the benchmark into ``out`` and return the path of ``report.md``.

    ``source`` (a residual zoo model) and ``gamma`` default to the study's choice for a run of a
    few minutes; e.g. ``zoo:fmnist-resnet56`` shows larger gains at about three times the cost.
    ``backward`` (``METHOD[:key=value,...]``) adds every attack with that backward-pass method,
    without and with SGM, and its paired effects (docs/backward.md).
    """
    from skipgrad.attacks.config import AttackSpec
    from skipgrad.errors import UserError
    from skipgrad.pipeline.job import AttackJob, RunOptions
    from skipgrad.models import load_model
    from skipgrad.backward import NoResidualBlockError, check_gamma, sgm_blocks
    from skipgrad.pipeline.transfer import ModelRef, TransferPlan, run_transfer

    targets = zoo_targets()
    if source not in targets:
        raise UserError(f"the demo source must be a bundled zoo model with weights "
                        f"({', '.join(targets)}); got {source}")
    try:  # before any attack runs, not after the baselines
        sgm_blocks(load_model(source))
    except NoResidualBlockError as exc:
        raise UserError(f"the demo source {source} has no residual or dense blocks for SGM to "
                        f"decay ({exc}); choose a residual zoo model such as {DEMO_SOURCE}"
                        ) from None
    check_gamma(gamma)
    plan = TransferPlan(
        sources=(ModelRef(source),), attacks=DEMO_ATTACKS, gammas=(None, gamma),
        targets=tuple(ModelRef(t) for t in targets + defended_targets()),
        template=AttackJob(sources=(), data="fmnist:test", attack=AttackSpec(seed=seed)),
        title=f"Fashion-MNIST transfer success from {short_name(source)}",
        backward=(backward,) if backward else ())
    opts = RunOptions(limit=limit or DEMO_IMAGES, batch_size=batch_size, device=device,
                      quiet=quiet)
    result = run_transfer(plan, Path(out), opts, log=log)
    effects = sgm_effects(result.outcomes)
    method_effects = backward_effects(result.outcomes)
    _write_json(Path(out) / "sgm_effects.json", {"effects": [e.to_json() for e in effects]})
    if method_effects:
        _write_json(Path(out) / "backward_effects.json",
                    {"effects": [e.to_json() for e in method_effects]})
    examples = write_examples_png(Path(out), plan)
    report = write_report(Path(out), plan, result.rows, effects, result.files, examples,
                          method_effects)
    log(markdown_table(result.rows, plan.title))
    log("\n".join(summarise_effects(effects, source) + summarise_effects(method_effects, source)))
    log(f"report: {report.resolve()}")
    return report


def backward_section(effects: Sequence[BackwardEffect], source: str) -> list[str]:
    """The report's paired-effects section of a backward-pass method (nothing without one)."""
    if not effects:
        return []
    method = effects[0].method
    return [f"## What {method} changed (paired, same images)\n",
            *summarise_effects(effects, source), "", effects_markdown(effects),
            f"Δ is success with {method} minus without, at the same SGM setting; "
            f"docs/backward.md has the study over the zoo's sources.\n"]


def write_report(out: Path, plan, rows: Sequence[TransferRow], effects: Sequence[SGMEffect],
                 files: dict[str, Path], examples: Path,
                 method_effects: Sequence[BackwardEffect] = ()) -> Path:
    """``report.md``: the matrix, the paired SGM (and backward-method) effects, a reading, links
    to the figures."""
    n = rows[0].n if rows else 0
    source, gamma = plan.sources[0].spec, plan.gammas[-1]
    text = "\n".join([
        f"# skipgrad demo: SGM on Fashion-MNIST\n",
        f"Source `{source}`; {n} test images; L-inf eps 16/255, step 2/255, 10 iterations, "
        f"no random start; SGM γ = {gamma:g}; success rate = 1 − top-1 accuracy of the target "
        f"on the adversarial images (all images counted; Wilson 95% intervals in transfer.json). "
        f"The source's own column is the white-box result.\n",
        markdown_table(rows, plan.title),
        "## What SGM changed (paired, same images)\n",
        *summarise_effects(effects, source), "",
        effects_markdown(effects),
        "Δ is success with SGM minus without, in percentage points; 'only w/o / only with' count "
        "the images fooled by one variant only, which is what McNemar's exact test compares. "
        "docs/study.md has the gamma sweep over every residual source of the zoo, including the "
        "sources and gammas where SGM does not help.\n",
        *backward_section(method_effects, source),
        f"![transfer heatmap]({files['heatmap'].name})\n",
        f"![clean, adversarial and amplified perturbation per attack]({examples.name})\n",
        "Examples: the first test images, one row per attack; under each clean image its label, "
        "under each adversarial image the source's prediction on the saved PNG (red: fooled); the "
        "third image of each triple is the perturbation amplified 4x around mid-grey.\n",
        f"Adversarial images (8-bit PNGs) are under `attacks/`; the matrix is also in "
        f"{files['json'].name}, {files['csv'].name} and {files['markdown'].name}.\n"])
    path = out / "report.md"
    atomic_write_text(path, text)
    return path


def write_examples_png(out: Path, plan, count: int = 4) -> Path:
    """Clean / adversarial / amplified perturbation for the first ``count`` images of each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skipgrad.pipeline.evaluate import open_attack_output
    from skipgrad.store.records import read_manifest
    from skipgrad.pipeline.transfer import cell_folder

    cells = plan.cells()
    fig, axes = plt.subplots(len(cells), 3 * count, figsize=(1.2 * 3 * count, 1.35 * len(cells)),
                             squeeze=False)
    for row, (source, attack, gamma, backward) in enumerate(cells):
        folder = cell_folder(out, source, attack, gamma, backward)
        output = open_attack_output(folder)
        predicted = [int(r["source_pred"]) for r in read_manifest(folder)]
        label = attack if backward is None else f"{attack}+{backward}"
        label = label if gamma is None else f"{label}+SGM {gamma:g}"
        for i in range(min(count, len(output.files))):
            _example_triplet(axes[row, 3 * i:3 * i + 3], output, i, predicted[i])
        axes[row, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i, title in enumerate(("clean", "adversarial", "perturbation ×4") * count):
        axes[0, i].set_title(title, fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path = out / "examples.png"
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _example_triplet(axes, output, index: int, predicted: int) -> None:
    """Clean image (its label), adversarial image (the source's prediction on the saved PNG, red
    when fooled) and the perturbation amplified 4x around mid-grey."""
    adv = read_image(output.files[index], output.data.channels)
    sample = output.samples[index]
    clean = output.data.load([sample])[0]
    perturbation = (0.5 + 4 * (adv - clean)).clamp(0, 1)
    for ax, image in zip(axes, (clean, adv, perturbation)):
        ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
    axes[0].set_xlabel(_class_name(sample.label), fontsize=6)
    axes[1].set_xlabel(f"→ {_class_name(predicted)}", fontsize=6,
                       color="tab:red" if predicted != sample.label else "black")


def _class_name(index: int) -> str:
    return FMNIST_CLASSES[index] if 0 <= index < len(FMNIST_CLASSES) else str(index)


def _write_json(path: Path, document: dict) -> None:
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
