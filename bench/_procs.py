"""What a benchmark starts dies with it, however it ends (Ctrl-C, an error, SIGKILL).

The kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` asks for SIGKILL when the parent
dies (``man 2 prctl``). A command gets it through a one-line Python wrapper that sets it and
then ``exec``s the command (it stays set across exec); a multiprocessing child calls
:func:`die_with_parent` first thing.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# The parent may die before the request is made: then the parent pid has changed already,
# and the process leaves at once.
_WRAPPER = (
    "import ctypes, os, signal, sys; ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL);"
    " os.getppid() == int(sys.argv[1]) or os._exit(1); os.execv(sys.argv[2], sys.argv[2:])"
)


def pagetrackd() -> str:
    """The daemon to measure: ``$PAGETRACKD_BIN`` if set (another build, to compare side by
    side with the same clients), else the venv's ``pagetrackd``."""
    return os.environ.get("PAGETRACKD_BIN") or str(Path(sys.executable).with_name("pagetrackd"))


def dying_with_us(cmd: list[str]) -> list[str]:
    """``cmd`` (its first element a full path) run so that it is killed when we die."""
    return [sys.executable, "-c", _WRAPPER, str(os.getpid()), *cmd]


def die_with_parent() -> None:
    """Ask to be killed when the parent process dies (in a multiprocessing child)."""
    ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)
