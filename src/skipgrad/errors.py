"""Error types shared by the command line and the library's user-facing loaders."""
from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for (bad spec, missing file, bad number).

    The command line prints these as one line (``skipgrad: error: ...``) and exits with code 2;
    anything else escaping is a bug and keeps its traceback.
    """


class MissingWeightsError(UserError, FileNotFoundError):
    """Pretrained weights are not in the local cache and cannot be downloaded here."""
