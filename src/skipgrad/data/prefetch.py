"""Overlap image loading with compute: load the next batches in a background thread.

A thread rather than DataLoader worker processes: decoding (Pillow, numpy, IDX slicing) releases the
GIL, so one thread keeps ahead of an attack step, which costs ``steps x (forward + backward)``; there
is no dataset pickling or worker start-up per run; an unreadable image raises its own one-line
:class:`~skipgrad.errors.UserError` in the main thread, in order; and SIGINT/SIGTERM stay with the
main process, which stops after the current group as usual.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

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
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
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
