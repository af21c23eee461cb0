"""score_finished: a plan's finished attack folders scored again (other targets, a newer table),
with nothing attacked, and a plan that never ran refused by name."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from skipgrad.errors import UserError
from skipgrad.pipeline.job import AttackJob, RunOptions
from skipgrad.pipeline.transfer import ModelRef, TransferPlan, run_transfer, score_finished

OPTS = RunOptions(limit=4, batch_size=4, quiet=True)
PLAN = TransferPlan(sources=(ModelRef("zoo:fmnist-cnn"),), attacks=("ifgsm",), gammas=(None,),
                    targets=(ModelRef("zoo:fmnist-cnn"),),
                    template=AttackJob(sources=(), data="fmnist:test"),
                    forward=("iaa:beta=5",))


def _quiet(_message: str) -> None:
    pass


def test_finished_folders_are_scored_on_new_targets_without_attacking(tmp_path):
    first = run_transfer(PLAN, tmp_path, OPTS, log=_quiet)
    images = {p: p.read_bytes() for p in tmp_path.rglob("*.png")}
    times = {p: p.stat().st_mtime_ns for p in images}
    wider = dataclasses.replace(PLAN, targets=(*PLAN.targets, ModelRef("zoo:fmnist-vgg")))
    rows, outcomes = score_finished(wider, tmp_path, OPTS, log=_quiet)
    assert {p: p.stat().st_mtime_ns for p in images} == times  # nothing attacked again
    assert [r.target for r in rows] == ["zoo:fmnist-cnn", "zoo:fmnist-vgg"]
    assert rows[0].success_rate == first.rows[0].success_rate and rows[0].n == 4
    assert rows[0].forward == ("iaa:beta=5",)  # the forward method's folder, found by name
    key = next(iter(first.outcomes))
    assert torch.equal(outcomes[key], first.outcomes[key])


def test_a_plan_that_never_ran_is_refused_by_folder(tmp_path):
    with pytest.raises(UserError, match="__forward-iaa-beta=5 is not a finished attack folder: "
                                        "run the plan first"):
        score_finished(PLAN, tmp_path, OPTS, log=_quiet)
