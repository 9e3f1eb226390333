"""Start-up time of the ``pagetrack`` command next to a bare Python interpreter.

Run from the repository root with the project's venv::

    .venv/bin/python bench/cli.py

Prints ``name: value`` lines: ``cli_help_s``, the median wall time of ``pagetrack --help``
as a new process; ``cli_usage_error_s``, the same for an argument error (``pagetrack vm
create`` without a name, exit status 2); ``python_startup_s``, the median for ``python -c
pass``; and the ratio of the first to the last. Runs are interleaved (help, usage error,
bare, again) so that a change in the machine's load affects all three alike. The target
is ``cli_help_s`` under 0.15 s on an idle machine.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROUNDS = 15
PAGETRACK = Path(sys.executable).with_name("pagetrack")


def wall_s(cmd: list[str], status: int) -> float:
    """Wall time of one run of ``cmd``, which must exit with ``status``."""
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != status:
        print(f"bench/cli.py: {cmd} exited {done.returncode}, not {status}", file=sys.stderr)
        raise SystemExit(1)
    return elapsed


def main() -> int:
    runs: dict[str, list[float]] = {"help": [], "usage": [], "bare": []}
    for _ in range(2):  # warm the page cache and the .pyc files
        wall_s([str(PAGETRACK), "--help"], 0)
    for _ in range(ROUNDS):
        runs["help"].append(wall_s([str(PAGETRACK), "--help"], 0))
        runs["usage"].append(wall_s([str(PAGETRACK), "vm", "create"], 2))
        runs["bare"].append(wall_s([sys.executable, "-c", "pass"], 0))
    help_s = statistics.median(runs["help"])
    usage_s = statistics.median(runs["usage"])
    bare_s = statistics.median(runs["bare"])
    print(f"cli_help_s: {help_s:.3f}")
    print(f"cli_usage_error_s: {usage_s:.3f}")
    print(f"python_startup_s: {bare_s:.3f}")
    print(f"ratio_cli_help_vs_python_startup: {help_s / bare_s:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
