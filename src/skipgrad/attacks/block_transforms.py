"""Block transforms of an input copy: structure invariance (SIA) and block shuffle and rotation
(BSR).

Both cut each image into a grid of blocks and change every block; the attack averages the
gradients of many such copies (:mod:`skipgrad.attacks.companions`). Each ``draw_*`` function takes
one copy's random parameters for every image from its own stream (so an image's copy never
depends on the batch it sits in) and the matching ``apply_*`` applies them, differentiably.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from skipgrad.attacks.randomness import PerImageRandom

# ---- SIA: Wang, Zhang & Zhang, ICCV 2023, "Structure Invariant Transformation for better
# Adversarial Transferability" (authors' release: xiaosen-wang/SIT). Each block of an s x s grid
# with random cut points gets one transformation drawn uniformly from the authors' ten (their
# TransferAttack port keeps seven: no resize, DCT or dropout). Unlike both, each image of a batch
# gets its own cuts and transformations, from its own stream.
SIA_OPERATIONS = ("resize", "vertical_shift", "horizontal_shift", "vertical_flip",
                  "horizontal_flip", "rotate180", "scale", "noise", "dct", "dropout")
SIA_RESIZE = 0.8  # "resize": down to int(0.8 * side) + 1 pixels, then back up (bilinear)
SIA_NOISE = 16 / 255  # "noise": uniform noise of this amplitude, then clipped to [0, 1]
SIA_DCT_DROP = 0.4  # "dct": the highest 40% of the DCT frequencies along each axis are removed
SIA_DROPOUT = 0.1  # "dropout": each channel dropped with this probability, the others rescaled


@dataclass(frozen=True)
class BlockOperation:
    """One block's SIA transformation: ``name`` from :data:`SIA_OPERATIONS`; ``param`` in [0, 1)
    is the shift as a fraction of the side or the scale factor; ``keep`` the channels that
    ``dropout`` keeps; ``noise`` the block's uniform draws for ``noise``."""

    name: str
    param: float
    keep: tuple[bool, ...]
    noise: torch.Tensor | None = None


@dataclass(frozen=True)
class StructureDraw:
    """One image's SIA copy: block boundaries along rows and columns (from 0 to the side) and
    one operation per block, row by row."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    operations: tuple[BlockOperation, ...]


def draw_structure(rng: PerImageRandom, shape: tuple[int, int, int],
                   blocks: int) -> list[StructureDraw]:
    """Draw one SIA copy per image of ``shape`` (C, H, W) with ``blocks`` x ``blocks`` blocks:
    ``blocks - 1`` distinct cut points per side, an operation and its parameters per block."""
    channels, height, width = shape
    count = blocks * blocks
    u = rng.uniform((height - 1 + width - 1 + count * (2 + channels),))
    draws, noise_sizes = [], []
    for row in u:
        rows = _cut_points(row[:height - 1], height, blocks)
        cols = _cut_points(row[height - 1:height + width - 2], width, blocks)
        rest = row[height + width - 2:].view(count, 2 + channels).tolist()
        operations = [BlockOperation(SIA_OPERATIONS[min(int(r[0] * 10), 9)], r[1],
                                     tuple(v >= SIA_DROPOUT for v in r[2:])) for r in rest]
        draws.append((rows, cols, operations))
        sizes = [channels * (r1 - r0) * (c1 - c0) for r0, r1 in pairwise(rows)
                 for c0, c1 in pairwise(cols)]
        noise_sizes.append([n if op.name == "noise" else 0 for n, op in zip(sizes, operations)])
    # Noise only for the blocks that add it, so the draw grows with them, not with the image.
    noises = rng.uniform_each([(sum(sizes),) for sizes in noise_sizes])
    return [_with_noise(rows, cols, ops, noise.split(sizes))
            for (rows, cols, ops), noise, sizes in zip(draws, noises, noise_sizes)]


def _with_noise(rows: tuple[int, ...], cols: tuple[int, ...], operations: list[BlockOperation],
                noises: tuple[torch.Tensor, ...]) -> StructureDraw:
    shaped = []
    blocks = [(r1 - r0, c1 - c0) for r0, r1 in pairwise(rows) for c0, c1 in pairwise(cols)]
    for op, noise, (h, w) in zip(operations, noises, blocks):
        if op.name == "noise":
            op = BlockOperation(op.name, op.param, op.keep, noise.view(-1, h, w))
        shaped.append(op)
    return StructureDraw(rows, cols, tuple(shaped))


def _cut_points(u: torch.Tensor, length: int, blocks: int) -> tuple[int, ...]:
    # A uniformly random subset of blocks - 1 cut points among 1..length-1 (the order of the
    # draws), as the authors' sampling without replacement; plus both ends.
    inner = (torch.argsort(u, stable=True)[:blocks - 1] + 1).tolist()
    return (0, *sorted(inner), length)


def apply_structure(x: torch.Tensor, draws: list[StructureDraw]) -> torch.Tensor:
    """The SIA copy of every image of ``x`` (N, C, H, W). Differentiable."""
    return torch.stack([_structure_image(image, draw) for image, draw in zip(x, draws)])


def _structure_image(image: torch.Tensor, draw: StructureDraw) -> torch.Tensor:
    operations = iter(draw.operations)
    rows = []
    for r0, r1 in pairwise(draw.rows):
        rows.append(torch.cat([_SIA[op.name](image[:, r0:r1, c0:c1], op)
                               for (c0, c1), op in zip(pairwise(draw.cols), operations)], -1))
    return torch.cat(rows, -2)


def _resize(block: torch.Tensor, op: BlockOperation) -> torch.Tensor:
    h, w = block.shape[-2:]
    small = F.interpolate(block[None], size=(int(h * SIA_RESIZE) + 1, int(w * SIA_RESIZE) + 1),
                          mode="bilinear", align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def _dct_lowpass(block: torch.Tensor, op: BlockOperation) -> torch.Tensor:
    h, w = block.shape[-2:]
    return lowpass_matrix(h).to(block) @ block @ lowpass_matrix(w).to(block).T


@functools.lru_cache(maxsize=64)
def lowpass_matrix(n: int) -> torch.Tensor:
    """The projection of length-``n`` signals onto their lowest ``n - int(0.4 n)`` DCT-II
    frequencies (SIA's "dct"). Keeps every frequency when ``int(0.4 n)`` is 0, where the
    authors' slice ``[-0:]`` would remove them all."""
    keep = n - int(n * SIA_DCT_DROP)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)  # orthonormal DCT-II rows
    return (basis[:keep].T @ basis[:keep]).float()


def _dropout(block: torch.Tensor, op: BlockOperation) -> torch.Tensor:
    keep = torch.tensor(op.keep, dtype=block.dtype, device=block.device)
    return block * (keep / (1 - SIA_DROPOUT))[:, None, None]


def _noise(block: torch.Tensor, op: BlockOperation) -> torch.Tensor:
    assert op.noise is not None
    return (block + (2 * op.noise.to(block) - 1) * SIA_NOISE).clamp(0, 1)


_SIA = {
    "resize": _resize,
    "vertical_shift": lambda b, op: b.roll(int(op.param * b.shape[-2]), dims=-2),
    "horizontal_shift": lambda b, op: b.roll(int(op.param * b.shape[-1]), dims=-1),
    "vertical_flip": lambda b, op: b.flip(-2),
    "horizontal_flip": lambda b, op: b.flip(-1),
    "rotate180": lambda b, op: b.flip((-2, -1)),
    "scale": lambda b, op: b * op.param,
    "noise": _noise,
    "dct": _dct_lowpass,
    "dropout": _dropout,
}


# ---- BSR: Wang, He, Wang & Wang, CVPR 2024, "Boosting Adversarial Transferability by Block
# Shuffle and Rotation" (authors' release: Trustworthy-AI-Group/BSR). The image is cut into an
# n x n grid of random-sized blocks; the block rows and the block columns are shuffled and every
# block is rotated about its centre by its own angle. As the authors' TensorFlow release: a 2 x 2
# grid, one angle per block; angles uniform in [-24, 24] degrees as their PyTorch port in
# TransferAttack (the TensorFlow release draws a truncated normal of 0.2 rad). That port (and
# torchattack's) cuts 3 x 3 and rotates whole strips before cutting them into blocks.

@dataclass(frozen=True)
class ShuffleDraw:
    """One image's BSR copy: block heights and widths in input order, the input block row (and
    column) placed at each output position, and one angle in degrees per output block, row by
    row."""

    heights: tuple[int, ...]
    widths: tuple[int, ...]
    row_order: tuple[int, ...]
    col_order: tuple[int, ...]
    angles: tuple[float, ...]


def draw_shuffle(rng: PerImageRandom, size: tuple[int, int], blocks: int,
                 max_angle: float) -> list[ShuffleDraw]:
    """Draw one BSR copy per image of ``size`` (H, W): random block sizes (the authors' uniform
    weights, rounded), a permutation of the block rows and one of the block columns, and a
    rotation angle uniform in [-max_angle, max_angle] degrees for every block."""
    n = blocks
    draws = []
    for u in rng.uniform((4 * n + n * n,)):
        draws.append(ShuffleDraw(
            block_lengths(u[:n].tolist(), size[0]), block_lengths(u[n:2 * n].tolist(), size[1]),
            tuple(torch.argsort(u[2 * n:3 * n], stable=True).tolist()),
            tuple(torch.argsort(u[3 * n:4 * n], stable=True).tolist()),
            tuple(((2 * u[4 * n:] - 1) * max_angle).tolist())))
    return draws


def block_lengths(weights: list[float], length: int) -> tuple[int, ...]:
    """Split ``length`` pixels into blocks proportional to ``weights``, rounded, the remainder on
    the largest block (the authors' rule), except that no block is empty; ``length`` must be at
    least the number of blocks."""
    total = max(sum(weights), 1e-12)
    lengths = [max(1, round(w / total * length)) for w in weights]
    while sum(lengths) != length:
        lengths[lengths.index(max(lengths))] += 1 if sum(lengths) < length else -1
    return tuple(lengths)


def apply_shuffle(x: torch.Tensor, draws: list[ShuffleDraw]) -> torch.Tensor:
    """The BSR copy of every image of ``x`` (N, C, H, W). Differentiable."""
    return torch.stack([_shuffle_image(image, draw) for image, draw in zip(x, draws)])


def _shuffle_image(image: torch.Tensor, draw: ShuffleDraw) -> torch.Tensor:
    grid = [strip.split(draw.widths, dim=-1) for strip in image.split(draw.heights, dim=-2)]
    angles = iter(draw.angles)
    rows = [torch.cat([rotate_block(grid[r][c], next(angles)) for c in draw.col_order], -1)
            for r in draw.row_order]
    return torch.cat(rows, -2)


def rotate_block(block: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a (C, h, w) block about its centre by ``degrees`` (clockwise as displayed, row 0
    at the top; 90 degrees on a square block is ``torch.rot90(block, -1, (1, 2))``): bilinear,
    zero where the rotated block does not reach, same size."""
    if degrees == 0:
        return block
    channels, h, w = block.shape
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # affine_grid works in [-1, 1] coordinates per axis: rescale so the rotation is in pixels.
    theta = torch.tensor([[[c, s * h / w, 0.0], [-s * w / h, c, 0.0]]], dtype=block.dtype,
                         device=block.device)
    grid = F.affine_grid(theta, [1, channels, h, w], align_corners=False)
    return F.grid_sample(block[None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0]
