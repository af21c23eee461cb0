"""Why TGR collapses the white-box attack on the zoo ViT: an ablation, part by part.

Token Gradient Regularization (``skipgrad.tgr``) scales three gradients of every transformer block
and zeroes, per channel, the tokens with the most extreme gradient. On the zoo's ViT
(``zoo:fmnist-vit``: 6 blocks, 4 heads, 16 patch tokens + 1 class token) it removes most of the
white-box strength (docs/backward.md). This script takes the method apart on that model:

* a hand-written copy of the ViT forward (explicit attention) with TGR's edits placed where the
  authors' release places them -- the ``qkv`` projection output, the softmax input, the MLP
  output -- written here independently of ``skipgrad.backward.token_gradient_regularization``; its defaults must reproduce
  ``skipgrad.tgr`` (the first rows of the table are that cross-check);
* variants: the scales alone (``top_k=0``), the zeroing alone (scales 1), the zeroing at one of
  the three places only, and the class token never chosen as an extreme token;
* for each: the per-image cosine between the variant's input gradient and the plain one at the
  clean images, and the white-box success of the attack (``skipgrad.attack``, 8-bit output,
  success = 1 - top-1 accuracy, all images counted, as in the study);
* per block, at the clean images with the default edits: the share of each edited gradient's
  energy at the class token, the share the zeroing removes, and the class token's largest
  attention weight on a patch.

    OMP_NUM_THREADS=1 python scripts/tgr_anatomy.py --limit 200
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

import skipgrad
from skipgrad.backward.registry import parse_backward
from skipgrad.data.fmnist import load_fmnist
from skipgrad.models.loading import load_model

PARTS = ("scores", "qkv", "mlp")
RELEASE_SCALES = {"scores": 0.25, "qkv": 0.75, "mlp": 0.5}


@dataclass
class Edits:
    """Which gradients are zeroed and scaled, and whether the class token may be chosen."""

    zero: tuple[str, ...] = PARTS
    scales: dict[str, float] = field(default_factory=lambda: dict(RELEASE_SCALES))
    class_token_candidate: bool = True


def zero_extreme_tokens(grad: torch.Tensor, first: int) -> torch.Tensor:
    """(B, N, C): per image and channel, the arg-max and arg-min token among tokens ``first:``
    set to zero."""
    candidates = grad[:, first:]
    out = grad.clone()
    for index in (candidates.argmax(1, keepdim=True), candidates.argmin(1, keepdim=True)):
        out.scatter_(1, index + first, 0.0)
    return out


def zero_extreme_rows_columns(grad: torch.Tensor, first: int) -> torch.Tensor:
    """(B, H, N, N): per image and head, the row and column of the arg-max and arg-min entry of
    the sub-matrix ``[first:, first:]`` set to zero."""
    candidates = grad[..., first:, first:].flatten(-2)
    width = grad.shape[-1] - first
    keep = torch.ones_like(grad)
    for flat in (candidates.argmax(-1), candidates.argmin(-1)):
        rows, columns = flat // width + first, flat % width + first
        for b, h in torch.cartesian_prod(torch.arange(grad.shape[0]), torch.arange(grad.shape[1])):
            keep[b, h, rows[b, h], :] = 0.0
            keep[b, h, :, columns[b, h]] = 0.0
    return grad * keep


def energy_share(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """Per image: squared norm of ``part`` over squared norm of ``whole`` (0 where both are 0)."""
    return part.pow(2).flatten(1).sum(1) / whole.pow(2).flatten(1).sum(1).clamp_min(1e-30)


class HandTGR(nn.Module):
    """The zoo ViT's forward spelled out, with TGR's edits as tensor hooks where the release puts
    them; ``records`` collects per-hook diagnostics when it is a list."""

    def __init__(self, model: nn.Module, edits: Edits | None) -> None:
        super().__init__()
        self.model, self.edits = model, edits  # model: load_model's WrappedModel(SmallViT)
        self.records: list[tuple[int, str, str, torch.Tensor]] | None = None
        self._most_attended: dict[int, torch.Tensor] = {}
        vit = model.net.vit
        for blk in vit.blocks:  # the spelled-out block assumes the plain ViT block
            assert all(isinstance(m, nn.Identity) for m in (
                blk.ls1, blk.ls2, blk.drop_path1, blk.drop_path2, blk.attn.q_norm,
                blk.attn.k_norm, blk.attn.norm))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.model.net.vit
        x = self.model.net.normalize(self.model.adapter(images))
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for index, blk in enumerate(vit.blocks):
            x = self._block(index, blk, x)
        return vit.forward_head(vit.norm(x))

    def _block(self, index: int, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn = blk.attn
        batch, tokens, width = x.shape
        qkv = self._hook(index, "qkv", attn.qkv(blk.norm1(x)))
        q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = self._hook(index, "scores", q @ k.transpose(-2, -1) * attn.scale)
        weights = scores.softmax(dim=-1)
        if self.records is not None:  # the class token's largest weight on one patch, per head
            largest, patch = weights[:, :, 0, 1:].detach().max(-1)
            self.records.append((index, "cls-attn", "max", largest.median(1).values))
            self._most_attended[index] = patch + 1  # (B, H): token index of that patch
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + attn.proj(out)
        return x + self._hook(index, "mlp", blk.mlp(blk.norm2(x)))

    def _value_hits(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """Per image: the share of value channels whose arg-max or arg-min token is the patch the
        class token attends to most in that channel's head."""
        batch, tokens, width = grad.shape
        heads = self._most_attended[index].shape[1]
        value = grad[..., 2 * width // 3:].reshape(batch, tokens, heads, -1)
        extreme = torch.stack([value.argmax(1), value.argmin(1)])  # (2, B, H, D)
        hit = (extreme == self._most_attended[index][None, :, :, None]).any(0)
        return hit.float().flatten(1).mean(1)

    def _hook(self, index: int, part: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.edits is None or not tensor.requires_grad:
            return tensor
        edits = self.edits
        first = 0 if edits.class_token_candidate else 1

        def edit(grad: torch.Tensor) -> torch.Tensor:
            out = grad
            if part in edits.zero and part == "scores":
                out = zero_extreme_rows_columns(grad, first)
            elif part in edits.zero:
                out = zero_extreme_tokens(grad, first)
            if self.records is not None:
                at_class = grad[:, :, 0, :] if part == "scores" else grad[:, 0]
                self.records.append((index, part, "class", energy_share(at_class, grad)))
                self.records.append((index, part, "removed", energy_share(grad - out, grad)))
                if part == "qkv":
                    self.records.append((index, part, "patch", self._value_hits(index, grad)))
            return out * edits.scales[part]

        tensor.register_hook(edit)
        return tensor


def input_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   context: ContextManager | None = None) -> torch.Tensor:
    """Gradient of the summed cross-entropy with respect to the images, inside ``context``."""
    x = images.clone().requires_grad_(True)
    with context or contextlib.nullcontext():
        return torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)[0]


@dataclass
class Variant:
    """One row of the table: the network to differentiate (the model itself or a HandTGR copy)
    and the skipgrad method entered around it, if any."""

    name: str
    model: Callable[[nn.Module], nn.Module]
    backward: str | None = None


def variants() -> list[Variant]:
    ones = {part: 1.0 for part in PARTS}
    hand = lambda **kw: (lambda m: HandTGR(m, Edits(**kw)))  # noqa: E731
    same = lambda m: m  # noqa: E731
    return [
        Variant("plain", same),
        Variant("skipgrad.tgr, defaults", same, "tgr"),
        Variant("hand-written TGR, defaults", hand()),
        Variant("scales only (tgr:top_k=0)", same, "tgr:top_k=0"),
        Variant("zeroing only (tgr:*_scale=1)", same,
                "tgr:attention_scale=1,qkv_scale=1,mlp_scale=1"),
        Variant("zeroing at the scores only, scales 1", hand(zero=("scores",), scales=ones)),
        Variant("zeroing at Q/K/V only, scales 1", hand(zero=("qkv",), scales=ones)),
        Variant("zeroing at the MLP only, scales 1", hand(zero=("mlp",), scales=ones)),
        Variant("defaults, class token never zeroed", hand(class_token_candidate=False)),
        Variant("pna (for comparison)", same, "pna"),
    ]


def evaluate(variant: Variant, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             plain: torch.Tensor, attack: str) -> tuple[torch.Tensor, float]:
    """Per-image cosine with the plain gradient, and white-box success (%) of ``attack``."""
    net = variant.model(model)
    context = None
    if variant.backward is not None:
        (context,) = parse_backward(variant.backward).build(net)
    grad = input_gradient(net, images, labels, context)
    cosine = F.cosine_similarity(grad.flatten(1), plain.flatten(1))
    adv = skipgrad.attack(net, images, labels, attack, backward=variant.backward)
    with torch.no_grad():
        success = (model(adv).argmax(1) != labels).float().mean().item() * 100
    return cosine, success


def diagnostics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Per block, medians over images of the hook records of the default edits."""
    hand = HandTGR(model, Edits())
    hand.records = []
    input_gradient(hand, images, labels)
    table: dict[tuple[int, str, str], float] = {
        (i, part, what): values.median().item() for i, part, what, values in hand.records}
    mean = {i: values.mean().item() for i, part, what, values in hand.records
            if what == "patch"}  # a share of channels: its mean over images
    print("\nPer block, medians over images (last column: mean), default edits, clean images; "
          "energy = squared norm.")
    print("| block | class-token share: MLP-out grad | score grad (class row) | Q/K/V grad "
          "| removed by zeroing: MLP | scores | Q/K/V "
          "| class token's largest weight on one patch (median over heads) "
          "| value channels zeroed at that patch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i in range(len(model.net.vit.blocks)):
        get = lambda part, what: table.get((i, part, what), float("nan"))  # noqa: E731
        print(f"| {i} | {get('mlp', 'class'):.3f} | {get('scores', 'class'):.3f} | "
              f"{get('qkv', 'class'):.3f} | {get('mlp', 'removed'):.3f} | "
              f"{get('scores', 'removed'):.3f} | {get('qkv', 'removed'):.3f} | "
              f"{get('cls-attn', 'max'):.3f} | {mean[i]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="first N Fashion-MNIST test images")
    parser.add_argument("--attack", default="ifgsm", help="attack of the white-box column")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("zoo:fmnist-vit").eval()
    images, labels = load_fmnist("test", limit=args.limit)
    plain = input_gradient(model, images, labels)
    print(f"zoo:fmnist-vit (pooling: {model.net.vit.global_pool!r}), first {args.limit} test "
          f"images, white-box {args.attack} (eps 16/255, step 2/255, 10 steps)")
    ours = input_gradient(model, images, labels, skipgrad.tgr(model))
    hand = input_gradient(HandTGR(model, Edits()), images, labels)
    print(f"skipgrad.tgr vs the hand-written TGR: max |difference| / max |gradient| = "
          f"{((ours - hand).abs().max() / hand.abs().max()).item():.1e}\n")
    print("| variant | cosine with the plain gradient: median [quartiles] "
          "| white-box success (%) |")
    print("|---|---|---:|")
    for variant in variants():
        cosine, success = evaluate(variant, model, images, labels, plain, args.attack)
        q1, q2, q3 = cosine.quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()
        print(f"| {variant.name} | {q2:.3f} [{q1:.3f}, {q3:.3f}] | {success:.1f} |", flush=True)
    diagnostics(model, images, labels)


if __name__ == "__main__":
    main()
