"""watch(): typed messages, numpy batches, gaps, closes, and resuming after the
connection drops or the daemon restarts."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator

import numpy as np
import pytest

import pagetrack as pt
from pagetrack import AsyncClient, Backoff, WatchStream
from tests.client.conftest import short_tmp
from tests.daemon_process import DaemonProcess, start_daemon
from tests.waiting import HANG_S, until

PAGE = 4096
FAST = Backoff(initial_s=0.05, max_s=0.5, max_attempts=100)


async def _setup(c: AsyncClient, vm: str, **kw: object) -> None:
    """A VM with 256 pages of RAM, gfns 0..63 tracked."""
    await c.create_vm(vm, **kw)  # type: ignore[arg-type]
    await c.set_memory_region(vm, 0, 0, 256)
    await c.add_tracking(vm, ranges=[range(64)])


async def _next(
    stream: WatchStream,
    kind: type[pt.WatchMessage],
    within: float = HANG_S,
    skip: tuple[type, ...] = (pt.Progress, pt.Registered),
):
    """The next message of a kind, skipping heartbeats (and what ``skip`` names)."""
    async with asyncio.timeout(within):
        async for msg in stream:
            if isinstance(msg, kind):
                return msg
            assert isinstance(msg, skip), msg
    raise AssertionError(f"stream ended before a {kind.__name__}")


async def _events(stream: WatchStream, n: int, within: float = HANG_S) -> list[pt.Event]:
    """The next ``n`` events, failing on any gap."""
    out: list[pt.Event] = []
    async with asyncio.timeout(within):
        async for msg in stream:
            assert not isinstance(msg, pt.Gap | pt.Closed), msg
            if isinstance(msg, pt.EventBatch):
                out.extend(msg.events())
                if len(out) >= n:
                    return out
    raise AssertionError(f"stream ended after {len(out)} of {n} events")


async def test_batches_expose_numpy_columns_and_events(client: AsyncClient, vm_name: str) -> None:
    """Registered comes first; batches carry numpy columns and Event objects for guest and
    DMA writes, with the written bytes."""
    await _setup(client, vm_name, dma_policy="notify")
    async with client.watch(vm_name, max_batch_delay_ms=20) as stream:
        reg = await anext(stream)
        assert isinstance(reg, pt.Registered)
        assert reg.start_seq == 1 and reg.reconnects == 0 and reg.lease_id
        await client.write_batch(vm_name, np.arange(4) * PAGE + 8, b"aaaabbbbccccdddd", vcpu=2)
        await client.dma_write(vm_name, 5 * PAGE, b"dma")
        events = await _events(stream, 5)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [e.data for e in events] == [b"aaaa", b"bbbb", b"cccc", b"dddd", b"dma"]
    assert events[0].gpa == 8 and events[0].vcpu == 2 and events[0].gfn == 0
    assert events[4].source is pt.EventSource.DMA and events[4].vcpu is None
    assert stream.last_seq == 5
    await client.delete_vm(vm_name)


async def test_batch_columns(client: AsyncClient, vm_name: str) -> None:
    """One write_batch arrives as columns: seq, gpa, length, vcpu, flags and the data."""
    await _setup(client, vm_name)
    async with client.watch(vm_name, max_batch_delay_ms=50) as stream:
        await _next(stream, pt.Registered)
        gpa = np.arange(32, dtype=np.uint64) * PAGE
        await client.write_batch(vm_name, gpa, np.arange(32, dtype="<u8").tobytes())
        batch = await _next(stream, pt.EventBatch)
    assert isinstance(batch, pt.EventBatch)
    assert batch.seq.dtype == np.uint64 and batch.seq.tolist() == list(range(1, len(batch) + 1))
    assert batch.gpa.tolist() == gpa[: len(batch)].tolist()
    assert set(batch.length.tolist()) == {8} and not batch.is_dma.any()
    assert np.frombuffer(batch.data, dtype="<u8").tolist() == list(range(len(batch)))
    assert batch.offsets[-1] == len(batch.data)
    await client.delete_vm(vm_name)


async def test_filters(client: AsyncClient, vm_name: str) -> None:
    """ranges and sources filters reach the daemon; ranges takes what add_tracking's
    ranges takes, and the old name gfn_ranges still works, with a DeprecationWarning."""
    await _setup(client, vm_name, dma_policy="notify")
    async with client.watch(vm_name, ranges=[range(10, 12)], sources=["guest"]) as stream:
        await _next(stream, pt.Registered)
        await client.write_batch(vm_name, np.arange(20) * PAGE, b"x" * 20)
        await client.dma_write(vm_name, 10 * PAGE, b"d")
        await client.write(vm_name, 11 * PAGE, b"last")
        events = await _events(stream, 3)
    assert [(e.gfn, e.source) for e in events] == [
        (10, pt.EventSource.GUEST), (11, pt.EventSource.GUEST), (11, pt.EventSource.GUEST)
    ]
    assert events[-1].data == b"last"
    async with client.watch(vm_name, start_seq=1, ranges=[(11, 1)]) as replay:
        assert [e.seq for e in await _events(replay, 2)] == [12, 22]  # history is filtered too
    with pytest.warns(DeprecationWarning, match="use watch\\(ranges="):
        old_name = client.watch(vm_name, start_seq=1, gfn_ranges=[(11, 1)])
    async with old_name as replay:
        assert [e.seq for e in await _events(replay, 2)] == [12, 22]
    with pytest.raises(TypeError, match="not both"):
        client.watch(vm_name, ranges=[(1, 1)], gfn_ranges=[(1, 1)])
    await client.delete_vm(vm_name)


async def test_replay_from_start_seq(client: AsyncClient, vm_name: str) -> None:
    """start_seq replays events still held in the daemon's history."""
    await _setup(client, vm_name)
    await client.write_batch(vm_name, np.arange(10) * PAGE, b"y" * 10)
    async with client.watch(vm_name, start_seq=4) as stream:
        reg = await _next(stream, pt.Registered)
        assert reg.start_seq == 4 and reg.head_seq == 10
        events = await _events(stream, 7)
    assert [e.seq for e in events] == list(range(4, 11))
    await client.delete_vm(vm_name)


async def test_compacted_start_yields_gap(client: AsyncClient, vm_name: str) -> None:
    """A start_seq that left the history gives Gap(COMPACTED) for exactly the lost range,
    then the held events; with allow_compacted=False it is OutOfRange with oldest_seq."""
    await _setup(client, vm_name, history_events=4)
    for i in range(0, 10, 2):  # the history evicts whole batches
        await client.write_batch(vm_name, [i * PAGE, (i + 1) * PAGE], b"zz")
    oldest = (await client.get_vm(vm_name)).oldest_seq
    assert 1 < oldest <= 10
    async with client.watch(vm_name, start_seq=1) as stream:
        gap = await _next(stream, pt.Gap)
        assert gap == pt.Gap(1, oldest - 1, oldest - 1, pt.GapReason.COMPACTED)
        events = await _events(stream, 10 - oldest + 1)
        assert [e.seq for e in events] == list(range(oldest, 11))
    with pytest.raises(pt.OutOfRange) as info:
        async for _ in client.watch(vm_name, start_seq=1, allow_compacted=False):
            pass
    assert info.value.oldest_seq == oldest
    await client.delete_vm(vm_name)


async def test_overflow_gap_accounts_for_every_event(client: AsyncClient, vm_name: str) -> None:
    """Under DROP with a tiny queue, events received plus Gap counts equal events written."""
    await _setup(client, vm_name)
    async with client.watch(vm_name, queue_limit=4, policy="drop") as stream:
        await _next(stream, pt.Registered)
        await client.write_batch(vm_name, np.arange(64) * PAGE, b"q" * 64)
        received = lost = 0
        async with asyncio.timeout(HANG_S):
            async for msg in stream:
                if isinstance(msg, pt.EventBatch):
                    received += len(msg)
                elif isinstance(msg, pt.Gap):
                    assert msg.reason is pt.GapReason.QUEUE_OVERFLOW
                    lost += msg.count
                if received + lost >= 64:
                    break
    assert lost > 0 and received + lost == 64
    assert stream.last_seq == 64
    await client.delete_vm(vm_name)


async def test_coalesce_accounts_for_every_event(client: AsyncClient, vm_name: str) -> None:
    """Under COALESCE, events received plus every Gap count equal events written: events
    that follow a coalesced gap's range are still handed out."""
    await _setup(client, vm_name)
    async with client.watch(vm_name, policy="coalesce", queue_limit=4) as stream:
        await _next(stream, pt.Registered)
        gpa = (np.arange(40) % 8) * PAGE  # five writes to each of 8 gfns
        await client.write_batch(vm_name, gpa, np.arange(40, dtype="<u8").tobytes())
        received = accounted = 0
        async with asyncio.timeout(HANG_S):
            async for msg in stream:
                if isinstance(msg, pt.EventBatch):
                    received += len(msg)
                elif isinstance(msg, pt.Gap):
                    accounted += msg.count
                if received + accounted >= 40:
                    break
    assert received + accounted == 40 and received >= 8
    await client.delete_vm(vm_name)


async def test_unwatch_and_vm_delete_close_the_stream(client: AsyncClient, vm_name: str) -> None:
    """unwatch() ends a stream with Closed(UNWATCHED); deleting the VM with Closed(VM_DELETED);
    a memslot delete shows up as RegionRemoved."""
    await _setup(client, vm_name)
    await client.set_memory_region(vm_name, 1, 0x1000, 16)
    async with client.watch(vm_name) as stream:
        await _next(stream, pt.Registered)
        await client.delete_memory_region(vm_name, 1)
        region = await _next(stream, pt.RegionRemoved)
        assert isinstance(region, pt.RegionRemoved)
        assert (region.base_gfn, region.npages) == (0x1000, 16)
        await stream.unwatch()
        closed = await _next(stream, pt.Closed)
        assert closed.reason is pt.CloseReason.UNWATCHED
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
    async with client.watch(vm_name) as stream:
        await _next(stream, pt.Registered)
        await client.delete_vm(vm_name)
        closed = await _next(stream, pt.Closed, skip=(pt.Progress, pt.RegionRemoved))
        assert closed.reason is pt.CloseReason.VM_DELETED


class Proxy:
    """A TCP proxy that can cut every connection and refuse new ones, like a network blip."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.open = True
        self.links: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.accepted = 0
        self.refused = 0  #: connections refused while cut
        self.address = ""

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self.address

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self.open:
            self.refused += 1
            w.transport.abort()
            return
        self.accepted += 1
        ur, uw = await asyncio.open_connection(*self.upstream)
        self.links += [w, uw]
        for t in (asyncio.create_task(self._pipe(r, uw)), asyncio.create_task(self._pipe(ur, w))):
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def cut(self) -> None:
        """Reset every connection and refuse new ones."""
        self.open = False
        for w in self.links:
            w.transport.abort()
        self.links.clear()

    async def close(self) -> None:
        self.cut()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def proxy(daemon: DaemonProcess) -> AsyncIterator[Proxy]:
    p = Proxy(daemon.tcp)
    await p.start()
    yield p
    await p.close()


async def test_resume_after_connection_loss(
    proxy: Proxy, tcp_client: AsyncClient, vm_name: str
) -> None:
    """When the connection drops, watch() reconnects with backoff and resumes after the last
    seq it saw: events written while it was cut off arrive, none twice, none lost."""
    writer = tcp_client
    await _setup(writer, vm_name)
    async with AsyncClient(proxy.address, backoff=FAST) as c:
        async with c.watch(vm_name, heartbeat_interval_ms=100) as stream:
            await _next(stream, pt.Registered)
            await writer.write_batch(vm_name, np.arange(5) * PAGE, b"a" * 5)
            seen = [e.seq for e in await _events(stream, 5)]
            proxy.cut()
            # Written while the watcher is disconnected: only the history has them.
            await writer.write_batch(vm_name, np.arange(5, 12) * PAGE, b"b" * 7)
            # Reading on, the watcher tries to reconnect and is refused (at least once)
            # before the network comes back.
            reconnected = asyncio.create_task(_next(stream, pt.Registered))

            async def refused() -> bool:
                return proxy.refused > 0 or reconnected.done()  # (done: an error to show)

            await until(refused, "a reconnect attempt while cut off")
            proxy.open = True
            reg = await reconnected
            assert proxy.refused >= 1
            assert reg.reconnects >= 1 and reg.start_seq == 6
            await writer.write(vm_name, 20 * PAGE, b"after")
            seen += [e.seq for e in await _events(stream, 8)]
    assert seen == list(range(1, 14))
    assert proxy.accepted >= 2
    await writer.delete_vm(vm_name)


async def test_resume_across_daemon_restart() -> None:
    """A daemon shutdown (SIGTERM: streams end UNAVAILABLE) and restart on the same unix
    socket costs the watcher nothing: it reconnects and continues at the next seq."""
    tmp = short_tmp()
    sock = f"unix:{tmp}/pt.sock"
    state = ("--state-dir", str(tmp / "state"), "--save-interval", "3600")
    d = start_daemon(tmp, *state, listen=(sock,))
    try:
        async with AsyncClient(sock, backoff=FAST) as c:
            await _setup(c, "r")
            async with c.watch("r", heartbeat_interval_ms=200) as stream:
                await _next(stream, pt.Registered)
                await c.write_batch("r", np.arange(3) * PAGE, b"123")
                before = [e.seq for e in await _events(stream, 3)]
                assert d.stop() == 0  # SIGTERM; VM state saved
                d = start_daemon(tmp, *state, listen=(sock,))
                reg = await _next(stream, pt.Registered)
                assert reg.reconnects >= 1 and reg.start_seq == 4
                await c.write_batch("r", np.arange(2) * PAGE, b"45")
                after = [e.seq for e in await _events(stream, 2)]
        assert before + after == [1, 2, 3, 4, 5]
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_without_resume_shutdown_raises_unavailable() -> None:
    """resume=False surfaces the daemon's shutdown as Unavailable; with resume, a daemon
    that never comes back makes the stream give up after max_attempts."""
    tmp = short_tmp()
    sock = f"unix:{tmp}/pt.sock"
    d = start_daemon(tmp, listen=(sock,))
    try:
        async with AsyncClient(sock) as c:
            await _setup(c, "n")
            plain = c.watch("n", resume=False)
            retrying = c.watch("n", backoff=Backoff(initial_s=0.05, max_s=0.1, max_attempts=3))
            await _next(plain, pt.Registered)
            await _next(retrying, pt.Registered)
            assert d.stop() == 0
            with pytest.raises(pt.Unavailable, match="shutting down"):
                await _next(plain, pt.EventBatch)
            with pytest.raises(pt.Unavailable, match="gave up reconnecting"):
                await _next(retrying, pt.EventBatch)
            assert retrying.reconnects == 3
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
