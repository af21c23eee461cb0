"""How long ``skipgrad --help`` takes, as a ratio to importing torch, measured back to back.

Before the lazy imports (issue 16.11) every command, ``--help`` included, imported torch through
``skipgrad/__init__.py``, so the ratio was about 1 or above; now torch loads only when a command
runs, and the ratio should stay well below 0.5. ``--src DIR`` times another checkout's sources
(e.g. an older commit) in the same run, for a before/after comparison.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def timed(command: list[str], src: Path, repeats: int) -> float:
    """Median wall time of ``command`` with ``src`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--src", type=Path, help="also time this checkout's src/ (before)")
    args = parser.parse_args()
    torch_import = timed([sys.executable, "-c", "import torch"], SRC, args.repeats)
    help_now = timed([sys.executable, "-m", "skipgrad", "--help"], SRC, args.repeats)
    print(f"import torch: {torch_import:.2f} s; skipgrad --help: {help_now:.2f} s; "
          f"ratio {help_now / torch_import:.2f} (target < 0.5)")
    if args.src:
        before = timed([sys.executable, "-m", "skipgrad", "--help"], args.src, args.repeats)
        print(f"skipgrad --help from {args.src}: {before:.2f} s; ratio {before / torch_import:.2f}"
              f"; speed-up {before / help_now:.1f}x")


if __name__ == "__main__":
    main()
