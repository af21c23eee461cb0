"""PNA and TGR overhead: MI attack time inside ``pna`` / ``tgr`` divided by the plain MI attack time
(same ViT, batch and attack, alternating repeats in one run). The last lines printed are the ratios.

    python benchmarks/attention_overhead.py [--arch timm:vit_small_patch16_224 | --arch vit_b_16]
                                            [--batch 1] [--steps 3] [--repeats 5]
"""
from __future__ import annotations

import argparse

import torch
from _common import alternate, source_and_batch

import skipgrad


def vit_and_batch(arch: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A torchvision ViT (``vit_b_16``) or a timm one (``timm:NAME``), random weights, 224 x 224."""
    if not arch.startswith("timm:"):
        return source_and_batch(arch, batch, 224)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch[5:], pretrained=False, num_classes=10).eval()
    return model, torch.rand(batch, 3, 224, 224), torch.randint(0, 10, (batch,))


def main() -> None:
    parser = argparse.ArgumentParser(description="PNA / TGR overhead ratios")
    parser.add_argument("--arch", default="timm:vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, images, labels = vit_and_batch(args.arch, args.batch)

    def mi(context=None):
        def run():
            with context if context is not None else torch.enable_grad():
                skipgrad.attack(model, images, labels, "mi", steps=args.steps)
        return run

    medians = alternate({"mi": mi(), "mi+pna": mi(skipgrad.pna(model)),
                         "mi+tgr": mi(skipgrad.tgr(model))}, args.repeats)
    label = args.arch if args.arch.startswith("timm:") else f"tv:{args.arch}"
    print(f"{label} (random weights), batch {tuple(images.shape)}, {args.repeats} alternating "
          f"repeats, MI {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, seconds in medians.items():
        print(f"median {name}: {seconds:.3f} s")
    print(f"pna_overhead_ratio {medians['mi+pna'] / medians['mi']:.3f}")
    print(f"tgr_overhead_ratio {medians['mi+tgr'] / medians['mi']:.3f}")


if __name__ == "__main__":
    main()
