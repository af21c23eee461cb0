"""``skipgrad compare DIR_A DIR_B``: the paired effect of attack B over attack A on each target.

Both folders must hold the same images (same clean data, same image ids and files); each target
scores both, and the per-image outcomes are compared pair by pair: Δ (B minus A, percentage
points) with its 95% interval, McNemar's exact p and the Benjamini-Hochberg q over the targets
(:mod:`skipgrad.analysis.stats`, as the demo reports SGM effects).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from skipgrad.pipeline import distributed
from skipgrad.errors import UserError
from skipgrad.pipeline.evaluate import (AttackOutput, evaluate_output, keep_images, load_targets,
                                       open_attack_output)
from skipgrad.pipeline.device import resolve_device
from skipgrad.units import l2_text
from skipgrad.store.records import comparable_config, shown
from skipgrad.analysis.stats import PairedComparison, benjamini_hochberg, paired_comparison


@dataclass(frozen=True)
class FolderComparison:
    """B against A on each target, on the same images."""

    folder_a: Path
    folder_b: Path
    settings_a: dict
    settings_b: dict
    comparisons: dict[str, PairedComparison]
    q_values: dict[str, float]
    # Mean L2 of each folder's saved perturbations on the compared images, in [0, 1] pixel units
    # (None: unknown); a rate means little without the perturbation that bought it.
    mean_l2_a: float | None = None
    mean_l2_b: float | None = None

    def differing_settings(self) -> dict[str, tuple[object, object]]:
        """The run.json config keys whose values differ between A and B."""
        keys = sorted(set(self.settings_a) | set(self.settings_b))
        return {k: (self.settings_a.get(k), self.settings_b.get(k)) for k in keys
                if self.settings_a.get(k) != self.settings_b.get(k)}


def same_images(a: AttackOutput, b: AttackOutput, limit: int | None = None
                ) -> tuple[AttackOutput, AttackOutput]:
    """The two folders on the same images (a paired test needs pairs): all of them, which must
    then be the same ones, or with ``limit`` the first ``limit`` images they have in common, by
    id (a 64-image run against the first 64 of a 200-image one). Anything else is refused."""
    if a.data.spec != b.data.spec:
        raise UserError(f"{a.folder} and {b.folder} were made from different data ({a.data.spec} "
                        f"vs {b.data.spec}); a paired comparison needs the same images")
    ids_a, ids_b = [s.id for s in a.samples], [s.id for s in b.samples]
    common = sorted(set(ids_a) & set(ids_b))
    if limit is not None:
        if len(common) < limit:
            raise UserError(f"{a.folder} and {b.folder} have {len(common)} finished images in "
                            f"common, fewer than --limit {limit}")
        chosen = set(common[:limit])
        return keep_images(a, chosen), keep_images(b, chosen)
    if ids_a != ids_b:
        only = sorted(set(ids_a) ^ set(ids_b))
        raise UserError(f"{a.folder} holds {len(ids_a)} images and {b.folder} {len(ids_b)}, "
                        f"not the same ones (e.g. id {only[0] if only else ids_a[0]}); compare "
                        f"the first N they share with --limit N ({len(common)} in common)")
    return a, b


def compare_folders(folder_a: Path, folder_b: Path, targets: Sequence[str], *,
                    weights: Sequence[str | None] | None = None, device: str = "auto",
                    batch_size: int | None = None, quiet: bool = False,
                    prefetch: int | None = None, limit: int | None = None) -> FolderComparison:
    """Evaluate every target on both folders and compare the outcomes image by image
    (``batch_size`` and ``prefetch`` as :func:`skipgrad.pipeline.evaluate.evaluate_output`;
    ``limit``: the first ``limit`` images both folders hold, see :func:`same_images`)."""
    a, b = same_images(open_attack_output(folder_a), open_attack_output(folder_b), limit)
    models = load_targets(list(targets), weights, distributed.device_for(resolve_device(device)))
    cache: dict = {}  # the clean predictions are shared: same images
    results_a = evaluate_output(a, models, batch_size=batch_size, quiet=quiet, prefetch=prefetch,
                                clean_cache=cache)
    results_b = evaluate_output(b, models, batch_size=batch_size, quiet=quiet, prefetch=prefetch,
                                clean_cache=cache)
    comparisons = {t: paired_comparison(results_a[t].per_image, results_b[t].per_image)
                   for t in models}
    q = benjamini_hochberg([c.p_value for c in comparisons.values()])
    # As the identity states them: settings of parts an attack lacks (an old I-FGSM folder's
    # decay) differ in nothing that made the images.
    settings_a, settings_b = (comparable_config(o.run.get("config", {})) for o in (a, b))
    return FolderComparison(Path(folder_a), Path(folder_b), settings_a, settings_b, comparisons,
                            dict(zip(comparisons, q)), _mean_l2(results_a), _mean_l2(results_b))


def _mean_l2(results: dict) -> float | None:
    # One folder's files: every target's result carries the same measurement.
    return next((r.mean_l2 for r in results.values() if r.mean_l2 is not None), None)


def comparison_markdown(result: FolderComparison) -> str:
    """The comparison table, with the settings that differ between the folders above it."""
    differ = result.differing_settings()
    lines = [f"B = {result.folder_b} vs A = {result.folder_a} "
             f"(n = {next(iter(result.comparisons.values())).n} images, paired)",
             "settings that differ: " + ("; ".join(
                 f"{k}: {shown(a)} (A) vs {shown(b)} (B)" for k, (a, b) in differ.items())
                 or "none"), "",
             "| target | A | mean L2 A | B | mean L2 B | Δ (points) | 95% CI (Newcombe) "
             "| only A / only B | McNemar p | BH q |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    l2_a, l2_b = l2_text(result.mean_l2_a), l2_text(result.mean_l2_b)
    for target, c in result.comparisons.items():
        lo, hi = c.ci95
        lines.append(f"| {target} | {100 * c.rate_a:.1f} | {l2_a} | {100 * c.rate_b:.1f} | {l2_b} "
                     f"| {100 * c.difference:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                     f"| {c.only_a} / {c.only_b} | {c.p_value:.2g} "
                     f"| {result.q_values[target]:.2g} |")
    lines.append("\nA, B: success (%); mean L2: of the saved perturbations, in [0, 1] pixel "
                 "units (levels / 255, over every channel and pixel).")
    return "\n".join(lines) + "\n"


def comparison_json(result: FolderComparison) -> dict:
    """The ``compare --json`` document."""
    return {"folder_a": str(result.folder_a), "folder_b": str(result.folder_b),
            "settings_a": result.settings_a, "settings_b": result.settings_b,
            "mean_l2_a": result.mean_l2_a, "mean_l2_b": result.mean_l2_b,
            "targets": {t: {"n": c.n, "success_a": c.rate_a, "success_b": c.rate_b,
                            "difference": c.difference, "ci95": list(c.ci95),
                            "only_a": c.only_a, "only_b": c.only_b, "mcnemar_p": c.p_value,
                            "bh_q": result.q_values[t]}
                        for t, c in result.comparisons.items()}}
