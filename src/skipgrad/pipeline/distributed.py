"""Sharding work across ``torchrun`` processes (one machine or several).

Launched as ``torchrun --nproc-per-node N -m skipgrad attack ...``, every process sees ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`world` then joins the process group (gloo on CPU, nccl on
CUDA) the first time it is asked. Outside torchrun it is a world of one and nothing is initialised,
so the library and the single-process CLI never pay for (or depend on) ``torch.distributed``.

Helpers here keep the rules of a sharded run in one place:

* work is cut into fixed units (image groups, evaluation batches) *before* sharding, so each unit
  is computed exactly as a single process would compute it, whatever the world size;
* shared files are written by one process (rank 0) or by one process per file (a rank's own PNGs
  and manifest part), never by two;
* an error raised on rank 0 while preparing shared state reaches every rank, so no rank waits
  forever on a collective call that will not come.
"""
from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from skipgrad.errors import UserError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the shared files and prints the results."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1


_WORLD: World | None = None


def launched_rank() -> int:
    """The rank torchrun gave this process (0 when not launched by torchrun); no initialisation."""
    return int(os.environ.get("RANK", "0"))


def world() -> World:
    """The current world, joining the torchrun process group on first use."""
    global _WORLD
    if _WORLD is None:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        _WORLD = World(launched_rank(), size, int(os.environ.get("LOCAL_RANK", "0")))
        if size > 1:
            _init_process_group(_WORLD)
    return _WORLD


def _init_process_group(w: World) -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # the caller's own process group is used as it is
        return
    use_cuda = torch.cuda.is_available()
    if use_cuda:  # nccl needs each process on its own GPU before the first collective
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    atexit.register(_shutdown)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """A CUDA device without an index means this process's GPU (``LOCAL_RANK``) when sharded."""
    w = world()
    if device.type == "cuda" and device.index is None and w.sharded:
        return torch.device("cuda", w.local_rank)
    return device


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``size``-th item starting at ``rank`` (round-robin,
    so ranks get equal shares even when the first items were already done)."""
    w = world()
    return list(items[w.rank::w.size])


def barrier() -> None:
    """Wait for every rank (no-op in a world of one)."""
    if world().sharded:
        import torch.distributed as dist

        dist.barrier()


def gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (picklable objects)."""
    w = world()
    if not w.sharded:
        return [value]
    import torch.distributed as dist

    values: list = [None] * w.size
    dist.all_gather_object(values, value)
    return values


def total(value: int) -> int:
    """Sum of an integer over ranks."""
    return sum(gather(value))


def on_main(action: Callable[[], R]) -> R:
    """Run ``action`` on rank 0 only; every rank returns its result once it is done. A
    :class:`UserError` raised there is raised on every rank (other errors become one)."""
    w = world()
    if not w.sharded:
        return action()
    outcome: tuple[bool, object] = (True, None)
    if w.is_main:
        try:
            outcome = (True, action())
        except UserError as exc:
            outcome = (False, str(exc))
        except Exception as exc:  # noqa: BLE001 - other ranks must not hang; rank 0 re-raises
            outcome = (False, f"rank 0 failed: {type(exc).__name__}: {exc}")
            _broadcast(outcome)
            raise
    ok, value = _broadcast(outcome)
    if not ok:
        raise UserError(str(value))
    return value  # type: ignore[return-value]


def _broadcast(outcome: tuple[bool, object]) -> tuple[bool, object]:
    import torch.distributed as dist

    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def map_units(units: Sequence[T], compute: Callable[[T], R], load: Callable[[T], object] | None = None,
              prefetch: int | None = 0, device: torch.device | None = None) -> list[R]:
    """``[compute(u) for u in units]``, the units shared round-robin across ranks; every rank gets
    the full list in order. Units are fixed before sharding, so results equal a single process's.

    With ``load``, ``compute`` receives ``load(u)`` instead, loaded up to ``prefetch`` units ahead
    in a background thread (see :mod:`skipgrad.data.prefetch`); ``prefetch=None`` decides it from
    the first unit's load and compute times on ``device``."""
    from skipgrad.data.prefetch import adaptively_prefetched, choose_depth, prefetched

    w = world()
    fetch = (lambda i: units[i]) if load is None else (lambda i: load(units[i]))
    mine = range(w.rank, len(units), w.size)
    if prefetch is None and load is not None:
        where = device or torch.device("cpu")
        loaded = adaptively_prefetched(mine, fetch, lambda l, u: choose_depth(l, u, where))
    else:
        loaded = prefetched(mine, fetch, prefetch if load else 0)
    try:
        mine = {i: compute(value) for i, value in loaded}
    finally:
        loaded.close()
    merged: dict[int, R] = {}
    for part in gather(mine):
        merged.update(part)
    return [merged[i] for i in range(len(units))]


def silence_other_ranks() -> None:
    """Under torchrun, send the standard output of ranks other than 0 to the null device, so a
    command prints its tables and summaries once (errors still reach stderr from every rank)."""
    if launched_rank() != 0:
        # Not closed: it stays sys.stdout until the process exits.
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
