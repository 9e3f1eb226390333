"""The Watch streams' heartbeats share one loop timer per interval (transport/watch.py).

A heartbeat must not go out before its interval is over: the shared timer runs no entry
before its deadline (the batch delays' timer may, by half a millisecond), and a stream
that sent its beat on a wake-up for events ignores the older entry still in the list.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any, cast

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.application import Engine
from pagetrackd.domain import TenantId
from pagetrackd.limits import ServerLimits
from pagetrackd.transport.watch import WatchService, _Beat, _Flusher, _options, _Signal


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def test_beats_never_run_before_their_deadline() -> None:
    beats = _Flusher(slack_s=0.0)
    ran: dict[int, float] = {}
    due: dict[int, float] = {}
    done = asyncio.Event()

    def ring(n: int) -> None:
        ran[n] = time.monotonic()
        if len(ran) == 20:
            done.set()

    for n in range(20):
        await asyncio.sleep(0)  # a new loop turn...
        _busy(0.0015)  # ...that works for a while before the stream arms its beat
        due[n] = time.monotonic() + 0.003
        beats.after(0.003, ring, n)
    async with asyncio.timeout(30):  # bounds a hang only
        await done.wait()
    early = {n: due[n] - ran[n] for n in due if ran[n] < due[n]}
    assert not early, f"beats ran before their deadline, by (s): {early}"
    assert not beats._due and not beats._timers


async def test_only_the_latest_armed_beat_wakes_the_stream() -> None:
    signal = _Signal(asyncio.get_running_loop())
    beat = _Beat(signal)
    old = beat.generation
    beat.generation += 1  # the stream sent a beat early and armed the next one
    beat.ring(old)
    assert not signal.is_set()
    beat.ring(beat.generation)
    assert signal.is_set()


async def test_signal_wakes_its_waiter_and_can_be_cleared() -> None:
    signal = _Signal(asyncio.get_running_loop())
    waiter = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    signal.set()
    async with asyncio.timeout(30):  # bounds a hang only
        await waiter
    signal.clear()
    assert not signal.is_set()
    cancelled = asyncio.create_task(signal.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    signal.set()  # a cancelled waiter is not woken twice
    await signal.wait()  # set: returns at once


async def test_a_sender_held_past_its_beat_still_beats_on_an_idle_vm() -> None:
    """A stream whose send waits longer than its interval (a slow reader) gets its
    heartbeat's wake-up while it is away; back, it must send the beat rather than go to
    sleep with no timer left (the VM is idle: nothing else would wake it)."""
    engine = Engine()
    tenant = TenantId("t")
    entry = engine.create_vm(tenant, "v")
    service = WatchService(engine, ServerLimits())
    request = pb.WatchRequest(vm="v", heartbeat_interval_ms=50)
    opts = _options(request, service.limits)
    stream = service._stream(request, entry, tenant, opts, "owner", "peer")
    service._subscribe(entry, stream.sub, None, False)
    sender = cast(
        AsyncGenerator[Any, None],
        service._deliver(stream, opts.max_events, opts.max_bytes, 50, False),
    )
    async with asyncio.timeout(30):  # bounds a hang only
        first = await anext(sender)
        assert first.WhichOneof("kind") == "progress"
        # the reader is slow: the sender stays at its yield past the next beat's time (the
        # sleep is the slow reader itself; the beat's timer, due at 50 ms, rings first)
        await asyncio.sleep(0.15)
        second = await anext(sender)
    assert second.WhichOneof("kind") == "progress"
    await sender.aclose()
