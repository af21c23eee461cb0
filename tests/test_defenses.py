"""Input-transformation defenses (``SPEC+jpeg:75`` ...): each transform against an independent
computation, the smoothing vote's determinism and batch independence, parsing errors, and the
defended targets in evaluate / transfer / torchrun."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipgrad.cli import main
from skipgrad.data.fmnist import load_fmnist
from skipgrad.errors import UserError
from skipgrad.models import load_model
from skipgrad.models import defenses
from skipgrad.models.defenses import (ABSTAIN, BitDepth, DefendedModel, Jpeg, Median, Smoothing,
                                      canonical_spec, parse_defense, split_spec)
from tests.conftest import torch_threads

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _levels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _tensor(levels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(levels.astype(np.float32) / 255)


# ---------------------------------------------------------------- transforms

@pytest.mark.parametrize("quality", [10, 75, 95])
def test_jpeg_equals_pillow_round_trip_grayscale_and_rgb(quality: int) -> None:
    gray, rgb = _levels(0, (2, 1, 28, 28)), _levels(1, (2, 3, 32, 32))
    for batch in (gray, rgb):
        expected = []
        for image in batch:
            pil = Image.fromarray(image[0] if len(image) == 1 else image.transpose(1, 2, 0))
            buffer = io.BytesIO()
            pil.save(buffer, "JPEG", quality=quality)
            decoded = np.asarray(Image.open(buffer))
            expected.append(decoded[None] if decoded.ndim == 2 else decoded.transpose(2, 0, 1))
        out = Jpeg(quality)(_tensor(batch))
        assert torch.equal(out * 255, torch.from_numpy(np.stack(expected)).float())
        assert not torch.equal(out, _tensor(batch))  # lossy: it did something


def test_bit_depth_is_exact_rounding_of_every_level() -> None:
    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    for bits in range(1, 9):
        top = 2 ** bits - 1
        expected = np.round(levels.astype(np.float64) / 255 * top) / top  # the paper's formula
        out = BitDepth(bits)(_tensor(levels)).double().numpy()
        assert np.allclose(out, expected, atol=1e-7), bits
        assert len(np.unique(out)) == 2 ** bits
    assert torch.equal(BitDepth(8)(_tensor(levels)), _tensor(levels))


@pytest.mark.parametrize("size", [3, 5])
def test_median_filter_equals_scipy(size: int) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    levels = _levels(2, (2, 3, 20, 17))
    expected = ndimage.median_filter(levels, size=(1, 1, size, size), mode="nearest")
    assert torch.equal(Median(size)(_tensor(levels)), _tensor(expected))


# ---------------------------------------------------------------- smoothing

@pytest.fixture(scope="module")
def cnn_images() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fmnist("test", limit=12)


def test_smoothing_vote_is_deterministic_and_batch_independent(cnn_images) -> None:
    images, _ = cnn_images
    model = load_model("zoo:fmnist-cnn+smooth:0.3,n=16,seed=3")
    whole = model.predict_labels(images)
    assert torch.equal(whole, model.predict_labels(images))  # same seed, same votes
    one_by_one = torch.cat([model.predict_labels(images[i:i + 1]) for i in range(len(images))])
    shuffled = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    assert torch.equal(whole, one_by_one)
    assert torch.equal(whole[shuffled], model.predict_labels(images[shuffled]))


def test_smoothing_noise_depends_on_seed_and_image_only(cnn_images) -> None:
    images, _ = cnn_images
    a, b = Smoothing(0.25, n=4, seed=0), Smoothing(0.25, n=4, seed=1)
    assert torch.equal(a(images[:2])[4:], a(images[1:2]))
    assert not torch.equal(a(images[:1]), b(images[:1]))
    noise = a(images[:1]) - images[:1]
    assert abs(noise.std().item() - 0.25) < 0.03 and noise.shape == (4, 1, 28, 28)


def test_smoothing_abstains_exactly_when_the_binomial_test_says_so() -> None:
    stats = pytest.importorskip("scipy.stats")
    rule = Smoothing(0.25, n=20, alpha=0.05)
    # Rows of votes with top / runner-up counts (20, 0), (15, 5), (14, 6), (10, 10), (12, 4+4).
    rows = [[3] * 20, [1] * 15 + [2] * 5, [1] * 14 + [2] * 6, [4] * 10 + [5] * 10,
            [7] * 12 + [8] * 4 + [9] * 4]
    winners = rule.vote(torch.tensor(rows), 10).tolist()
    for row, winner in zip(rows, winners):
        counts = sorted(np.bincount(row), reverse=True)
        p = stats.binomtest(counts[0], counts[0] + counts[1], 0.5).pvalue
        assert (winner == ABSTAIN) == (p > 0.05), (row, p)
        if winner != ABSTAIN:
            assert winner == max(set(row), key=row.count)
    assert winners[0] == 3 and winners[3] == ABSTAIN


def test_smoothing_vote_over_thousands_of_copies_is_the_two_sided_binomial_test() -> None:
    # Cohen et al.'s PREDICT: abstain when the two-sided binomial p of top vs runner-up > alpha.
    stats = pytest.importorskip("scipy.stats")
    rule = Smoothing(0.25, n=5000, alpha=0.01)
    splits = [(2600, 2400), (2590, 2410), (2450, 2250)]  # p = 0.0049, 0.011, 0.0037
    rows = [[0] * top + [1] * runner + [2] * (5000 - top - runner) for top, runner in splits]
    winners = rule.vote(torch.tensor(rows), 3).tolist()
    for (top, runner), winner in zip(splits, winners):
        p = stats.binomtest(top, top + runner, 0.5).pvalue
        assert (winner == ABSTAIN) == (p > 0.01), (top, runner, p)
    assert winners == [0, ABSTAIN, 0]


# ---------------------------------------------------------------- specs

def test_specs_split_canonicalise_and_chain_left_to_right(cnn_images) -> None:
    assert canonical_spec("zoo:fmnist-vgg+smooth:0.25") == \
        "zoo:fmnist-vgg+smooth:0.25,n=32,alpha=0.001,seed=0"
    assert split_spec("file:/a+b/c.safetensors+jpeg:75") == ("file:/a+b/c.safetensors", (Jpeg(75),))
    model = load_model("zoo:fmnist-cnn+jpeg:50+bits:3")
    assert isinstance(model, DefendedModel)
    assert model.config.spec == "zoo:fmnist-cnn+jpeg:50+bits:3"
    images, _ = cnn_images
    plain = load_model("zoo:fmnist-cnn")
    with torch.no_grad():
        assert torch.equal(model(images), plain(BitDepth(3)(Jpeg(50)(images))))
        assert not torch.equal(model(images), plain(Jpeg(50)(BitDepth(3)(images))))


@pytest.mark.parametrize("spec, message", [
    ("zoo:fmnist-cnn+jpeg:0", r"JPEG quality must be an integer in \[1, 100\], got '0'"),
    ("zoo:fmnist-cnn+jpeg:7.5", r"JPEG quality must be an integer"),
    ("zoo:fmnist-cnn+bits:9", r"bit depth must be an integer in \[1, 8\]"),
    ("zoo:fmnist-cnn+median:4", r"median filter size must be odd, got 4"),
    ("zoo:fmnist-cnn+smooth:1.5", r"sigma must be a number in \[0, 1\]"),
    ("zoo:fmnist-cnn+smooth:0.2,m=3", r"unknown option\(s\) m"),
    ("zoo:fmnist-cnn+smooth:0.2,n=", r"expected smooth:SIGMA"),
    ("zoo:fmnist-cnn+blur:3", r"unknown defense 'blur'.*known: jpeg:Q, bits:B"),
    ("zoo:fmnist-cnn+smooth:0.1+smooth:0.2", r"at most one smooth: defense"),
])
def test_malformed_defenses_are_one_line_user_errors(spec: str, message: str, tmp_path: Path,
                                                     capsys) -> None:
    with pytest.raises(UserError, match=message):
        load_model(spec)
    assert main(["evaluate", str(tmp_path), "--target", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_defended_spec_is_refused_as_a_source(tmp_path: Path, capsys) -> None:
    code = main(["attack", "--source", "zoo:fmnist-cnn+jpeg:75", "--attack", "ifgsm", "--data",
                 "fmnist:test", "--out", str(tmp_path / "x"), "--limit", "2", "--quiet"])
    assert code == 2
    assert "cannot be an attack source" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_models_lists_the_defenses(capsys) -> None:
    assert main(["models", "--preset", "fmnist-defended"]) == 0
    out = capsys.readouterr().out
    for syntax in ("SPEC+jpeg:Q", "SPEC+bits:B", "SPEC+median:K", "SPEC+smooth:SIGMA"):
        assert syntax in out
    assert "zoo:fmnist-vgg+smooth:0.1,n=16,alpha=0.001,seed=0" in out



def _defense_classes() -> set[str]:
    """Names of every concrete defense class in defenses.py, found by subclassing, not by the
    grammar table that ``models --json`` is built from."""
    return {cls.name for cls in defenses.Defense.__subclasses__()}


def test_models_json_lists_every_defense_with_the_parsers_defaults(capsys) -> None:
    assert main(["models", "--preset", "fmnist", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)["defenses"]}
    assert set(listed) == _defense_classes() == {"jpeg", "bits", "median", "smooth"}
    for name, entry in listed.items():
        assert entry["syntax"].startswith(f"SPEC+{name}:") and entry["summary"]
        value, *options = entry["parameters"]
        assert value["required"] and value["default"] is None
        # The value alone: every option takes the default the listing claims.
        parsed = parse_defense(f"{name}:{value['max']}")
        assert getattr(parsed, value["name"]) == pytest.approx(value["max"])
        for option in options:
            assert not option["required"] and option["description"]
            assert getattr(parsed, option["name"]) == option["default"], (name, option["name"])
            assert f"[,{option['name']}={option['default']:g}]" in entry["syntax"]


@pytest.mark.parametrize("name", ["jpeg", "bits", "median", "smooth"])
def test_models_json_ranges_are_the_ones_the_parser_enforces(name: str, capsys) -> None:
    assert main(["models", "--json"]) == 0
    entry = next(d for d in json.loads(capsys.readouterr().out)["defenses"] if d["name"] == name)
    value = entry["parameters"][0]
    # n=64 keeps smoothing's vote able to pass at every alpha the range allows.
    suffix = ",n=64" if name == "smooth" else ""
    low, high = value["min"], value["max"]
    parse_defense(f"{name}:{high}{suffix}")
    if value["min_inclusive"]:
        parse_defense(f"{name}:{low}{suffix}")
    else:
        with pytest.raises(UserError, match="must be > "):
            parse_defense(f"{name}:{low}{suffix}")
    step = 1 if value["type"] == "int" else 0.01
    for outside in (low - step, high + step):
        with pytest.raises(UserError, match=f"malformed defense '\\+{name}:"):
            parse_defense(f"{name}:{outside}{suffix}")
    if value["odd_only"]:
        with pytest.raises(UserError, match="must be odd"):
            parse_defense(f"{name}:{low + 1}")


# ---------------------------------------------------------------- evaluation

SMALL = ("--source", "zoo:fmnist-cnn", "--attack", "ifgsm", "--data", "fmnist:test", "--limit",
         "24", "--steps", "3", "--quiet")
TARGETS = ("zoo:fmnist-cnn+jpeg:75", "zoo:fmnist-cnn+median:3+bits:4",
           "zoo:fmnist-cnn+smooth:0.2,n=16")


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("defended") / "attack"
    assert main(["attack", *SMALL, "--out", str(out)]) == 0
    return out


def _adversarial(folder: Path) -> torch.Tensor:
    """The saved PNGs decoded with Pillow (not skipgrad's reader)."""
    return torch.stack([_tensor(np.asarray(Image.open(folder / "images" / f"test_{i:05d}.png"))[None])
                        for i in range(24)])


def _evaluate_json(folder: Path, path: Path, *targets: str) -> dict:
    args = [a for t in targets for a in ("--target", t)]
    assert main(["evaluate", str(folder), *args, "--json", str(path), "--quiet"]) == 0
    return json.loads(path.read_text())["targets"]


def test_evaluate_scores_defended_targets_from_independent_predictions(attacked: Path,
                                                                      tmp_path: Path) -> None:
    results = _evaluate_json(attacked, tmp_path / "e.json", *TARGETS)
    assert list(results) == [canonical_spec(t) for t in TARGETS]
    clean, labels = load_fmnist("test", limit=24)
    adv = _adversarial(attacked)
    plain = load_model("zoo:fmnist-cnn")
    with torch.no_grad():
        adv_pred = plain(Jpeg(75)(adv)).argmax(1)
        clean_pred = plain(Jpeg(75)(clean)).argmax(1)
    jpeg = results["zoo:fmnist-cnn+jpeg:75"]
    assert jpeg["n"] == 24 and jpeg["success_rate"] * 24 == pytest.approx(int((adv_pred != labels).sum()))
    assert jpeg["clean_accuracy"] * 24 == pytest.approx(int((clean_pred == labels).sum()))


def test_abstentions_count_as_attack_failures_and_clean_errors(attacked: Path,
                                                                tmp_path: Path) -> None:
    spec = "zoo:fmnist-cnn+smooth:0.5,n=16,alpha=0.01"
    result = _evaluate_json(attacked, tmp_path / "a.json", spec)[canonical_spec(spec)]
    clean, labels = load_fmnist("test", limit=24)
    model = load_model(spec)
    adv_pred, clean_pred = model.predict_labels(_adversarial(attacked)), model.predict_labels(clean)
    assert (adv_pred == ABSTAIN).any() and (clean_pred == ABSTAIN).any()  # the case is exercised
    fooled = (adv_pred != labels) & (adv_pred != ABSTAIN)
    assert result["success_rate"] * 24 == pytest.approx(int(fooled.sum()))
    assert result["clean_accuracy"] * 24 == pytest.approx(int((clean_pred == labels).sum()))


def test_smoothing_that_can_never_pass_its_test_is_refused() -> None:
    with pytest.raises(UserError, match=r"n=8 .* never .* alpha 0.001 .* n >= 11"):
        load_model("zoo:fmnist-cnn+smooth:0.2,n=8")


def test_transfer_with_defended_targets_resumes_to_the_same_matrix(tmp_path: Path) -> None:
    args = ["transfer", "--source", "zoo:fmnist-cnn", "--attack", "ifgsm", "--data", "fmnist:test",
            "--limit", "8", "--steps", "2", "--out", str(tmp_path), "--quiet",
            "--target", "zoo:fmnist-cnn+smooth:0.2,n=12", "--target", "zoo:fmnist-cnn+jpeg:60"]
    assert main(args) == 0
    first = (tmp_path / "transfer.json").read_text()
    assert main(args) == 0  # resumes: the attack folder is kept, the targets re-scored
    assert (tmp_path / "transfer.json").read_text() == first
    targets = {row["target"] for row in json.loads(first)["rows"]}
    assert targets == {"zoo:fmnist-cnn+smooth:0.2,n=12,alpha=0.001,seed=0", "zoo:fmnist-cnn+jpeg:60"}


def test_torchrun_evaluate_of_defended_targets_equals_one_process(attacked: Path,
                                                                   tmp_path: Path) -> None:
    with torch_threads(1):  # as the ranks (ENV)
        single = _evaluate_json(attacked, tmp_path / "single.json", *TARGETS)
    args = [a for t in TARGETS for a in ("--target", t)]
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "skipgrad",
                           "evaluate", str(attacked), *args, "--batch-size", "5", "--quiet",
                           "--json", str(tmp_path / "sharded.json")],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "sharded.json").read_text())["targets"] == single


def test_sweep_and_transfer_tables_carry_both_denominators_for_defended_targets(
        tmp_path: Path, capsys) -> None:
    """On 32 real test images: for a smoothed target (abstaining on some clean images) and a JPEG
    target, transfer.json/.csv/.md and sweep.json carry the clean accuracy and the success rate on
    the clean-correct images, equal to counts from independent predictions on the saved PNGs."""
    smooth, jpeg = "zoo:fmnist-cnn+smooth:0.5,n=16,alpha=0.01", "zoo:fmnist-cnn+jpeg:75"
    assert main(["sweep", "--source", "zoo:fmnist-resnet20", "--attack", "ifgsm", "--gammas",
                 "0.5", "--target", smooth, "--target", jpeg, "--data", "fmnist:test", "--limit",
                 "32", "--steps", "2", "--quiet", "--out", str(tmp_path)]) == 0
    terminal = capsys.readouterr().out
    clean, labels = load_fmnist("test", limit=32)
    rows = json.loads((tmp_path / "transfer.json").read_text())["rows"]
    sweep = json.loads((tmp_path / "sweep.json").read_text())["targets"]
    markdown = (tmp_path / "transfer.md").read_text()
    csv_lines = (tmp_path / "transfer.csv").read_text().splitlines()
    assert len(rows) == 4 and len(csv_lines) == 5
    for spec in (smooth, jpeg):
        model = load_model(spec)
        clean_pred = model.predict_labels(clean)
        if spec == smooth:
            assert (clean_pred == ABSTAIN).any()  # abstentions on clean images are exercised
        correct = clean_pred == labels
        k = int(correct.sum())
        assert f"{100 * k / 32:.1f} ({k}/32)" in markdown.split("*clean accuracy*")[1].split("\n")[0]
        for row in (r for r in rows if r["target"] == canonical_spec(spec)):
            gamma = "1" if row["sgm"] is None else f"{row['sgm']:g}"
            folder = tmp_path / "attacks" / (f"zoo-fmnist-resnet20__ifgsm__"
                                             f"{'nosgm' if row['sgm'] is None else 'sgm0.5'}")
            adv = torch.stack([_tensor(np.asarray(Image.open(folder / "images" /
                                                             f"test_{i:05d}.png"))[None])
                               for i in range(32)])
            adv_pred = model.predict_labels(adv)
            fooled = (adv_pred != labels) & (adv_pred != ABSTAIN)
            m = int((fooled & correct).sum())
            assert (row["n"], row["clean_correct"], row["successes_on_correct"]) == (32, k, m)
            assert row["success_rate"] == pytest.approx(int(fooled.sum()) / 32)
            assert row["clean_accuracy"] == pytest.approx(k / 32)
            assert row["success_rate_on_correct"] == pytest.approx(m / k)
            point = sweep[canonical_spec(spec)][gamma]
            assert point["clean_accuracy"] == pytest.approx(k / 32)
            assert point["success_rate_on_correct"] == pytest.approx(m / k)
            assert f"{100 * m / k:.1f} ({m}/{k})" in markdown.split("<details>")[1]
            assert f",{k / 32:.6f},{k},{m / k:.6f},{m}" in "\n".join(csv_lines)
        assert f"{100 * k / 32:.1f}%" in terminal  # the sweep's clean-accuracy column
    assert "abstains counts as not fooled" in markdown
