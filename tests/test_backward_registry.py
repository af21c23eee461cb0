"""The backward-method registry and the ``METHOD[:key=value,...]`` notation (toy methods stand in
for the real ones, so the plumbing is tested on its own)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import skipgrad
from skipgrad.backward import registry
from skipgrad.backward.registry import (BackwardSpecError, combine, parse_backward, per_source)

from tests.backward_toys import ScaleReLU, halve_by_hand, toy_methods  # noqa: F401 - fixture
from tests.conftest import TinyResNet, randomise_batchnorm


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_defaults_come_from_the_factory_and_values_are_typed(toy_methods):
    plan = parse_backward("scalerelu")
    assert plan.methods[0].settings == (("scale", 0.5), ("start", None), ("skip", 0))
    plan = parse_backward("scalerelu:scale=2,start=3, skip=1")
    assert dict(plan.methods[0].settings) == {"scale": 2.0, "start": "3", "skip": 1}
    assert isinstance(dict(plan.methods[0].settings)["scale"], float)
    assert parse_backward("scalerelu:start=none").methods[0].settings[1] == ("start", None)


def test_label_keeps_only_changed_settings_and_parses_back(toy_methods):
    plan = parse_backward("scalerelu:scale=0.5,skip=1+attnonly")
    assert plan.label == "scalerelu:skip=1+attnonly"
    assert plan.names == ["scalerelu:skip=1", "attnonly"]
    assert parse_backward(plan.label) == plan
    assert parse_backward("scalerelu:scale=1e+0").methods[0].settings[0] == ("scale", 1.0)


@pytest.mark.parametrize("text, message", [
    ("nosuch", "unknown backward method 'nosuch' (known: attnonly, "),
    ("scalerelu:gamma=1", "scalerelu has no setting 'gamma' (known: scale (float), "
                          "start (str|none), skip (int))"),
    ("attnonly:x=1", "attnonly has no setting 'x' (it takes no settings)"),
    ("scalerelu:scale=big", "scalerelu:scale: 'big' is not float"),
    ("scalerelu:skip=0.5", "scalerelu:skip: '0.5' is not int"),
    ("scalerelu:scale=nan", "scalerelu:scale: 'nan' is not float"),
    ("scalerelu:scale", "scalerelu: 'scale' is not key=value"),
    ("scalerelu:skip=1,skip=2", "scalerelu: skip is given twice"),
    ("scalerelu+scalerelu:skip=1", "backward method scalerelu is given twice for one source"),
    ("none+scalerelu", "'none' cannot be combined with other methods"),
    ("", "a backward method is written METHOD[:key=value,...]"),
])
def test_parser_errors_are_one_line_and_say_what_is_known(toy_methods, text, message):
    with pytest.raises(BackwardSpecError) as info:
        parse_backward(text)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_none_is_no_method_and_names_are_case_insensitive(toy_methods):
    assert parse_backward("none") is None and parse_backward(" NONE ") is None
    assert parse_backward("ScaleReLU").label == "scalerelu"


def test_register_method_refuses_duplicates_and_bad_declarations(toy_methods):
    with pytest.raises(ValueError, match="'scalerelu' is already registered"):
        skipgrad.register_method("scalerelu", ScaleReLU, summary="again")
    with pytest.raises(ValueError, match="lower-case identifiers"):
        skipgrad.register_method("Bad-Name", ScaleReLU, summary="x")
    with pytest.raises(TypeError, match="takes no keyword 'gamma'"):
        skipgrad.register_method("other", ScaleReLU, summary="x", settings={"gamma": float})
    with pytest.raises(TypeError, match="setting types must be float, int, str or tuple"):
        skipgrad.register_method("other", ScaleReLU, summary="x", settings={"scale": list})
    assert "other" not in registry.METHODS


def test_a_setting_without_default_must_be_given(toy_methods):
    def factory(model, *, depth: int):
        return ScaleReLU(model)

    skipgrad.register_method("needsdepth", factory, summary="x", settings={"depth": int})
    with pytest.raises(BackwardSpecError, match="needsdepth needs depth=..."):
        parse_backward("needsdepth")
    assert parse_backward("needsdepth:depth=2").label == "needsdepth:depth=2"


def test_per_source_and_combine(toy_methods):
    one = parse_backward("scalerelu")
    assert per_source("scalerelu", 3) == (one, one, one)
    assert per_source(["scalerelu", None], 2) == (one, None)
    with pytest.raises(BackwardSpecError, match="backward has 3 entries for 2 source models"):
        per_source(["scalerelu", None, None], 2)
    assert combine([one, None, parse_backward("attnonly")]).label == "scalerelu+attnonly"
    assert combine([None, None]) is None
    with pytest.raises(BackwardSpecError, match="is a string such as"):
        per_source(3, 1)


def test_build_gives_the_method_context_with_its_settings(toy_methods):
    model = _net()
    (context,) = parse_backward("scalerelu:skip=1").build(model)
    assert isinstance(context, ScaleReLU) and [c.module for c in context.changes] == ["3"]
    with pytest.raises(skipgrad.NothingToChangeError, match="applies to transformers"):
        parse_backward("attnonly").build(model)


# ---------------------------------------------------------------- skipgrad.attack(backward=...)

def _relu_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["ifgsm", "mi"])
def test_attack_backward_equals_the_context_entered_by_hand(toy_methods, tiny_resnet, tiny_batch,
                                                            method):
    images, labels = tiny_batch
    settings = dict(eps=8 / 255, step_size=2 / 255, steps=3, sgm=0.5)
    named = skipgrad.attack(tiny_resnet, images, labels, method, backward="scalerelu:scale=0.25",
                            **settings)
    assert _relu_hooks(tiny_resnet) == 0  # everything removed after the attack
    with ScaleReLU(tiny_resnet, scale=0.25):
        by_hand = skipgrad.attack(tiny_resnet, images, labels, method, **settings)
    handles = halve_by_hand(tiny_resnet, 0.25)  # an independent implementation of the toy
    try:
        independent = skipgrad.attack(tiny_resnet, images, labels, method, **settings)
    finally:
        for handle in handles:
            handle.remove()
    plain = skipgrad.attack(tiny_resnet, images, labels, method, **settings)
    assert torch.equal(named, by_hand) and torch.equal(named, independent)
    assert not torch.equal(named, plain)  # the toy changes the gradient direction here


def test_attack_backward_per_source(toy_methods, tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    torch.manual_seed(3)
    other = randomise_batchnorm(TinyResNet(), seed=3)
    settings = dict(eps=8 / 255, step_size=2 / 255, steps=2)
    mixed = skipgrad.attack([tiny_resnet, other], images, labels, backward=["scalerelu:scale=0.25",
                                                                            None], **settings)
    with ScaleReLU(tiny_resnet, scale=0.25):
        by_hand = skipgrad.attack([tiny_resnet, other], images, labels, **settings)
    assert torch.equal(mixed, by_hand)
    with pytest.raises(BackwardSpecError, match="backward has 1 entries for 2 source models"):
        skipgrad.attack([tiny_resnet, other], images, labels, backward=["scalerelu"], **settings)


def test_attack_refuses_a_method_with_nothing_to_change(toy_methods, tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    with pytest.raises(skipgrad.NothingToChangeError, match="attnonly found no attention layer"):
        skipgrad.attack(tiny_resnet, images, labels, backward="attnonly")
    assert _relu_hooks(tiny_resnet) == 0


def test_attack_backward_linbp_equals_the_context_by_hand(tiny_resnet, tiny_batch):
    images, labels = tiny_batch
    settings = dict(eps=8 / 255, step_size=2 / 255, steps=2, sgm=0.5)
    named = skipgrad.attack(tiny_resnet, images, labels, "mi", backward="linbp:branch_scale=0.5",
                            **settings)
    with skipgrad.linbp(tiny_resnet, branch_scale=0.5):
        by_hand = skipgrad.attack(tiny_resnet, images, labels, "mi", **settings)
    assert torch.equal(named, by_hand)
    assert not torch.equal(named, skipgrad.attack(tiny_resnet, images, labels, "mi", **settings))


# ---------------------------------------------------------------- kinds: --backward and --forward

def test_a_method_of_one_kind_is_refused_where_the_other_kind_is_asked(toy_methods):
    skipgrad.register_method("fwdtoy", ScaleReLU, summary="x", settings={"scale": float},
                             kind="forward")
    assert registry.parse_forward("fwdtoy:scale=2").label == "fwdtoy:scale=2"
    assert "fwdtoy" not in [m.name for m in registry.known_methods()]
    assert "fwdtoy" in [m.name for m in registry.known_methods("forward")]
    with pytest.raises(BackwardSpecError, match=r"^fwdtoy is a forward method \(--forward fwdtoy, "
                                                r"attack\(\.\.\., forward=\.\.\.\)\), not a "
                                                r"backward method \(known: attnonly, "):
        parse_backward("scalerelu+fwdtoy")
    with pytest.raises(BackwardSpecError, match="^unknown forward method 'nosuch' "
                                                r"\(known: fwdtoy, ghost, iaa\)$"):
        registry.parse_forward("nosuch")
    with pytest.raises(BackwardSpecError, match="forward has 2 entries for 1 source models"):
        per_source(["fwdtoy", None], 1, "forward")
    with pytest.raises(BackwardSpecError, match="scalerelu is a backward method"):
        registry.as_plan(parse_backward("scalerelu"), "forward")
    with pytest.raises(ValueError, match="a method's kind is one of backward, forward"):
        skipgrad.register_method("sideways", ScaleReLU, summary="x", kind="sideways")


def test_tuple_settings_parse_from_slashes_and_from_python_sequences(toy_methods):
    def factory(model, *, scales=(1.0, 2.0)):
        return ScaleReLU(model)

    skipgrad.register_method("listy", factory, summary="x", settings={"scales": (float, tuple)})
    assert parse_backward("listy").methods[0].settings == (("scales", (1.0, 2.0)),)
    assert parse_backward("listy:scales=0.5").methods[0].settings == (("scales", 0.5),)
    assert parse_backward("listy:scales=1e+0/3").methods[0].settings == (("scales", (1.0, 3.0)),)
    assert registry.choose("listy", scales=[1, 2.5]).settings == (("scales", (1.0, 2.5)),)
    assert parse_backward("listy:scales=1/2").label == "listy"  # the default, written out
    for bad in ("1/", "1/nan", "a"):
        with pytest.raises(BackwardSpecError, match=r"is not float\|float/float/\.\.\."):
            parse_backward(f"listy:scales={bad}")
    with pytest.raises(BackwardSpecError, match="is not float"):
        registry.choose("listy", scales=[1, True])


def test_attack_spec_keeps_forward_plans_apart_from_backward_ones():
    from skipgrad.attacks import AttackSpec

    spec = AttackSpec(forward="iaa:beta=32", backward="linbp")
    assert spec.forward.label == "iaa:beta=32" and spec.backward.label == "linbp"
    assert spec.forward_per_source(2) == (spec.forward, spec.forward)
    assert AttackSpec(forward=["ghost", None]).forward_per_source(2)[1] is None
    with pytest.raises(BackwardSpecError, match="ghost is a forward method"):
        AttackSpec(backward="ghost")
