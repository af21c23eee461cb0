"""Residual-branch placements for the timm and torchvision families beyond ResNet and DenseNet.

Each registration names the modules whose *input* is the tensor where a residual branch splits
from its skip path and which feed only the branch (see :func:`skipgrad.register_block`). Every
choice below was read off the block's ``forward()``; docs/sgm.md tabulates them with the reasons.
Classes are registered by ``"module:Class"`` path, so neither timm nor torchvision is imported here.

Two policies for the first block of each stage (the first registered block in a parent container):

* ResNet-like families whose stages open with a downsampling block that has a projection shortcut
  keep that block undecayed, as the authors' release does for ResNets
  (``decay_first_in_stage=False``).
* Families whose residual blocks all have identity skips (transformers, Mixer, ConvNeXt, inverted
  residuals, Inception-ResNet) decay every block: a block without a skip simply reports no entries.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from skipgrad.backward.blocks import BranchEntries, BranchExit, last_present, register_block


def _attrs(*names: str) -> BranchEntries:
    """Entries given by attribute names; attributes that are ``None`` or absent are left out."""

    def entries(block: nn.Module) -> Sequence[nn.Module]:
        found = (getattr(block, name, None) for name in names)
        return [module for module in found if isinstance(module, nn.Module)]

    return entries


def _when(flag: str, *names: str) -> BranchEntries:
    """Entries ``names`` only when the block's boolean attribute ``flag`` says it has a skip."""
    pick = _attrs(*names)
    return lambda block: pick(block) if getattr(block, flag, False) else []


def _when_shortcut(*names: str) -> BranchEntries:
    # timm RegNet: `downsample is None` means "no shortcut at all" (identity is nn.Identity()).
    pick = _attrs(*names)
    return lambda block: pick(block) if block.downsample is not None else []


def _preact(block: nn.Module) -> Sequence[nn.Module]:
    # Pre-activation: with an identity skip, x feeds the skip and norm1 (branch only). A projection
    # shortcut reads norm1's output, so the branch then starts at conv1.
    return [block.norm1] if block.downsample is None else [block.conv1]


def _first_present(flag: str, *names: str) -> BranchEntries:
    """The first of ``names`` the block has (e.g. an optional space-to-depth conv), if it skips."""

    def entries(block: nn.Module) -> Sequence[nn.Module]:
        present = _attrs(*names)(block)
        return present[:1] if getattr(block, flag, False) else []

    return entries


def _parallel_things(block: nn.Module) -> Sequence[nn.Module]:
    # Each parallel attention / FFN path is a Sequential that opens with its own norm; with a mask
    # timm calls `path.norm` directly, so hook the norms rather than the Sequentials.
    return [path.norm for path in (*block.attns, *block.ffns)]


def _no_exact_placement(block: nn.Module) -> Sequence[nn.Module]:
    # CondConv: the pooled input also routes the expert weights of every conv in the branch, and
    # a pre-hook on conv_pw would scale that routing path twice. Left out rather than half right.
    return []


# (class path, branch entries, decay the first block of each stage too)
_RESNET_LIKE: tuple[tuple[str, BranchEntries], ...] = (
    ("timm.models.senet:Bottleneck", _attrs("conv1")),           # SE-ResNet(-Xt), SENet-154
    ("timm.models.senet:SEResNetBlock", _attrs("conv1")),        # legacy SE-ResNet-18/34
    ("timm.models.resnetv2:PreActBasic", _preact),
    ("timm.models.resnetv2:PreActBottleneck", _preact),
    ("timm.models.resnetv2:Bottleneck", _attrs("conv1")),        # non-pre-activation ResNetV2
    ("timm.models.regnet:Bottleneck", _when_shortcut("conv1")),
    ("timm.models.regnet:PreBottleneck", _when_shortcut("conv1")),
    ("torchvision.models.regnet:ResBottleneckBlock", _attrs("f")),
)

_IDENTITY_SKIP: tuple[tuple[str, BranchEntries], ...] = (
    ("timm.models.inception_resnet_v2:Block35", _attrs("branch0", "branch1", "branch2")),
    ("timm.models.inception_resnet_v2:Block17", _attrs("branch0", "branch1")),
    ("timm.models.inception_resnet_v2:Block8", _attrs("branch0", "branch1")),
    ("timm.models._efficientnet_blocks:ConvBnAct", _when("has_skip", "conv")),
    ("timm.models._efficientnet_blocks:DepthwiseSeparableConv",
     _first_present("has_skip", "conv_s2d", "conv_dw")),
    ("timm.models._efficientnet_blocks:InvertedResidual",
     _first_present("has_skip", "conv_s2d", "conv_pw")),
    ("timm.models._efficientnet_blocks:CondConvResidual", _no_exact_placement),
    ("timm.models._efficientnet_blocks:EdgeResidual", _when("has_skip", "conv_exp")),
    ("timm.models._efficientnet_blocks:UniversalInvertedResidual", _when("has_skip", "dw_start")),
    ("timm.models._efficientnet_blocks:MobileAttention", _when("has_skip", "norm")),
    ("torchvision.models.mobilenetv2:InvertedResidual", _when("use_res_connect", "conv")),
    ("torchvision.models.mobilenetv3:InvertedResidual", _when("use_res_connect", "block")),
    ("torchvision.models.efficientnet:MBConv", _when("use_res_connect", "block")),
    ("torchvision.models.efficientnet:FusedMBConv", _when("use_res_connect", "block")),
    ("timm.models.convnext:ConvNeXtBlock", _attrs("conv_dw")),
    ("torchvision.models.convnext:CNBlock", _attrs("block")),
    ("timm.models.vision_transformer:Block", _attrs("norm1", "norm2")),
    ("timm.models.vision_transformer:ResPostBlock", _attrs("attn", "mlp")),
    ("timm.models.vision_transformer:ParallelScalingBlock", _attrs("in_norm")),
    ("timm.models.vision_transformer:DiffParallelScalingBlock", _attrs("in_norm")),
    ("timm.models.vision_transformer:ParallelThingsBlock", _parallel_things),
    ("torchvision.models.vision_transformer:EncoderBlock", _attrs("ln_1", "ln_2")),
    ("timm.models.swin_transformer:SwinTransformerBlock", _attrs("norm1", "norm2")),
    ("torchvision.models.swin_transformer:SwinTransformerBlock", _attrs("norm1", "norm2")),
    # V2 is post-norm (x + norm1(attn(x))): the branch opens at attn and mlp, which read x.
    ("torchvision.models.swin_transformer:SwinTransformerBlockV2", _attrs("attn", "mlp")),
    ("timm.models.mlp_mixer:MixerBlock", _attrs("norm1", "norm2")),
    ("timm.models.mlp_mixer:ResBlock", _attrs("norm1", "norm2")),            # ResMLP
    ("timm.models.mlp_mixer:SpatialGatingBlock", _attrs("norm")),            # gMLP
)


# Where the residual branch ends (its output is added to the skip), for the ResNet-like kinds
# whose branch LinBP can rescale; read off each block's forward(). Each of these blocks adds
# `downsample(...)` when it has one and its own input otherwise (the skip Ghost networks erode).
_EXITS: dict[str, BranchExit] = {
    "timm.models.senet:Bottleneck": last_present("se_module"),
    "timm.models.senet:SEResNetBlock": last_present("se_module"),
    "timm.models.resnetv2:PreActBasic": last_present("drop_path"),
    "timm.models.resnetv2:PreActBottleneck": last_present("drop_path"),
    "timm.models.resnetv2:Bottleneck": last_present("drop_path"),
}


# Identity-skip kinds whose whole branch is one child module, added to the block's input with
# nothing after it (torchvision's MobileNetV2: ``x + self.conv(x)``; MobileNetV3:
# ``result = self.block(x); result += x``), so Ghost and IAA can act on them.
_IDENTITY_EXITS: dict[str, BranchExit] = {
    "torchvision.models.mobilenetv2:InvertedResidual": lambda block: (
        block.conv if block.use_res_connect else None),
    "torchvision.models.mobilenetv3:InvertedResidual": lambda block: (
        block.block if block.use_res_connect else None),
}


def _label(path: str) -> str:
    """``"timm.models.senet:Bottleneck"`` -> ``"timm.senet.Bottleneck"`` (unique across files)."""
    module, cls = path.split(":")
    parts = module.split(".")
    return f"{parts[0]}.{parts[-1].lstrip('_')}.{cls}"


def _register_families() -> None:
    for path, entries in _RESNET_LIKE:
        register_block(path, entries, decay_first_in_stage=False, name=_label(path),
                       branch_exit=_EXITS.get(path),
                       skip_path=last_present("downsample") if path in _EXITS else None)
    for path, entries in _IDENTITY_SKIP:
        exit_ = _IDENTITY_EXITS.get(path)
        register_block(path, entries, decay_first_in_stage=True, name=_label(path),
                       branch_exit=exit_, skip_path=(lambda block: None) if exit_ else None)


_register_families()
