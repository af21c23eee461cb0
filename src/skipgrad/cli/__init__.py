"""The ``skipgrad`` command line: thin argument handling over the library.

User errors (:class:`skipgrad.errors.InputError`: ``UserError`` and the library's documented input
errors) print one line (``skipgrad: error: ...``) and exit with code 2; any other exception is a bug
and keeps its traceback (exit code 1). Ctrl-C exits with 130 (SIGTERM 143) and leaves only whole
files behind; output into a pipe whose reader has gone (``skipgrad show DIR | head``) ends quietly
with 141 (128 + SIGPIPE), as other tools do. Perturbation sizes are pixel levels out of 255
for L-inf (``--eps 16``) and [0, 1] units for L2 (``--norm l2 --eps 1.5``); see skipgrad.units.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from skipgrad.cli.parser import EXIT_USAGE, build_parser
from skipgrad.errors import InputError

EXIT_INTERRUPTED = 130
# 128 + SIGPIPE: what a shell reports for a tool whose reader went away (`skipgrad show DIR | head`).
EXIT_BROKEN_PIPE = 141

# ---------------------------------------------------------------- commands

# ---------------------------------------------------------------- entry point

def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 input error, 130 interrupted,
    143 stopped by SIGTERM). Any exception other than an :class:`InputError` propagates (a bug:
    ``python -m skipgrad`` then prints its traceback and exits with 1)."""
    try:
        args = build_parser().parse_args(argv)
        from skipgrad.pipeline.distributed import silence_other_ranks

        silence_other_ranks()  # under torchrun rank 0 prints the results
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not at exit as a traceback
        return code
    except BrokenPipeError:  # `skipgrad show DIR | head`: the reader has what it wanted
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except SystemExit as exc:  # argparse: --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt as exc:
        print("skipgrad: interrupted; finished files are kept, re-run the same command to resume",
              file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)  # 143 after SIGTERM
    except InputError as exc:  # documented input errors only: anything else is a bug, and
        print(f"skipgrad: error: {_one_line(exc)}", file=sys.stderr)  # keeps its traceback (1)
        return EXIT_USAGE


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that Python's own flush at exit cannot fail on the closed
    pipe again (the recipe of the Python docs, signal module, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (tests): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
