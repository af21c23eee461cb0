"""The L2 path end to end: attack -> saved 8-bit files within the radius -> evaluate, transfer,
sweep and compare accept them; the default step follows --eps; impossible sizes are refused; the
bound the verifier checks is exactly the one the attack's rounding guarantees."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipgrad.attacks.updates import quantise_in_ball
from skipgrad.cli import main
from skipgrad.data.fmnist import load_fmnist
from skipgrad.pipeline.settings import attack_from_settings
from skipgrad.store.verify import bound_violation

SOURCE = "zoo:fmnist-resnet20"
TARGET = "zoo:fmnist-vgg"
CHEAP = ["--data", "fmnist:test", "--limit", "8", "--steps", "2", "--quiet", "--device", "cpu"]
EPS = 1.5  # the L2 default for 28x28 images


def _attack(out: Path, *extra: str) -> int:
    return main(["attack", "--source", SOURCE, "--out", str(out), "--norm", "l2", *CHEAP, *extra])


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skipgrad: error:"), lines
    return lines[0]


def _clean_levels(count: int = 8) -> np.ndarray:
    """The Fashion-MNIST test images as saved: (count, 28, 28) int64 levels."""
    images, _ = load_fmnist("test", limit=count)
    return (images[:, 0].double() * 255).round().long().numpy()


def _squared_distances(folder: Path) -> list[int]:
    """Per saved PNG (in id order), the exact sum of squared level differences to its clean image,
    read with PIL, independently of skipgrad's own loaders and verifier."""
    clean = _clean_levels()
    files = sorted((folder / "images").glob("test_*.png"))
    assert len(files) == len(clean)
    return [int(((np.asarray(Image.open(f), dtype=np.int64) - c) ** 2).sum())
            for f, c in zip(files, clean)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Two L2 folders on the same 8 images, plain I-FGSM and with SGM, 2 steps of eps."""
    root = tmp_path_factory.mktemp("l2")
    made = {"plain": root / "plain", "sgm": root / "sgm"}
    assert _attack(made["plain"], "--eps", str(EPS), "--step-size", str(EPS)) == 0
    assert _attack(made["sgm"], "--eps", str(EPS), "--step-size", str(EPS), "--sgm", "0.5") == 0
    return made


# ---------------------------------------------------------------- attack -> files -> evaluate

def test_saved_l2_files_are_inside_the_radius_and_use_it(folders) -> None:
    for folder in folders.values():
        squares = _squared_distances(folder)
        norms = [math.sqrt(s) / 255 for s in squares]
        assert all(s <= (EPS * 255) ** 2 for s in squares), norms
        # The walk travels 2 eps; the [0, 1] box clips part of it (the black backgrounds).
        assert min(norms) > 0.75 * EPS, norms


def test_evaluate_accepts_an_l2_folder_and_scores_it(folders, tmp_path, capsys) -> None:
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(folders["sgm"]), "--target", TARGET, "--target", SOURCE,
                 "--json", str(report), "--quiet"]) == 0
    targets = json.loads(report.read_text())["targets"]
    assert {t: targets[t]["n"] for t in targets} == {TARGET: 8, SOURCE: 8}
    assert targets[SOURCE]["success_rate"] > 0  # white-box: the attack did something


def test_compare_of_two_l2_folders(folders, tmp_path) -> None:
    report = tmp_path / "compare.json"
    assert main(["compare", str(folders["plain"]), str(folders["sgm"]), "--target", TARGET,
                 "--json", str(report), "--quiet"]) == 0
    record = json.loads(report.read_text())
    assert record["settings_a"]["norm"] == record["settings_b"]["norm"] == "l2"
    assert record["targets"][TARGET]["n"] == 8


def test_transfer_with_l2(tmp_path) -> None:
    out = tmp_path / "t"
    assert main(["transfer", "--source", SOURCE, "--attack", "ifgsm", "--sgm", "0.5", "--target",
                 TARGET, "--out", str(out), "--norm", "l2", "--eps", "2", *CHEAP]) == 0
    rows = json.loads((out / "transfer.json").read_text())["rows"]
    assert sorted(r["sgm"] is None for r in rows) == [False, True]
    assert all(r["n"] == 8 for r in rows)
    for run in out.rglob("run.json"):
        config = json.loads(run.read_text())["config"]
        assert (config["norm"], config["eps"], config["step_size"]) == ("l2", 2.0, 0.5)


def test_sweep_with_l2(tmp_path) -> None:
    out = tmp_path / "s"
    assert main(["sweep", "--source", SOURCE, "--gammas", "0.5", "--target", TARGET,
                 "--out", str(out), "--norm", "l2", *CHEAP]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["gammas"] == [0.5, 1.0]


# ---------------------------------------------------------------- the verifier's bound is exact

def _at_squared_distance(clean: np.ndarray, total: int) -> np.ndarray:
    """8-bit levels whose exact sum of squared differences to ``clean`` is ``total`` (greedy)."""
    adv, rest = clean.astype(np.int64).ravel().copy(), total
    for i in range(adv.size):
        up = adv[i] <= 127  # move towards the far end of [0, 255]
        step = min(math.isqrt(rest), 255 - adv[i] if up else adv[i])
        adv[i] += step if up else -step
        rest -= step * step
    assert rest == 0
    return adv.reshape(clean.shape).astype(np.uint8)


def test_the_verifier_draws_the_line_at_the_radius_exactly(folders, tmp_path, capsys) -> None:
    """Files forged with their hashes in the manifest: one at the largest integer sum of squares
    within eps = 1.5 ((1.5*255)**2 = 146306.25 squared levels) passes, one a single squared
    level beyond is refused -- read in [0, 1] units from run.json, no slack either way."""
    import shutil

    folder = Path(shutil.copytree(folders["plain"], tmp_path / "forged"))
    clean = _clean_levels(2)
    limit = math.floor((EPS * 255) ** 2)
    assert (limit, limit + 1) == (146306, 146307)
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row, image, total in zip(rows, clean, (limit, limit + 1)):
        buffer = io.BytesIO()
        Image.fromarray(_at_squared_distance(image, total)).save(buffer, format="PNG")
        (folder / row["file"]).write_bytes(buffer.getvalue())
        row["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    assert _squared_distances(folder)[:2] == [limit, limit + 1]
    assert main(["evaluate", str(folder), "--target", TARGET, "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert "1 adversarial file(s) are not what the attack wrote" in err
    assert "images/test_00001.png (L2 1.500004 > eps 1.5 in [0, 1] units (382.501 levels > " \
           "382.5))" in err
    assert "test_00000" not in err


def test_bound_violation_takes_the_radius_in_unit_pixels_for_both_norms() -> None:
    clean = np.full((4, 4), 100, dtype=np.uint8)
    adv = clean.copy()
    adv[0, :3] += 3  # L-inf 3 levels; L2 sqrt(27) = 5.196 levels
    assert bound_violation(adv, clean, 3 / 255, "linf") is None
    assert bound_violation(adv, clean, 2 / 255, "linf") == "L-inf 3 levels > 2"
    assert bound_violation(adv, clean, math.sqrt(27) / 255, "l2") is None
    assert "L2" in bound_violation(adv, clean, 5.19 / 255, "l2")


@pytest.mark.parametrize("eps", [1.5, 3.0, 0.1, 7 / 255])
def test_quantised_l2_perturbations_meet_the_exact_integer_bound(eps: float) -> None:
    """Perturbations far outside the ball (where rounding alone would leave it) end strictly
    inside: the exact sum of squared levels is at most (eps*255)**2 in float64, and the rescaling
    loses less than one level per pixel."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32, generator=gen)
    adv = (images + torch.randn(16, 3, 32, 32, generator=gen)).clamp(0, 1)
    rounded = quantise_in_ball(adv, images, eps, "l2")
    delta = ((rounded.double() * 255).round() - (images.double() * 255).round()).flatten(1)
    squares = delta.square().sum(dim=1)
    assert (squares <= (eps * 255) ** 2).all()
    # The rescaled point has norm eps*255; truncation removes at most 1 level per pixel.
    assert (squares.sqrt() > eps * 255 - math.sqrt(3 * 32 * 32)).all()


# ---------------------------------------------------------------- defaults and refusals

def test_the_default_l2_step_follows_the_given_eps(tmp_path) -> None:
    runs = {eps: tmp_path / f"eps{eps}" for eps in ("1.5", "3", "16")}
    for eps, out in runs.items():
        assert _attack(out, "--eps", eps) == 0
    steps = {eps: json.loads((out / "run.json").read_text())["config"]["step_size"]
             for eps, out in runs.items()}
    assert steps == {"1.5": 0.375, "3": 0.75, "16": 4.0}
    first = {eps: (out / "images" / "test_00000.png").read_bytes() for eps, out in runs.items()}
    assert len(set(first.values())) == 3
    # The default is exactly eps/4: an explicit --step-size 0.75 gives the same bytes.
    assert _attack(tmp_path / "explicit", "--eps", "3", "--step-size", "0.75") == 0
    assert (tmp_path / "explicit" / "images" / "test_00000.png").read_bytes() == first["3"]


def test_the_default_l2_step_in_the_library_units() -> None:
    spec = attack_from_settings(settings={"norm": "l2", "eps": 3.0}, data="fmnist:test")
    assert (spec.eps, spec.step_size) == (3.0, 0.75)
    spec = attack_from_settings(settings={"norm": "l2"}, data="fmnist:test")
    assert (spec.eps, spec.step_size) == (1.5, 0.375)
    spec = attack_from_settings(settings={"norm": "l2", "step_size": 0.1}, data="fmnist:test")
    assert (spec.eps, spec.step_size) == (1.5, 0.1)


def test_an_eps_beyond_the_l2_diameter_is_refused_in_one_line(tmp_path, capsys) -> None:
    assert _attack(tmp_path / "o", "--eps", "28.5") == 2
    err = _one_error_line(capsys)
    assert "--eps 28.5 is larger than any L2 perturbation of these images: 28 = sqrt(784 " in err
    assert not (tmp_path / "o").exists()
    # 1 x 28 x 28 values in [0, 1] are at most sqrt(784) = 28 apart: 28 itself is possible ...
    attack_from_settings(settings={"norm": "l2", "eps": 28.0}, data="fmnist:test")
    # ... and read as RGB the diameter is sqrt(3 * 784) = 48.5.
    attack_from_settings(settings={"norm": "l2", "eps": 48.0}, data="fmnist:test", channels=3)


@pytest.mark.parametrize("flags, message", [
    (["--eps", "0.003"],
     "--eps 0.003 is below one 8-bit level (1/255 = 0.0039), so no pixel can change"),
    (["--step-size", "0.0005"],
     "--step-size 0.0005 x 2 steps moves a pixel by less than half a level (0.5/255 = 0.0020)"),
])
def test_l2_sizes_that_cannot_move_a_pixel_are_refused(tmp_path, capsys, flags, message) -> None:
    assert _attack(tmp_path / "o", *flags) == 2
    assert message in _one_error_line(capsys)


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 0.5 / 255}, "eps .* below one 8-bit level"),
    ({"step_size": 0.1 / 255, "steps": 4}, "less than half an 8-bit level"),
])
def test_the_api_refuses_a_no_op_l2_attack(tiny_resnet, tiny_batch, kwargs, message) -> None:
    import skipgrad

    images, labels = tiny_batch
    with pytest.raises(ValueError, match=message):
        skipgrad.attack(tiny_resnet, images, labels, norm="l2", **{"eps": 1.0, **kwargs})
