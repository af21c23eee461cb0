"""Progress bars for long steps (images/s), silenced by ``--quiet``."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, quiet: bool, initial: int = 0) -> tqdm:
    """A tqdm bar counting images on stderr; ``quiet`` disables it entirely."""
    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=quiet,
                file=sys.stderr, dynamic_ncols=True, leave=False)
