"""Model specs: configs from library metadata, the [0, 1] wrapper, checkpoints, the wu2020 preset."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from skipgrad.cli import main
from skipgrad.errors import MissingWeightsError, UserError
from skipgrad.models import InputAdapter, ModelConfig, load_model, parse_spec, resolve_config
from skipgrad.models.presets import WU2020, check_builds


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 10-class timm test ResNet saved as safetensors that names its own architecture."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"arch": "timm:test_resnet.r160_in1k"})
    return path


@pytest.mark.parametrize("spec, message", [
    ("resnet18", "FAMILY:NAME"), ("hub:resnet18", "unknown model family"),
    ("tv:resnet1520", "did you mean"), ("timm:resnet50.nope", "unknown tag"),
    ("timm:notamodel", "unknown timm model"),
])
def test_bad_specs_are_user_errors(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_config(spec)


def test_torchvision_config_comes_from_weight_metadata() -> None:
    config = resolve_config("tv:resnet152")
    weights = torchvision.models.get_model_weights("resnet152").IMAGENET1K_V1  # a bare spec's
    transforms = weights.transforms()
    assert config.spec == f"tv:resnet152.{weights.name}"
    assert config.input_size == (3, transforms.crop_size[0], transforms.crop_size[0])
    assert config.mean == tuple(transforms.mean) and config.std == tuple(transforms.std)
    assert resolve_config("tv:resnet18.IMAGENET1K_V1").spec == "tv:resnet18.IMAGENET1K_V1"


def test_timm_config_comes_from_pretrained_cfg() -> None:
    config = resolve_config("timm:inception_v3.tf_adv_in1k")
    cfg = timm.models.get_pretrained_cfg("inception_v3.tf_adv_in1k")
    assert config.input_size == tuple(cfg.input_size) == (3, 299, 299)
    assert (config.mean, config.std, config.interpolation) == (cfg.mean, cfg.std, cfg.interpolation)


def test_config_is_frozen_and_attached() -> None:
    model = load_model("timm:test_resnet", pretrained=False)
    assert isinstance(model.config, ModelConfig)
    with pytest.raises(AttributeError):
        model.config.spec = "x"  # type: ignore[misc]


def test_adapter_resizes_repeats_gray_and_normalises() -> None:
    config = resolve_config("timm:inception_v3.tf_adv_in1k")
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    out = InputAdapter(config)(x)
    expected = (F.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bicubic",
                              align_corners=False).clamp(0, 1) - 0.5) / 0.5
    assert out.shape == (2, 3, 299, 299)
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_adapter_refuses_rgb_into_a_grayscale_model() -> None:
    config = ModelConfig("zoo:x", "zoo", "x", (1, 28, 28), (0.5,), (0.5,))
    with pytest.raises(UserError, match="1-channel"):
        InputAdapter(config)(torch.rand(1, 3, 28, 28))


def test_missing_pretrained_weights_give_one_clear_line(monkeypatch) -> None:
    monkeypatch.setenv("SKIPGRAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-skipgrad-cache")
    with pytest.raises(MissingWeightsError) as info:
        load_model("tv:resnet18")
    message = str(info.value)
    assert "weights for tv:resnet18" in message and "not in the local cache" in message
    assert "/nonexistent-skipgrad-cache" in message and "--weights FILE" in message


def test_file_spec_loads_and_hashes(tiny_checkpoint: Path) -> None:
    model = load_model(f"file:{tiny_checkpoint}")
    assert model.config.spec == "timm:test_resnet.r160_in1k" and model.config.num_classes == 10
    assert model.config.weights_sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_weights_flag_accepts_torch_state_dicts(tmp_path: Path) -> None:
    net = timm.create_model("test_resnet", num_classes=7)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "w.pth")
    model = load_model("timm:test_resnet", weights=tmp_path / "w.pth")
    x = torch.rand(1, 3, 160, 160)
    assert torch.allclose(model.net(x), net.eval()(x))


@pytest.mark.parametrize("content, message", [
    ("garbage", "cannot read weights"), ("noarch", "does not say which architecture"),
    ("pickle", "cannot read weights"), ("misfit", "do not fit"),
])
def test_bad_checkpoints_are_user_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / ("w.safetensors" if content in ("garbage", "noarch") else "w.pth")
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif content == "noarch":
        save_file({"w": torch.zeros(2)}, str(path))
    elif content == "pickle":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Path("x")}, path)
    else:
        torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(UserError, match=message):
        spec = f"file:{path}" if content != "misfit" else "timm:test_resnet"
        load_model(spec, weights=None if content != "misfit" else path)


def test_wu2020_preset_resolves_every_paper_model_offline() -> None:
    specs = set(WU2020.sources) | set(WU2020.targets)
    assert len(specs) == 15
    for spec in specs:
        assert check_builds(resolve_config(spec)) > 1_000_000, spec
    assert any("tf_adv" in s for s in specs) and any("ens_adv" in s for s in specs)


def test_models_command_lists_the_preset(capsys) -> None:
    assert main(["models", "--preset", "wu2020", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    by_spec = {r["spec"]: r for r in rows}
    assert by_spec["timm:inception_v4.tf_in1k"]["input_size"] == [3, 299, 299]
    assert by_spec["tv:resnet152.IMAGENET1K_V1"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert {r["weights"] for r in rows} <= {"cached", "not cached"}


def test_parse_spec_splits_family() -> None:
    assert parse_spec("file:/a:b.pth") == ("file", "/a:b.pth")


def test_zoo_spec_resolves_to_fmnist_input() -> None:
    config = resolve_config("zoo:fmnist-cnn")
    assert config.input_size == (1, 28, 28) and config.num_classes == 10
    with pytest.raises(UserError, match="unknown zoo model"):
        resolve_config("zoo:fmnist-nope")


# ---------------------------------------------------------------- issue 24, item 2: bare tv: specs

@pytest.mark.parametrize("arch", ["resnet50", "resnet152", "wide_resnet50_2", "densenet121",
                                  "vgg19", "mobilenet_v2"])
def test_a_bare_tv_spec_means_the_original_weights_of_the_transfer_papers(arch: str) -> None:
    enum = torchvision.models.get_model_weights(arch)
    config = resolve_config(f"tv:{arch}")
    assert config.spec == f"tv:{arch}.IMAGENET1K_V1"
    v1 = enum.IMAGENET1K_V1.transforms()
    assert (config.mean, config.std) == (tuple(v1.mean), tuple(v1.std))
    # torchvision's DEFAULT stays one tag away, under its own name
    assert resolve_config(f"tv:{arch}.DEFAULT").spec == f"tv:{arch}.{enum.DEFAULT.name}"


def test_the_newer_torchvision_weights_are_asked_for_by_tag() -> None:
    assert torchvision.models.ResNet50_Weights.DEFAULT.name == "IMAGENET1K_V2"  # the trap
    assert resolve_config("tv:resnet50.IMAGENET1K_V2").spec == "tv:resnet50.IMAGENET1K_V2"
    assert resolve_config("tv:resnet50").spec != resolve_config("tv:resnet50.DEFAULT").spec
    with pytest.raises(UserError, match="available: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        resolve_config("tv:resnet50.V3")


def test_an_architecture_without_v1_weights_keeps_torchvisions_default() -> None:
    enum = torchvision.models.get_model_weights("vit_h_14")
    assert "IMAGENET1K_V1" not in enum.__members__
    assert resolve_config("tv:vit_h_14").spec == f"tv:vit_h_14.{enum.DEFAULT.name}"


def test_missing_weights_name_the_v1_file_a_bare_spec_wants(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SKIPGRAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    with pytest.raises(MissingWeightsError) as info:
        load_model("tv:resnet50")
    message = str(info.value)
    v1, v2 = (Path(w.url).name for w in torchvision.models.ResNet50_Weights)
    assert "weights for tv:resnet50.IMAGENET1K_V1 are not in the local cache" in message
    assert str(tmp_path / "cache" / "hub" / "checkpoints" / v1) in message and v2 not in message


def test_models_lists_a_given_spec_as_it_resolves(capsys) -> None:
    assert main(["models", "tv:resnet50", "tv:resnet50.IMAGENET1K_V2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert [r["spec"] for r in rows] == ["tv:resnet50.IMAGENET1K_V1", "tv:resnet50.IMAGENET1K_V2"]
    assert [r["roles"] for r in rows] == [["given"], ["given"]]
    assert main(["models", "tv:resnet50"]) == 0
    assert "tv:resnet50.IMAGENET1K_V1" in capsys.readouterr().out


def test_named_spec_resolves_hub_specs_and_keeps_local_ones() -> None:
    from skipgrad.models.loading import named_spec

    assert named_spec("tv:resnet50+jpeg:75") == "tv:resnet50.IMAGENET1K_V1+jpeg:75"
    assert named_spec("tv:resnet50", "my.safetensors") == "tv:resnet50"  # the file's weights
    assert named_spec("zoo:fmnist-cnn") == "zoo:fmnist-cnn"


def test_attack_and_evaluate_name_the_weights_a_bare_spec_resolved_to(
        monkeypatch, tmp_path: Path, capsys) -> None:
    """The real loading path, offline: a random MobileNet-V2 state dict stands in the torch hub
    cache under the V1 file's name (the name's hash check is switched off for it)."""
    from skipgrad.models import hub

    monkeypatch.setenv("SKIPGRAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "expected_sha256", lambda _path: None)
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    cached = tmp_path / "cache" / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), cached)
    out = tmp_path / "run"
    assert main(["attack", "--source", "tv:mobilenet_v2", "--data", "fmnist:test", "--limit", "2",
                 "--steps", "1", "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    assert "images from tv:mobilenet_v2.IMAGENET1K_V1 in" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["sources"] == ["tv:mobilenet_v2.IMAGENET1K_V1"]
    assert run["environment"]["models"][0]["weights"] == str(cached)
    assert main(["evaluate", str(out), "--target", "tv:mobilenet_v2", "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert list(json.loads((tmp_path / "e.json").read_text())["targets"]) == [
        "tv:mobilenet_v2.IMAGENET1K_V1"]
