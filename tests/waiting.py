"""Waiting in tests: poll for the condition a test needs, never sleep a fixed time.

A busy machine makes everything slower but never makes a right answer wrong, so a test
waits for what it needs and the deadline only bounds a hang (it is far longer than the
condition takes even on a loaded machine). Timing figures belong in bench/.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: How long a test waits for something that should happen: only a hang takes this long.
HANG_S = 60.0


def wait_until(
    condition: Callable[[], T | None], what: str, hang_s: float = HANG_S, every: float = 0.02
) -> T:
    """Call ``condition`` until it returns something truthy and return that; fail naming
    ``what`` after ``hang_s`` seconds."""
    deadline = time.monotonic() + hang_s
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {hang_s:.0f} s for {what}; last saw {got!r}")
        time.sleep(every)


async def until(
    condition: Callable[[], Awaitable[T | None]], what: str, hang_s: float = HANG_S,
    every: float = 0.02,
) -> T:
    """Await ``condition()`` until it gives something truthy and return that; fail
    naming ``what`` after ``hang_s`` seconds."""
    deadline = time.monotonic() + hang_s
    while True:
        got = await condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {hang_s:.0f} s for {what}; last saw {got!r}")
        await asyncio.sleep(every)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
