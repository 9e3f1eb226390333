"""A Watch stream's batch delay (``max_batch_delay_ms``) lasts the whole delay.

The streams share one timer per delay length. The event loop's timers count from the start
of the loop's current turn and round to whole milliseconds, so a stream held at the end of a
long turn (a 4,096-write batch takes about a millisecond) was released well before its delay
was over: its messages went out half full, twice as many of them.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pagetrackd.transport.watch import _FLUSH_SLACK_S, _Flusher, _Waker


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.parametrize("delay_ms", [1, 2, 5])
async def test_a_hold_made_late_in_a_loop_turn_lasts_its_whole_delay(delay_ms: int) -> None:
    delay = delay_ms / 1000
    flusher = _Flusher()
    released: dict[int, float] = {}
    held: dict[int, float] = {}

    class Recording(asyncio.Event):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.n = n

        def set(self) -> None:
            released[self.n] = time.monotonic()
            super().set()

    wakers = [_Waker(Recording(n), flusher, delay, max_events=1 << 20) for n in range(20)]
    for n, waker in enumerate(wakers):
        await asyncio.sleep(0)  # a new loop turn...
        _busy(0.002)  # ...that works for a while before the stream gains its events
        held[n] = time.monotonic()
        waker.held = True
        flusher.hold(waker, delay)
    async with asyncio.timeout(30):  # bounds a hang only
        await asyncio.gather(*(w.event.wait() for w in wakers))
    early = {n: held[n] + delay - released[n] for n in held if released[n] < held[n] + delay}
    assert all(e <= _FLUSH_SLACK_S + 1e-6 for e in early.values()), (
        f"released before the {delay_ms} ms delay was over, by (s): {early}"
    )
    assert not flusher._due and not flusher._timers


async def test_streams_due_together_are_released_in_one_timer() -> None:
    flusher = _Flusher()
    wakers = [_Waker(asyncio.Event(), flusher, 0.005, max_events=1 << 20) for _ in range(50)]
    for waker in wakers:  # all in one loop turn: one deadline for all, within the slack
        waker.held = True
        flusher.hold(waker, 0.005)
    assert len(flusher._timers) == 1
    async with asyncio.timeout(30):  # bounds a hang only
        await asyncio.gather(*(w.event.wait() for w in wakers))
    assert not any(w.held for w in wakers)
    assert not flusher._due and not flusher._timers
