"""``skipgrad sweep``: transfer success of one attack against the SGM gamma, one curve per target.

A sweep is an ordinary transfer experiment (:func:`skipgrad.pipeline.transfer.run_transfer`) with one source,
one attack and many gammas, so its attack folders live under ``OUT/attacks/`` and a re-run resumes.
Gamma 1.0 *is* the attack without SGM (the backward pass is then exactly the plain gradient), so it
is always run, as the no-SGM folder, and reported as the point ``gamma = 1``.

``OUT/sweep.json``::

    {"source": SPEC, "attack": NAME, "data": DATA, "gammas": [0.1, ..., 1.0],   # NAME+METHOD
                                                                               # with --backward
     "targets": {SPEC: {"0.1": {"success_rate": r, "n": n, "ci95": [lo, hi],
                                "clean_accuracy": a, "success_rate_on_correct": r2,
                                "mean_l2": l2}, ...}, ...},   # l2: [0, 1] pixel units
     "mean": {"0.1": r, ...},            # over the transfer targets (the source itself left out)
     "best": {"targets": {SPEC: gamma}, "mean": gamma}}

``OUT/sweep.png`` plots success against gamma, one line per target (95% bands), the mean dashed.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from skipgrad.pipeline import distributed
from skipgrad.store.atomic import atomic_write_bytes, atomic_write_text
from skipgrad.analysis.selection import best_gamma, sweep_gammas
from skipgrad.analysis.effects import sgm_effects
from skipgrad.analysis.stats import wilson_interval
from skipgrad.errors import UserError
from skipgrad.models.loading import named_spec
from skipgrad.pipeline.report import TransferRow, short_name
from skipgrad.units import l2_text
from skipgrad.pipeline.job import AttackJob, RunOptions, sgm_problem
from skipgrad.pipeline.transfer import (ModelRef, TransferPlan, heatmap_figure, run_transfer,
                                        write_transfer_html)

@dataclass(frozen=True)
class SweepPoint:
    """Transfer success of the attack at one gamma on one target."""

    gamma: float
    success_rate: float
    n: int
    ci95: tuple[float, float]
    # The second denominator, as evaluate reports it (None where not recorded).
    clean_accuracy: float | None = None
    success_rate_on_correct: float | None = None
    # Its counts (m fooled of the k clean-correct images), for the interval of the second panel.
    clean_correct: int | None = None
    successes_on_correct: int | None = None
    mean_l2: float | None = None  # of the gamma's saved perturbations, [0, 1] pixel units

    def on_correct_ci95(self) -> tuple[float, float] | None:
        """Wilson 95% interval of the success on the clean-correct images (None: unknown)."""
        if not self.clean_correct or self.successes_on_correct is None:
            return None
        return wilson_interval(self.successes_on_correct, self.clean_correct)

    def to_json(self) -> dict:
        return {"success_rate": self.success_rate, "n": self.n, "ci95": list(self.ci95),
                "clean_accuracy": self.clean_accuracy,
                "success_rate_on_correct": self.success_rate_on_correct, "mean_l2": self.mean_l2}


@dataclass
class SweepResult:
    """Curves of a sweep (target -> gamma -> point) and the files written."""

    source: str
    attack: str
    data: str
    gammas: tuple[float, ...]
    curves: dict[str, dict[float, SweepPoint]]
    files: dict[str, Path] = field(default_factory=dict)
    # Paired SGM effects (skipgrad.analysis.effects.SGMEffect) of every gamma against no SGM, same images.
    effects: list = field(default_factory=list)

    def transfer_targets(self) -> list[str]:
        """Targets other than the source (the white-box row says nothing about transfer)."""
        others = [t for t in self.curves if t != self.source]
        return others or list(self.curves)

    def mean_curve(self) -> dict[float, float]:
        """Gamma -> mean success over :meth:`transfer_targets`."""
        chosen = self.transfer_targets()
        return {g: sum(self.curves[t][g].success_rate for t in chosen) / len(chosen)
                for g in self.gammas}


def sweep_plan(source: ModelRef, attack: str, gammas: Sequence[float],
               targets: Sequence[ModelRef], template: AttackJob,
               backward: str | None = None, forward: str | None = None) -> TransferPlan:
    """The transfer plan of a sweep: gamma 1.0 is run as the no-SGM baseline (``None``). With
    ``backward`` (a ``METHOD[...]`` label) every gamma runs with that method, 1.0 included, and
    with ``forward`` (``--forward``) on the source that method modifies."""
    column = tuple(None if g == 1.0 else g for g in sweep_gammas(gammas))
    return TransferPlan((source,), (attack,), column, tuple(targets), template,
                        f"SGM gamma sweep: {short_name(source.spec)}, "
                        f"{_label(attack, backward, forward)}",
                        backward=(backward,) if backward else (), backward_baseline=False,
                        forward=(forward,) if forward else ())


def _label(attack: str, backward: str | None, forward: str | None) -> str:
    return "+".join(p for p in (attack, backward, forward) if p is not None)


def run_sweep(source: ModelRef, attack: str, gammas: Sequence[float],
              targets: Sequence[ModelRef], template: AttackJob, out: Path,
              opts: RunOptions = RunOptions(),
              log: Callable[[str], None] = print, backward: str | None = None,
              forward: str | None = None) -> SweepResult:
    """Run (or resume) every gamma's attack folder, evaluate the targets, write sweep.json/.png.
    ``backward``: backward-pass methods added to every gamma (``METHOD[:key=value,...]``);
    ``forward``: forward methods (``--forward``) that modify the source at every gamma."""
    plan = sweep_plan(source, attack, gammas, targets, template, backward, forward)
    _require_blocks(source, template.attack.sgm_official)
    transfer = run_transfer(plan, out, opts, log)
    result = SweepResult(named_spec(source.spec, source.weights), _label(attack, backward, forward),
                         template.data, sweep_gammas(gammas),
                         curves_from_rows(transfer.rows), effects=sgm_effects(transfer.outcomes))
    # Every torchrun rank holds the same rows; rank 0 alone writes the files (as for transfer).
    written = distributed.on_main(lambda: write_sweep(result, out)) or {}
    result.files = {**(transfer.files or {}), **written}
    # The heatmap as the transfer wrote it (its files name what exists on this rank).
    heatmap = [heatmap_figure(out)] if "heatmap" in (transfer.files or {}) else []
    html = distributed.on_main(lambda: write_transfer_html(
        out, transfer, plan.title, source=source.spec, summary=format_best(result),
        figures=[(written["sweep_png"], SWEEP_CAPTION), *heatmap]))
    if html is not None:  # None on the other torchrun ranks
        result.files["html"] = html
    return result


SWEEP_CAPTION = ("Success against SGM gamma, one line per target with its 95% band, the mean over "
                 "the transfer targets dashed: left, all images; right, only the images each "
                 "target classified correctly when clean.")


def _require_blocks(source: ModelRef, official: bool) -> None:
    """A sweep of gamma means nothing on a source SGM cannot change: refuse it before any work
    (a transfer matrix would instead run such a source's baseline only)."""
    from skipgrad.models import load_model

    problem = sgm_problem(load_model(source.spec, weights=source.weights), official=official)
    if problem is not None:
        raise UserError(f"sweep needs a source whose gradient SGM can change, and "
                        f"{source.spec} has none: {problem}")


def curves_from_rows(rows: Sequence[TransferRow]) -> dict[str, dict[float, SweepPoint]]:
    """Transfer rows -> target -> gamma -> point, the no-SGM row as gamma 1.0."""
    curves: dict[str, dict[float, SweepPoint]] = {}
    for row in rows:
        g = 1.0 if row.sgm is None else float(row.sgm)
        curves.setdefault(row.target, {})[g] = SweepPoint(
            g, row.success_rate, row.n, tuple(row.ci95), row.clean_accuracy,
            row.success_rate_on_correct, row.clean_correct, row.successes_on_correct,
            row.mean_l2)
    return curves


def sweep_json(result: SweepResult) -> dict:
    """The ``sweep.json`` document (module docstring)."""
    key = lambda g: f"{g:g}"  # noqa: E731 - JSON object keys must be strings
    return {"source": result.source, "attack": result.attack, "data": result.data,
            "gammas": list(result.gammas),
            "targets": {t: {key(g): p.to_json() for g, p in sorted(c.items())}
                        for t, c in result.curves.items()},
            "mean": {key(g): r for g, r in result.mean_curve().items()},
            "mean_over": result.transfer_targets(),
            "best": {"targets": {t: best_gamma({g: p.success_rate for g, p in c.items()})
                                 for t, c in result.curves.items()},
                     "mean": best_gamma(result.mean_curve())}}


def write_sweep(result: SweepResult, out: Path) -> dict[str, Path]:
    """Write ``sweep.json`` and ``sweep.png`` into ``out``."""
    paths = {"sweep_json": out / "sweep.json", "sweep_png": out / "sweep.png"}
    atomic_write_text(paths["sweep_json"], json.dumps(sweep_json(result), indent=2) + "\n")
    atomic_write_bytes(paths["sweep_png"], sweep_png(result))
    return paths


def sweep_png(result: SweepResult) -> bytes:
    """Success rate (%) against gamma, one line with its 95% band per target, the mean dashed; on
    the right the same on the images each target classified correctly when clean (its own
    denominator: a target's clean errors lift the left panel only)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    second = any(p.on_correct_ci95() is not None for c in result.curves.values() for p in c.values())
    fig, axes = plt.subplots(1, 1 + second, figsize=(7.5 + 5.5 * second, 4.8), dpi=110,
                             sharey=True, squeeze=False)
    panels = [(lambda p: p.success_rate, lambda p: p.ci95, "all images")]
    if second:
        panels.append((lambda p: p.success_rate_on_correct, lambda p: p.on_correct_ci95(),
                       "images the target classified correctly when clean"))
    for ax, (rate, band, subtitle) in zip(axes[0], panels):
        _plot_curves(ax, result, rate, band)
        ax.set_title(subtitle, fontsize=10, loc="left")
    _style_axes(axes[0], result)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return buffer.getvalue()


def _plot_curves(ax, result: SweepResult, rate: Callable, band: Callable) -> None:
    """One line per target with its 95% band, and the mean over the transfer targets dashed;
    points whose rate is unknown are left out."""
    for target, curve in result.curves.items():
        gs = [g for g in sorted(curve) if rate(curve[g]) is not None]
        label = short_name(target) + (" (source, white-box)" if target == result.source else "")
        line, = ax.plot(gs, [100 * rate(curve[g]) for g in gs], marker="o", label=label)
        ax.fill_between(gs, [100 * band(curve[g])[0] for g in gs],
                        [100 * band(curve[g])[1] for g in gs], color=line.get_color(), alpha=0.12)
    chosen = result.transfer_targets()
    mean = {g: [rate(result.curves[t][g]) for t in chosen] for g in result.gammas}
    mean = {g: sum(v) / len(v) for g, v in mean.items() if None not in v}
    ax.plot(list(mean), [100 * r for r in mean.values()], "k--", lw=2, label="mean (transfer)")


def _style_axes(axes, result: SweepResult) -> None:
    n = max(p.n for c in result.curves.values() for p in c.values())
    for ax in axes:
        ax.set_xlabel("SGM gamma (1.0 = no SGM)", fontsize=11)
        ax.set_xticks(list(result.gammas), [f"{g:g}" for g in result.gammas], fontsize=9)
        ax.set_ylim(-3, 103)  # a curve at 0% or 100% stays visible, not on the frame
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("transfer success rate (%)", fontsize=11)
    axes[0].figure.suptitle(f"{short_name(result.source)}, {result.attack}: success vs gamma "
                            f"({n} images)", fontsize=12)
    axes[-1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def format_best(result: SweepResult) -> str:
    """Terminal summary: each target's curve and best gamma, then the best on average."""
    width = max(len(short_name(t)) for t in result.curves)
    header = (f"{'target':<{width}}  " + "  ".join(f"{g:>5g}" for g in result.gammas)
              + "   best γ  clean acc")
    lines = [f"transfer success (%) by SGM gamma ({result.attack} from {result.source})", header]
    for target, curve in result.curves.items():
        best = best_gamma({g: p.success_rate for g, p in curve.items()})
        cells = "  ".join(f"{100 * curve[g].success_rate:5.1f}" for g in result.gammas)
        clean = curve[result.gammas[-1]].clean_accuracy  # gamma 1.0: the same clean images
        clean_text = "-" if clean is None else f"{100 * clean:.1f}%"
        lines.append(f"{short_name(target):<{width}}  {cells}   {best:<6g}  {clean_text:>9}")
    mean = result.mean_curve()
    cells = "  ".join(f"{100 * mean[g]:5.1f}" for g in result.gammas)
    lines.append(f"{'mean':<{width}}  {cells}   {best_gamma(mean):g}")
    lines += _l2_line(result, width)
    lines.append(f"best gamma on average over {len(result.transfer_targets())} transfer target(s): "
                 f"{best_gamma(mean):g} ({100 * max(mean.values()):.1f}% vs "
                 f"{100 * mean[1.0]:.1f}% without SGM)")
    lines[-1:-1] = _on_correct_lines(result, width)  # beside the headline, before the verdict
    return "\n".join(lines + _best_paired(result, best_gamma(mean)))


def _l2_line(result: SweepResult, width: int) -> list[str]:
    """Each gamma's mean L2 perturbation (one folder per gamma: any target's point has it)."""
    sizes = [next((c[g].mean_l2 for c in result.curves.values() if c[g].mean_l2 is not None),
                  None) for g in result.gammas]
    if all(size is None for size in sizes):
        return []
    return [f"{'mean L2':<{width}}  " + "  ".join(f"{l2_text(v, '-'):>5}" for v in sizes)]


def _on_correct_lines(result: SweepResult, width: int) -> list[str]:
    """The same curves on the images each target classified correctly when clean (m/k at
    gamma 1.0): a target's clean errors count as successes in the table above only."""
    lines = []
    for target, curve in result.curves.items():
        cells = "  ".join("    -" if curve[g].success_rate_on_correct is None
                          else f"{100 * curve[g].success_rate_on_correct:5.1f}"
                          for g in result.gammas)
        base = curve[result.gammas[-1]]
        of = ("" if base.successes_on_correct is None
              else f"   {base.successes_on_correct}/{base.clean_correct} at 1.0")
        lines.append(f"{short_name(target):<{width}}  {cells}{of}")
    if all(p.success_rate_on_correct is None for c in result.curves.values() for p in c.values()):
        return []
    return ["success (%) on the images each target classified correctly when clean", *lines]


def _best_paired(result: SweepResult, gamma: float) -> list[str]:
    """The paired test behind the best gamma: per transfer target, SGM at ``gamma`` against no
    SGM on the same images (Δ, 95% CI, McNemar p, Benjamini-Hochberg q over these targets)."""
    from skipgrad.analysis.stats import benjamini_hochberg

    chosen = [e for e in result.effects if e.gamma == gamma and e.target in
              result.transfer_targets() and e.target != result.source]
    if gamma == 1.0 or not chosen:
        return []
    q_values = benjamini_hochberg([e.comparison.p_value for e in chosen])
    lines = [f"paired, gamma {gamma:g} vs no SGM on the same images (Δ points [95% Newcombe CI]; "
             f"all gammas in paired_effects.md):"]
    for effect, q in zip(chosen, q_values):
        c = effect.comparison
        lo, hi = c.ci95
        lines.append(f"  {short_name(effect.target)}: {100 * c.difference:+.1f} points "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}], McNemar p {c.p_value:.2g}, BH q {q:.2g}")
    return lines
