"""Property-based fuzzing (hypothesis) of the Python API and of the ``attack`` command line.

Every outcome must be either a valid result (in [0, 1], same shape, within the eps bound on the
8-bit levels) or a clean refusal: ``ValueError`` from the API, exit code 2 with one error line from
the CLI. Anything else (a traceback, another exception type, a silent bound violation) fails.
"""
from __future__ import annotations

import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.resnet import BasicBlock

import skipgrad
from skipgrad.cli import main

_TOKENS = ["ifgsm", "pgd", "mi", "ni", "di", "ti", "sgm", "MI", "", " ", "fgsm", "mi ", "+"]


class AnyInputNet(nn.Module):
    """A tiny residual net taking any (N, C, H, W): channels averaged, input cast to its dtype,
    as a model wrapper does with normalisation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = BasicBlock(4, 4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.stem.weight.dtype).mean(dim=1, keepdim=True)
        return self.head(self.block(self.stem(x)))


_NET = AnyInputNet().eval()


_VALID_NAMES = ["ifgsm", "pgd", "mi", "ni", "di", "ti", "mi+di", "pgd+ti", "ni+di+ti", "DI+MI"]


def _mostly(draw, good: st.SearchStrategy, bad: st.SearchStrategy):
    """Mostly a draw from ``good``, sometimes from ``bad``: most calls are valid enough to
    reach the attack loop, and every kind of hostile value still shows up."""
    return draw(bad) if draw(st.integers(0, 9)) == 9 else draw(good)


@st.composite
def attack_calls(draw) -> dict:
    """Arguments for skipgrad.attack: mostly plausible, sometimes hostile."""
    n = _mostly(draw, st.integers(1, 3), st.just(0))
    c, h, w = draw(st.sampled_from([1, 3])), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = _mostly(draw, st.sampled_from([torch.float32, torch.float64]),
                    st.sampled_from([torch.float16, torch.uint8, torch.int64]))
    low, high = _mostly(draw, st.just((0.0, 1.0)), st.sampled_from(
        [(-0.5, 1.0), (0.0, 2.0), (float("nan"), 1.0), (0.0, float("inf")), (0.2, 0.3)]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    images = (low + (high - low) * torch.rand(n, c, h, w, generator=gen)).to(dtype)
    labels = torch.randint(_mostly(draw, st.just(0), st.just(-3)), 10, (n,), generator=gen)
    name = _mostly(draw, st.sampled_from(_VALID_NAMES), st.lists(
        st.sampled_from(_TOKENS), min_size=1, max_size=3).map("+".join))
    hostile = st.sampled_from([0.0, -1 / 255, 1.5, float("nan"), float("inf")])
    return dict(images=images, labels=labels, method=name,
                # L-inf sizes that cannot move a saved pixel are refused (issue 16.1): draw valid
                # ones at least one level (eps) and half a level (the step) large.
                eps=_mostly(draw, st.floats(1 / 255, 32 / 255), hostile),
                step_size=_mostly(draw, st.floats(0.5 / 255, 8 / 255), hostile),
                steps=_mostly(draw, st.integers(1, 2), st.sampled_from([0, -1, 1.5, True])),
                sgm=_mostly(draw, st.one_of(st.none(), st.floats(0.05, 1.0)),
                            st.sampled_from([0.0, -0.2, 1.5, float("nan")])),
                norm=_mostly(draw, st.just("linf"), st.sampled_from(["l2", "l1", ""])),
                seed=_mostly(draw, st.integers(0, 2**31), st.integers(-(2**70), 2**70)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attack_calls())
def test_api_returns_a_bounded_result_or_a_clean_value_error(call: dict) -> None:
    images = call["images"]
    try:
        adv = skipgrad.attack(_NET, **{k: v for k, v in call.items()})
    except ValueError as exc:
        event(f"ValueError: {str(exc)[:30]}")
        return
    event("attacked")
    assert adv.shape == images.shape and adv.dtype == images.dtype
    assert torch.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1
    levels = lambda t: (t.double() * 255).round()  # noqa: E731
    limit = math.floor(call["eps"] * 255 + 1e-6)
    assert (levels(adv) - levels(images)).abs().max() <= limit


_VALUES = {
    "--eps": ["16", "4", "0", "-1", "nan", "inf", "16/255", "1/0", "abc", "300", ""],
    "--step-size": ["2", "0.5", "0", "-2", "nan", "x"],
    "--steps": ["1", "2", "0", "-3", "x", "1.5"],
    "--sgm": ["0.2", "1", "0", "1.5", "none", "nan", "x"],
    "--attack": ["ifgsm", "mi+di", "pgd+ti", "mi+ni", "nope", "", "+", "MI"],
    "--limit": ["1", "2", "0", "-1", "x"],
    "--batch-size": ["1", "2", "0", "x"],
    "--channels": ["auto", "1", "3", "2"],
    "--norm": ["linf", "l2", "l3"],
    "--loss": ["ce", "margin", "mse"],
    "--seed": ["0", "-1", "x", "99999999999999999999999"],
    "--decay": ["1.0", "0", "-1", "nan"],
    "--di-prob": ["0.5", "2", "nan"],
    "--ti-kernel": ["3", "4", "0"],
    "--device": ["cpu", "auto", "tpu"],
}


@st.composite
def attack_argvs(draw) -> list[str]:
    """``attack`` argument lists: random options with good and bad values, plus junk tokens."""
    argv = []
    for flag in draw(st.lists(st.sampled_from(sorted(_VALUES)), max_size=6, unique=True)):
        argv += [flag, draw(st.sampled_from(_VALUES[flag]))]
    for _ in range(draw(st.integers(0, 2))):
        junk = draw(st.sampled_from(["--targeted", "--sgm-official", "--bogus", "-x", "--"]))
        argv.insert(draw(st.integers(0, len(argv))), junk)
    return argv


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attack_argvs())
def test_cli_attack_exits_0_or_2_with_one_error_line(argv: list[str]) -> None:
    import contextlib
    import io

    with tempfile.TemporaryDirectory() as tmp:
        base = ["attack", "--source", "zoo:fmnist-cnn", "--data", "fmnist:test", "--out",
                f"{tmp}/out", "--quiet", "--limit", "2", "--steps", "1"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(base + argv)
    event(f"exit {code}")
    assert code in (0, 2), (argv, err.getvalue())
    if code == 2:
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("skipgrad: error:"), (argv, lines)


@pytest.mark.parametrize("argv", [["attack"], ["attack", "--source"], ["nope"], []])
def test_cli_incomplete_commands_exit_2(argv: list[str]) -> None:
    assert main(argv) == 2
