"""``skipgrad demo``: the bundled Fashion-MNIST transfer benchmark, and its paired SGM statistics.

With ``--backward METHOD`` every attack also runs with that backward-pass method, without and with
SGM, and the report adds the method's paired effects. With ``--forward METHOD`` (Ghost networks,
IAA: docs/forward.md) the source is modified by that method in every attack.

The demo is an ordinary transfer experiment (:func:`skipgrad.pipeline.transfer.run_transfer`): one residual
source of the bundled zoo, I-FGSM, MI and DI each without and with SGM, every zoo model as a target
(the source itself gives the white-box row), plus two cheap defended targets (:data:`DEMO_DEFENDED`). On top of the matrix it reports, for every attack and
target, the *paired* effect of SGM on the same images (McNemar's exact test), an examples figure, and
a short reading of the result in ``report.md``.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Sequence

from skipgrad.analysis.effects import BackwardEffect, SGMEffect, backward_effects, sgm_effects
from skipgrad.data.fmnist import FMNIST_CLASSES
from skipgrad.data.images import read_image
from skipgrad.models.loading import zoo_specs
from skipgrad.pipeline.report import (TransferRow, effects_markdown, markdown_table,
                                      on_correct_summary, short_name, summarise_effects)
from skipgrad.store.atomic import atomic_write_bytes, atomic_write_text

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


def defended_targets() -> list[str]:
    """The demo's defended targets whose (base) weights are present."""
    from skipgrad.models.defenses import split_spec
    from skipgrad.models.zoo import weights_path

    return [spec for spec in DEMO_DEFENDED
            if weights_path(split_spec(spec)[0].removeprefix("zoo:")).exists()]


def run_demo(out: Path, *, limit: int | None = None, device: str = "auto", quiet: bool = False,
             seed: int = 0, batch_size: int | None = None, source: str = DEMO_SOURCE,
             gamma: float = DEMO_GAMMA, backward: str | None = None,
             forward: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Run the benchmark into ``out`` and return the path of ``report.md``.

    ``source`` (a residual zoo model) and ``gamma`` default to the study's choice for a run of a
    few minutes; e.g. ``zoo:fmnist-resnet56`` shows larger gains at about three times the cost.
    ``backward`` (``METHOD[:key=value,...]``) adds every attack with that backward-pass method,
    without and with SGM, and its paired effects (docs/backward.md). ``forward`` (``--forward``,
    docs/forward.md) modifies the source with that method in every attack.
    """
    from skipgrad.attacks.config import AttackSpec
    from skipgrad.backward import check_gamma
    from skipgrad.errors import UserError
    from skipgrad.models import load_model
    from skipgrad.pipeline.job import AttackJob, RunOptions, sgm_problem
    from skipgrad.pipeline.transfer import ModelRef, TransferPlan, run_transfer

    targets = zoo_specs(present=True)
    if source not in targets:
        raise UserError(f"the demo source must be a bundled zoo model with weights "
                        f"({', '.join(targets)}); got {source}")
    model = load_model(source)
    problem = sgm_problem(model)  # before any attack runs, not after the baselines
    if problem is not None:
        raise UserError(f"the demo source {source} has no residual or dense blocks for SGM to "
                        f"decay ({problem}); choose a residual zoo model such as {DEMO_SOURCE}")
    if backward:
        _require_backward(model, source, backward)
    check_gamma(gamma)
    plan = TransferPlan(
        sources=(ModelRef(source),), attacks=DEMO_ATTACKS, gammas=(None, gamma),
        targets=tuple(ModelRef(t) for t in targets + defended_targets()),
        template=AttackJob(sources=(), data="fmnist:test", attack=AttackSpec(seed=seed)),
        title=f"Fashion-MNIST transfer success from {short_name(source)}",
        backward=(backward,) if backward else (), forward=(forward,) if forward else ())
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
    page = write_demo_html(Path(out), plan, result, examples)
    log(markdown_table(result.rows, plan.title))
    log("\n".join(on_correct_summary(result.rows, source)) + "\n")
    log("\n".join(summarise_effects(effects, source) + summarise_effects(method_effects, source)))
    log(f"report: {report.resolve()} (one page: {page.resolve()})")
    return report


def _require_backward(model, source: str, backward: str) -> None:
    """Refuse, in the demo's terms and before any attack, a backward-pass method that cannot
    run on the demo's source (PNA on a CNN: nothing to change), with the one check every attack
    makes (:func:`skipgrad.pipeline.job.backward_record`)."""
    from skipgrad.attacks.config import AttackSpec
    from skipgrad.errors import UserError
    from skipgrad.pipeline.job import AttackJob, backward_record

    job = AttackJob(sources=(source,), data="fmnist:test", attack=AttackSpec(backward=backward))
    try:
        backward_record(job, [model])
    except UserError as exc:
        raise UserError(f"the demo cannot run {exc}; give the demo a --source the method applies "
                        f"to (skipgrad inspect SPEC lists what each method changes)") from None


def write_demo_html(out: Path, plan, result, examples: Path) -> Path:
    """``report.html``: the transfer page with the demo's setting, its reading of the paired
    effects and the examples figure."""
    from skipgrad.pipeline.transfer import write_transfer_html

    source = plan.sources[0].spec
    readings = {"SGM": summarise_effects(sgm_effects(result.outcomes), source),
                "backward-pass methods": summarise_effects(backward_effects(result.outcomes),
                                                           source)}
    return write_transfer_html(
        out, result, "skipgrad demo: SGM on Fashion-MNIST", source=source, readings=readings,
        intro=[_setting_sentence(plan, result.rows)],
        later=[("Examples", examples, EXAMPLES_CAPTION)])


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
    source = plan.sources[0].spec
    text = "\n".join([
        "# skipgrad demo: SGM on Fashion-MNIST\n",
        _setting_sentence(plan, rows).replace(source, f"`{source}`", 1) + "\n",
        markdown_table(rows, plan.title, fold=False),
        *on_correct_summary(rows, source), "",
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
        EXAMPLES_CAPTION + "\n",
        f"Adversarial images (8-bit PNGs) are under `attacks/`; the matrix is also in "
        f"{files['json'].name}, {files['csv'].name} and {files['markdown'].name}; "
        f"report.html has all of this on one page.\n"])
    path = out / "report.md"
    atomic_write_text(path, text)
    return path


def _setting_sentence(plan, rows: Sequence[TransferRow]) -> str:
    """What was run, in one paragraph (report.md and report.html)."""
    n = rows[0].n if rows else 0
    return (f"Source {plan.sources[0].spec}; {n} test images; L-inf eps 16/255, step 2/255, "
            f"10 iterations, no random start; SGM γ = {plan.gammas[-1]:g}; success rate = 1 − "
            f"top-1 accuracy of the target on the adversarial images (all images counted; Wilson "
            f"95% intervals in transfer.json). The source's own column is the white-box result.")


EXAMPLES_CAPTION = (
    "Examples: the first test images, one row per attack; under each clean image its label, "
    "under each adversarial image the source's prediction on the saved PNG (red: fooled); the "
    "third image of each triple is the perturbation amplified 4x around mid-grey.")


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
        folder = cell_folder(out, source, attack, gamma, backward, plan.forward_of(source))
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
