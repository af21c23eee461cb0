"""Named groups of model specs, e.g. the zoo of Wu et al. (ICLR 2020), and offline construction checks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skipgrad.errors import UserError
from skipgrad.models.loading import ZOO_PREFIX, _architecture, resolve_config, zoo_specs
from skipgrad.models.specs import ModelConfig


@dataclass(frozen=True)
class Preset:
    """Sources to attack from and targets to transfer to."""

    name: str
    description: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]


# The paper used torchvision's original ImageNet weights (V1) for its sources and the
# `pretrainedmodels` targets, whose timm equivalents are named here; the adversarially trained
# Inception models are the two timm ships (Tramer et al. 2018).
WU2020 = Preset(
    name="wu2020",
    description="Wu et al., ICLR 2020, Table 1: ResNet/DenseNet sources, 7 + 2 adv. trained targets",
    sources=tuple(f"tv:resnet{d}.IMAGENET1K_V1" for d in (18, 34, 50, 101, 152))
    + tuple(f"tv:densenet{d}.IMAGENET1K_V1" for d in (121, 169, 201)),
    targets=("tv:vgg19.IMAGENET1K_V1", "tv:resnet152.IMAGENET1K_V1",
             "tv:densenet201.IMAGENET1K_V1", "timm:legacy_senet154.in1k",
             "timm:inception_v3.tv_in1k", "timm:inception_v4.tf_in1k",
             "timm:inception_resnet_v2.tf_in1k", "timm:inception_v3.tf_adv_in1k",
             "timm:inception_resnet_v2.tf_ens_adv_in1k"),
)


def fmnist_preset() -> Preset:
    """The bundled Fashion-MNIST zoo: every architecture is both a source and a target."""
    specs = tuple(zoo_specs())
    return Preset("fmnist", "bundled Fashion-MNIST zoo (trained by this project)", specs, specs)


# The defenses of the defended study (docs/study.md): each around two plain targets.
DEFENDED_WRAPPERS = ("jpeg:75", "bits:4", "median:3", "smooth:0.1,n=16")


def fmnist_defended_preset() -> Preset:
    """Defended Fashion-MNIST targets: the adversarially trained zoo members, and the plain CNN
    and VGG behind each input-transformation defense. No sources: attack from the fmnist preset."""
    trained = [s for s in zoo_specs(defended=True) if s not in zoo_specs()]
    wrapped = [f"zoo:{ZOO_PREFIX}{plain}+{defense}" for plain in ("cnn", "vgg")
               for defense in DEFENDED_WRAPPERS]
    return Preset("fmnist-defended", "defended Fashion-MNIST targets (adv. trained, input "
                  "transformations)", (), tuple(trained) +
                  tuple(wrapped))


# Every preset by name (built on demand: the zoo's may be missing in an install without it).
PRESETS = {"wu2020": lambda: WU2020, "fmnist": fmnist_preset,
           "fmnist-defended": fmnist_defended_preset}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; raises :class:`UserError` for unknown names."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def preset_help() -> str:
    """One line naming every preset with its description, for ``--help``."""
    described = []
    for name, make in PRESETS.items():
        try:
            described.append(f"{name}: {make().description}")
        except UserError:  # e.g. no zoo in this install
            described.append(name)
    return "; ".join(described)


def check_builds(config: ModelConfig) -> int:
    """Construct the architecture without weights on the meta device; return its parameter count.

    The meta device allocates nothing, so even SENet-154 builds in a blink and offline.
    """
    with torch.device("meta"):
        net = _architecture(config)
    return sum(p.numel() for p in net.parameters())


def describe(spec: str) -> ModelConfig:
    """Resolve a spec's config (no weights) for listings."""
    return resolve_config(spec)
