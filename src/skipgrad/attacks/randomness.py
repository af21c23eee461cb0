"""Per-image random streams, so an image's random draws never depend on how images are batched."""
from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import torch

from skipgrad.attacks.updates import per_sample_norm


def image_seed(run_seed: int, image_id: int, stream: str = "") -> int:
    """A 63-bit seed for one image, mixed from the run seed and the image id; a named ``stream``
    (e.g. ``"ghost"``) gives a separate sequence, so that a method's draws never shift the
    attack's own (PGD start, DI)."""
    key = f"skipgrad:{run_seed}:{image_id}" + (f":{stream}" if stream else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PerImageRandom:
    """One CPU generator per image; every draw returns a stacked (N, *shape) tensor.

    Drawing on the CPU makes results identical on every device. Each image consumes its own stream
    in the same order whatever the batch it sits in.
    """

    def __init__(self, run_seed: int, image_ids: Sequence[int], stream: str = "") -> None:
        self._generators = [torch.Generator().manual_seed(image_seed(run_seed, int(i), stream))
                            for i in image_ids]

    def __len__(self) -> int:
        """The number of images (streams)."""
        return len(self._generators)

    def uniform(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform draws in [0, 1), shape (N, *shape)."""
        return torch.stack([torch.rand(shape, generator=g) for g in self._generators]).to(device)

    def normal(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """Standard normal draws, shape (N, *shape)."""
        return torch.stack([torch.randn(shape, generator=g) for g in self._generators]).to(device)

    def uniform_each(self, shapes: Sequence[tuple[int, ...]],
                     device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Uniform draws in [0, 1) of a different shape for each image (e.g. the size of a block
        that only this image transforms), one tensor per image."""
        if len(shapes) != len(self._generators):
            raise ValueError(f"{len(shapes)} shapes for {len(self._generators)} images")
        return [torch.rand(shape, generator=g).to(device)
                for shape, g in zip(shapes, self._generators)]


def uniform_in_ball(rng: PerImageRandom, shape: tuple[int, ...], radius: float, norm: str,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """One point per image, uniform in the ``norm`` ball of ``radius`` around 0, shape (N, *shape):
    uniform in the box for L-inf; for L2 a uniform direction times ``radius * u**(1/d)``."""
    if norm == "linf":
        return (2 * rng.uniform(shape, device) - 1) * radius
    direction = rng.normal(shape, device)
    direction = direction / per_sample_norm(direction, 2).clamp_min(1e-12)
    scale = rng.uniform((1,) * len(shape), device) ** (1 / direction[0].numel())
    return direction * scale * radius

def stream_factory(run_seed: int,
                   image_ids: Sequence[int]) -> Callable[[Optional[int], str], PerImageRandom]:
    """``(seed, name) -> PerImageRandom`` for the images ``image_ids`` of a run: the named stream
    of ``seed``, or of ``run_seed`` when ``seed`` is None. What the attack loop hands to the
    contexts that draw random numbers (``BackwardContext.follow_attack``)."""
    ids = list(image_ids)
    return lambda seed, name: PerImageRandom(run_seed if seed is None else seed, ids, stream=name)
