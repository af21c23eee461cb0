"""Overlap image loading with compute: load the next batches in a background thread.

A thread rather than DataLoader worker processes: decoding (Pillow, numpy, IDX slicing) releases the
GIL, so one thread keeps ahead of an attack step, which costs ``steps x (forward + backward)``; there
is no dataset pickling or worker start-up per run; an unreadable image raises its own one-line
:class:`~skipgrad.errors.UserError` in the main thread, in order; and SIGINT/SIGTERM stay with the
main process, which stops after the current group as usual.
"""
from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from skipgrad.errors import InputError

# Loading ahead must save more than it costs: on a CPU the loading thread takes a core (and the
# GIL) from the compute threads, so it runs only when loading is a real share of the work.
PREFETCH_MIN_SHARE = 0.05
PREFETCH_DEPTH = 2

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], load: Callable[[T], R], depth: int = 2,
               pin_memory: bool = False) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, loading up to ``depth`` items ahead in one thread.

    ``depth=0`` loads synchronously. With ``pin_memory`` a loaded tensor is page-locked in the
    loading thread, so that ``.to("cuda", non_blocking=True)`` copies it asynchronously. Leaving the
    loop early (``break``, an exception) cancels what was not started and waits for the rest.
    """
    if depth < 0:
        raise InputError(f"prefetch depth must be >= 0, got {depth}")
    work = (lambda item: _pinned(load(item))) if pin_memory else load
    if depth == 0:
        for item in items:
            yield item, work(item)
        return
    pending: collections.deque[tuple[T, Future]] = collections.deque()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="skipgrad-prefetch") as pool:
        try:
            for item in source:
                pending.append((item, pool.submit(work, item)))
                if len(pending) > depth:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _pinned(value: R) -> R:
    if isinstance(value, torch.Tensor) and torch.cuda.is_available():
        return value.pin_memory()
    return value


def adaptively_prefetched(items: Iterable[T], load: Callable[[T], R],
                          choose: Callable[[float, float], int],
                          pin_memory: bool = False) -> Iterator[tuple[T, R]]:
    """:func:`prefetched` with the depth decided from the data: the first item is loaded in turn,
    then ``choose(load_seconds, use_seconds)`` -- how long that item took to load, and how long
    the consumer took with it before asking for the next -- gives the depth for the rest."""
    source = iter(items)
    for first in source:
        work = (lambda item: _pinned(load(item))) if pin_memory else load
        started = time.perf_counter()
        value = work(first)
        loaded = time.perf_counter()
        yield first, value
        depth = choose(loaded - started, time.perf_counter() - loaded)
        yield from prefetched(source, load, depth, pin_memory)
        return


def choose_depth(load_seconds: float, use_seconds: float, device: torch.device) -> int:
    """Items to load ahead, from how long one took to load and to be used: ``PREFETCH_DEPTH``
    when loading is at least ``PREFETCH_MIN_SHARE`` of the use and a core is free for it (the
    device is a GPU, or this process computes on fewer threads than there are cores), else 0."""
    if load_seconds < PREFETCH_MIN_SHARE * use_seconds:
        return 0
    spare_core = device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()
    return PREFETCH_DEPTH if spare_core else 0
