"""``--compile``: the attack loop on ``torch.compile``d source models, SGM and the backward-pass
methods included.

SGM and its siblings change a model through module hooks and swapped ``forward`` methods. Dynamo
traces whatever is attached when it compiles and, by default, does not watch hooks added or
removed afterwards (``torch._dynamo.config.skip_nnmodule_hook_guards``): contexts entered inside
every attack call, after compiling, would silently keep whichever hooks the first trace saw. So
the contexts are entered *once* for the whole run, before compiling (:func:`compiled_sources`),
and the attack calls get a spec without them. The gradients then equal eager SGM's within float
tolerance (``tests/test_compile.py``), and the compile time is spent once, in a warm-up that the
runner reports apart from the attack time (:func:`warm_up`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from skipgrad.attacks.config import AttackSpec
from skipgrad.attacks.loop import backward_contexts, evaluation_mode, input_gradient
from skipgrad.attacks.randomness import PerImageRandom
from skipgrad.errors import UserError


def check_compile(device: torch.device) -> None:
    """Refuse ``--compile`` in one line, saying why, where ``torch.compile`` cannot run."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError("--compile is not available: torch.compile does not support this Python "
                        "version or platform; run without --compile")
    if device.type == "cpu" and not _c_compiler():
        raise UserError("--compile on a CPU needs a C++ compiler for torch.compile's generated "
                        "kernels and none was found (install gcc or set CXX); run without "
                        "--compile")


def _c_compiler() -> str | None:
    names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return next((path for name in names if name and (path := shutil.which(name))), None)


@contextlib.contextmanager
def compiled_sources(sources: Sequence[nn.Module],
                     spec: AttackSpec) -> Iterator[tuple[list[nn.Module], AttackSpec]]:
    """Enter the spec's SGM and backward-pass contexts on ``sources`` for the duration, then
    compile each source; yields the compiled modules and the spec without those contexts (they
    are attached already), for :func:`skipgrad.attacks.loop.attack_with`."""
    contexts = backward_contexts(sources, spec)
    with contextlib.ExitStack() as stack:
        stack.enter_context(evaluation_mode(sources))
        for context in contexts:
            stack.enter_context(context)
        plain = dataclasses.replace(spec, sgm=None, sgm_official=False, backward=None,
                                    forward=None)
        yield [torch.compile(model) for model in sources], plain


def warm_up(sources: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
            spec: AttackSpec, sizes: Sequence[int]) -> float:
    """Compile ahead of the timed attack: one input gradient at every group size the run will
    use (a new batch size is a new graph). Returns the seconds it took."""
    started = time.perf_counter()
    for size in sorted(set(sizes), reverse=True):
        x, y = images[:size], labels[:size]
        if len(x) < size:  # fewer images than a group: repeat them (values do not matter)
            repeat = -(-size // len(x))
            x, y = x.repeat(repeat, 1, 1, 1)[:size], y.repeat(repeat)[:size]
        input_gradient(sources, x, y, spec, PerImageRandom(spec.seed, list(range(size))))
    return time.perf_counter() - started
