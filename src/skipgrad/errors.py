"""Error types shared by the library, its loaders and the command line.

The documented input errors are :class:`InputError` and its subclasses: the library raises them
for bad input (an attack name it does not know, a gamma outside (0, 1], a model SGM cannot change,
an image tensor outside [0, 1], ...). They are ``ValueError``\\ s, so ``except ValueError`` keeps
working. The command line prints exactly these as one line and exits with code 2; any other
exception is a bug and keeps its traceback (exit code 1).
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input to the library: a documented refusal, never a bug."""


class UserError(InputError):
    """A problem with what the user asked for (bad spec, missing file, bad number).

    The command line prints these as one line (``skipgrad: error: ...``) and exits with code 2;
    anything else escaping is a bug and keeps its traceback.
    """


class MissingWeightsError(UserError, FileNotFoundError):
    """Pretrained weights are not in the local cache and cannot be downloaded here."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
