"""Issue 16: a command line a researcher can trust with an afternoon's work (units, fail fast,
per-source settings, file permissions, messages)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import skipgrad
from skipgrad.cli import main

SOURCE = "zoo:fmnist-resnet20"


def _attack(out: Path, *extra: str) -> int:
    # A single-valued option is given once (twice is refused): ``extra`` replaces these defaults.
    defaults = [a for flag, value in (("--limit", "2"), ("--steps", "2")) if flag not in extra
                for a in (flag, value)]
    return main(["attack", "--source", SOURCE, "--data", "fmnist:test", *defaults,
                 "--out", str(out), "--quiet", *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- 16.1 sizes below one level

@pytest.mark.parametrize("flags, hint", [
    (["--eps", "0.03"], "did you mean --eps 8?"),
    (["--step-size", "0.0078", "--steps", "10"], "did you mean --step-size 2?"),
])
def test_sizes_that_cannot_move_a_pixel_are_refused_with_the_intended_value(
        tmp_path: Path, capsys, flags: list[str], hint: str) -> None:
    assert _attack(tmp_path / "out", *flags) == 2
    assert hint in _error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=0.5 / 255), "eps .* below one 8-bit level"),
    (dict(step_size=0.01 / 255, steps=10), "less than half an 8-bit level"),
])
def test_the_api_refuses_a_no_op_linf_attack(tiny_resnet, tiny_batch, kwargs, message) -> None:
    images, labels = tiny_batch
    with pytest.raises(ValueError, match=message):
        skipgrad.attack(tiny_resnet, images, labels, **kwargs)


def test_one_level_is_still_accepted(tiny_resnet, tiny_batch) -> None:
    images, labels = tiny_batch
    adv = skipgrad.attack(tiny_resnet, images, labels, eps=1 / 255, step_size=1 / 255, steps=1)
    assert ((adv - images).abs() * 255).round().max() == 1


# ---------------------------------------------------------------- 16.5 L2 units

def _perturbation_l2(out: Path) -> list[float]:
    """L2 norms in [0, 1] units of the saved PNGs against the clean test images."""
    from skipgrad.data.fmnist import load_fmnist

    clean, _ = load_fmnist("test", limit=2)
    norms = []
    for i, path in enumerate(sorted((out / "images").glob("*.png"))):
        adv = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float64) / 255)
        norms.append(float((adv - clean[i, 0].double()).norm()))
    return norms


def test_l2_eps_is_the_whole_image_norm_in_unit_pixels(tmp_path: Path) -> None:
    out = tmp_path / "l2"
    assert _attack(out, "--norm", "l2", "--eps", "1.5", "--step-size", "0.5") == 0
    norms = _perturbation_l2(out)
    # Read as levels (the old behaviour) 1.5 would allow at most 1.5/255 = 0.006.
    assert all(0.5 < n <= 1.5 + 1e-9 for n in norms), norms
    run = json.loads((out / "run.json").read_text())
    assert (run["config"]["norm"], run["config"]["eps"], run["config"]["step_size"]) == (
        "l2", 1.5, 0.5)
    assert "[0, 1] pixel units" in run["config"]["eps_unit"]
    assert "[0, 1] pixel units" in run["environment"]["eps_unit"]


def test_l2_has_its_own_defaults_and_linf_records_levels(tmp_path: Path) -> None:
    assert _attack(tmp_path / "l2", "--norm", "l2") == 0
    config = json.loads((tmp_path / "l2" / "run.json").read_text())["config"]
    assert (config["eps"], config["step_size"]) == (1.5, 0.375)
    assert _attack(tmp_path / "linf", "--eps", "16/255") == 0
    run = json.loads((tmp_path / "linf" / "run.json").read_text())
    assert run["config"]["eps"] == 16.0 and "eps_unit" not in run["config"]  # older folders resume
    assert run["environment"]["eps_unit"] == "pixel levels out of 255"


def test_help_says_which_unit_applies(capsys) -> None:
    assert main(["attack", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "L-inf in pixel levels out of 255" in text
    assert "--norm l2 the L2 norm of the whole perturbation in [0, 1] pixel units" in text


# ---------------------------------------------------------------- 16.9 file permissions

@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def test_output_files_get_the_mode_open_would_give_under_the_umask(tmp_path: Path,
                                                                   umask_002) -> None:
    out = tmp_path / "shared"
    assert _attack(out) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"run.json", "manifest.csv"} and len(files) >= 4
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o664)}


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    from skipgrad.store.atomic import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------- 16.6 per-source --sgm

def _ensemble(out: Path, *extra: str) -> int:
    return main(["attack", "--source", SOURCE, "--source", "zoo:fmnist-cnn", "--data",
                 "fmnist:test", "--limit", "2", "--steps", "2", "--out", str(out), "--quiet",
                 *extra])


def test_sgm_once_per_source_with_none_for_a_plain_cnn(tmp_path: Path) -> None:
    assert _ensemble(tmp_path / "out", "--sgm", "0.5", "--sgm", "none") == 0
    config = json.loads((tmp_path / "out" / "run.json").read_text())["config"]
    assert config["sgm"] == [0.5, None]


def test_a_plain_cnn_under_one_sgm_names_the_per_source_fix(tmp_path: Path, capsys) -> None:
    assert _ensemble(tmp_path / "out", "--sgm", "0.5") == 2
    assert "give --sgm none in its place" in _error(capsys)


@pytest.mark.parametrize("run, counts", [
    (lambda out: _attack(out, "--sgm", "0.5", "--sgm", "none"), "2 --sgm for 1 --source"),
    (lambda out: _ensemble(out, "--sgm", "0.5", "--sgm", "0.2", "--sgm", "none"),
     "3 --sgm for 2 --source"),
])
def test_sgm_counts_that_do_not_match_the_sources_are_refused(tmp_path: Path, capsys, run,
                                                              counts: str) -> None:
    assert run(tmp_path / "out") == 2
    assert counts in _error(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 16.10 flags never ignored

def test_calibration_options_without_sgm_auto_are_refused(tmp_path: Path, capsys) -> None:
    assert _attack(tmp_path / "out", "--sgm", "0.5", "--calibrate-on", "zoo:fmnist-vgg") == 2
    assert "--calibrate-on only apply to --sgm auto" in _error(capsys)


def test_a_smaller_limit_keeps_run_json_true_to_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _attack(out) == 0
    assert main(["attack", "--source", SOURCE, "--data", "fmnist:test", "--limit", "1",
                 "--steps", "2", "--out", str(out), "--quiet"]) == 0
    env = json.loads((out / "run.json").read_text())["environment"]
    assert (env["limit"], env["images"]) == (2, 2)
    assert env["elapsed_seconds"] >= 0 and env["total_elapsed_seconds"] >= env["elapsed_seconds"]
    assert env["finished"]


def test_transfer_limit_scores_only_the_limited_images_of_a_reused_folder(tmp_path: Path,
                                                                          capsys) -> None:
    def transfer(limit: str) -> dict:
        assert main(["transfer", "--source", SOURCE, "--target", "zoo:fmnist-cnn", "--data",
                     "fmnist:test", "--limit", limit, "--steps", "1", "--out",
                     str(tmp_path / "t"), "--quiet"]) == 0
        return json.loads((tmp_path / "t" / "transfer.json").read_text())

    assert {r["n"] for r in transfer("3")["rows"]} == {3}
    assert {r["n"] for r in transfer("2")["rows"]} == {2}


# ---------------------------------------------------------------- 16.2 transfer checks first

def _transfer(tmp_path: Path, *extra: str) -> int:
    return main(["transfer", "--data", "fmnist:test", "--limit", "2", "--steps", "1", "--out",
                 str(tmp_path / "t"), "--quiet", *extra])


def test_transfer_reports_every_problem_before_any_attack(tmp_path: Path, capsys) -> None:
    code = _transfer(tmp_path, "--source", SOURCE, "--source", "file:/nonexistent.safetensors",
                     "--target", "zoo:fmnist-cnn", "--target", "timm:resnet18", "--sgm", "0.5")
    error = _error(capsys)
    assert code == 2 and "2 problems" in error
    assert "source file:/nonexistent.safetensors" in error and "target timm:resnet18" in error
    assert not (tmp_path / "t" / "attacks").exists()


def test_a_preset_source_without_blocks_runs_the_baseline_only_and_the_title_says_so(
        tmp_path: Path, capsys) -> None:
    assert _transfer(tmp_path, "--source", SOURCE, "--source", "zoo:fmnist-cnn", "--target",
                     "zoo:fmnist-vgg", "--sgm", "0.5") == 0
    rows = json.loads((tmp_path / "t" / "transfer.json").read_text())["rows"]
    assert {(r["source"], r["sgm"]) for r in rows} == {
        (SOURCE, None), (SOURCE, 0.5), ("zoo:fmnist-cnn", None)}
    table = (tmp_path / "t" / "transfer.md").read_text()
    assert "zoo:fmnist-cnn baseline only" in table


# ---------------------------------------------------------------- 16.6 / 16.8 plans

def _plan(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.toml"
    path.write_text(f'data = "fmnist:test"\nlimit = 2\nsteps = 1\nout = "{tmp_path / "p"}"\n'
                    f'targets = ["zoo:fmnist-cnn"]\nquiet = true\n{text}\n')
    return path


def test_a_plan_gives_each_source_its_own_gamma(tmp_path: Path) -> None:
    plan = _plan(tmp_path, 'sources = ["zoo:fmnist-resnet20", "zoo:fmnist-densenet"]\n'
                           'baseline = false\n'
                           'sgm = {"zoo:fmnist-resnet20" = 0.2, "zoo:fmnist-densenet" = 0.5}')
    assert main(["transfer", "--config", str(plan)]) == 0
    rows = json.loads((tmp_path / "p" / "transfer.json").read_text())["rows"]
    assert {(r["source"], r["sgm"]) for r in rows} == {
        ("zoo:fmnist-resnet20", 0.2), ("zoo:fmnist-densenet", 0.5)}


@pytest.mark.parametrize("text, message", [
    ('sources = ["zoo:fmnist-resnet20"]\nsgm = ["half"]', "'half' is not an SGM gamma"),
    ('sources = ["zoo:fmnist-resnet20"]\nlimitt = 16', "unknown key limitt; known keys: data,"),
    ('sources = ["zoo:fmnist-resnet20"]\ntargeted = "yes"', "targeted must be true or false"),
    ('sources = ["zoo:fmnist-resnet20"]\nsgm = {"zoo:fmnist-vgg" = 0.5}',
     "not a source of the plan"),
])
def test_plan_errors_are_one_line_exit_2(tmp_path: Path, capsys, text: str, message: str) -> None:
    assert main(["transfer", "--config", str(_plan(tmp_path, text))]) == 2
    assert message in _error(capsys)


def test_plan_limit_of_the_wrong_type_is_one_line(tmp_path: Path, capsys) -> None:
    plan = _plan(tmp_path, 'sources = ["zoo:fmnist-resnet20"]').read_text()
    (tmp_path / "plan.toml").write_text(plan.replace("limit = 2", 'limit = "16"'))
    assert main(["transfer", "--config", str(tmp_path / "plan.toml")]) == 2
    assert "limit must be an integer" in _error(capsys)


# ---------------------------------------------------------------- 16.11 smaller ones

def test_help_does_not_load_torch() -> None:
    # (``attack --help`` may load it: it lists the registered backward-pass methods.)
    code = ("import sys\nfrom skipgrad.cli import main\nassert main(['--help']) == 0\n"
            "assert main(['--version']) == 0\n"
            "assert 'torch' not in sys.modules, 'skipgrad --help imported torch'\n")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_refused_resume_names_settings_without_python_spellings(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert _attack(out) == 0
    capsys.readouterr()
    assert _attack(out, "--sgm", "0.5") == 2
    error = _error(capsys)
    assert "sgm: none there vs 0.5 now" in error and "None" not in error


def test_transfer_table_titles_carry_n_and_eps(tmp_path: Path) -> None:
    assert _transfer(tmp_path, "--source", SOURCE, "--target", "zoo:fmnist-cnn", "--eps", "8") == 0
    assert "(n = 2 images, L-inf eps 8/255)" in (tmp_path / "t" / "transfer.md").read_text()


# ---------------------------------------------------------------- 16.3 paired comparisons

def test_evaluate_keeps_per_image_outcomes_settings_and_show_lists_them(tmp_path: Path,
                                                                       capsys) -> None:
    out = tmp_path / "a"
    assert _attack(out, "--steps", "3") == 0
    assert main(["evaluate", str(out), "--target", "zoo:fmnist-cnn", "--quiet", "--json",
                 str(tmp_path / "e.json")]) == 0
    document = json.loads((tmp_path / "e.json").read_text())
    target = document["targets"]["zoo:fmnist-cnn"]
    assert len(target["per_image_success"]) == 2 and set(target["per_image_success"]) <= {0, 1}
    assert target["per_image_success"].count(1) == round(target["success_rate"] * 2)
    assert document["image_ids"] == [0, 1] and document["settings"]["steps"] == 3
    assert "per_image_success" in json.loads((out / "evaluations.json").read_text())[
        "targets"]["zoo:fmnist-cnn"]
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 finished; complete" in text and "zoo:fmnist-cnn: success" in text
    assert "None" not in text


def test_compare_pairs_two_folders_and_refuses_different_images(tmp_path: Path, capsys) -> None:
    assert _attack(tmp_path / "a", "--steps", "1") == 0
    assert _attack(tmp_path / "b", "--steps", "4") == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--target",
                 "zoo:fmnist-cnn", "--target", "zoo:fmnist-vgg", "--quiet", "--json",
                 str(tmp_path / "c.json")]) == 0
    text = capsys.readouterr().out
    assert "steps: 1 (A) vs 4 (B)" in text and "McNemar p | BH q" in text
    assert "| 95% CI (Newcombe) |" in text
    result = json.loads((tmp_path / "c.json").read_text())["targets"]["zoo:fmnist-vgg"]
    assert result["n"] == 2 and {"difference", "ci95", "mcnemar_p", "bh_q"} <= set(result)
    lo, hi = result["ci95"]  # Newcombe's interval: never a point, even with 2 images
    assert -1 <= lo <= result["difference"] <= hi <= 1 and lo < hi
    assert main(["attack", "--source", SOURCE, "--data", "fmnist:test", "--limit", "3",
                 "--steps", "1", "--out", str(tmp_path / "c3"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c3"), "--target",
                 "zoo:fmnist-cnn", "--quiet"]) == 2
    assert "not the same ones" in _error(capsys)


def test_transfer_and_sweep_write_the_paired_effects_table(tmp_path: Path, capsys) -> None:
    assert _transfer(tmp_path, "--source", SOURCE, "--target", "zoo:fmnist-cnn", "--sgm",
                     "0.5") == 0
    table = (tmp_path / "t" / "paired_effects.md").read_text()
    assert "McNemar p | BH q |" in table and "fmnist-cnn" in table
    assert "| 95% CI (Newcombe) |" in table and "Newcombe's hybrid score interval" in table
    effects = json.loads((tmp_path / "t" / "paired_effects.json").read_text())["effects"]
    assert [(e["sgm"], e["target"]) for e in effects] == [(0.5, "zoo:fmnist-cnn")]
    assert effects[0]["bh_q"] is not None
    capsys.readouterr()
    assert main(["sweep", "--source", SOURCE, "--gammas", "0.5", "--target", "zoo:fmnist-cnn",
                 "--data", "fmnist:test", "--limit", "2", "--steps", "1", "--out",
                 str(tmp_path / "s"), "--quiet"]) == 0
    assert (tmp_path / "s" / "paired_effects.md").is_file()


# ---------------------------------------------------------------- 16.7 labels that do not match

@pytest.fixture(scope="module")
def named_folders(tmp_path_factory) -> tuple[Path, Path]:
    """30 Fashion-MNIST test images in folders named after their classes ("Ankle boot", ...),
    which sort into labels that are not the model's, and the class map that fixes them."""
    from skipgrad.data.fmnist import FMNIST_CLASSES, load_fmnist

    root = tmp_path_factory.mktemp("named")
    names = [c.replace("/", "-") for c in FMNIST_CLASSES]
    images, labels = load_fmnist("test", limit=30)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        folder = root / "data" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).round().byte().numpy()).save(folder / f"{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root / "data", root / "classes.txt"


def _folder_attack(data: Path, out: Path, *extra: str) -> int:
    return main(["attack", "--source", SOURCE, "--data", str(data), "--steps", "1", "--out",
                 str(out), "--quiet", *extra])


def test_labels_that_do_not_match_the_model_are_warned_about(tmp_path: Path, named_folders,
                                                             capsys) -> None:
    data, class_map = named_folders
    assert _folder_attack(data, tmp_path / "sorted") == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "--class-map FILE" in err
    assert _folder_attack(data, tmp_path / "mapped", "--class-map", str(class_map)) == 0
    assert "warning" not in capsys.readouterr().err


def test_attack_reports_the_source_clean_accuracy(tmp_path: Path, capsys) -> None:
    assert main(["attack", "--source", SOURCE, "--data", "fmnist:test", "--limit", "2",
                 "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    assert "source clean accuracy on the first 2 images: 100.0%" in capsys.readouterr().err


# ---------------------------------------------------------------- 16.4 --sgm auto and evaluation

def test_auto_gamma_default_leaves_zoo_targets_for_evaluation() -> None:
    from skipgrad.pipeline.autogamma import default_held_out
    from skipgrad.models.loading import zoo_specs

    held = default_held_out([SOURCE], "fmnist:test")
    left = [t for t in zoo_specs(present=True) if t != SOURCE and t not in held]
    assert held and len(left) >= len(held) - 1 and SOURCE not in held


def test_evaluating_on_a_calibration_model_warns(tmp_path: Path, capsys) -> None:
    out = tmp_path / "auto"
    assert _attack(out) == 0
    # What `attack --sgm auto` writes with the folder's claim (runner notes).
    run = json.loads((out / "run.json").read_text())
    run["sgm_auto"] = {"chosen_gamma": 0.5, "held_out": ["zoo:fmnist-vgg"]}
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["evaluate", str(out), "--target", "zoo:fmnist-vgg", "--target",
                 "zoo:fmnist-cnn", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: zoo:fmnist-vgg chose the --sgm auto gamma" in err
    assert "fmnist-cnn" not in err
