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
    weights = torchvision.models.get_model_weights("resnet152").DEFAULT
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
