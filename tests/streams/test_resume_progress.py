"""Resume and progress while writes keep coming: a stream resumed from the seq after the
last one it saw misses nothing and repeats nothing across the history/live boundary; a
ring bounded by bytes names its oldest seq in OUT_OF_RANGE, and allow_compacted gives a
Gap(COMPACTED) then the rest; Progress heartbeats come at the requested interval and say
exactly what the stream has delivered, dropped and still holds."""

from __future__ import annotations

import asyncio
import re
import statistics
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import DaemonProcess, start_daemon
from tests.streams.load import BATCH, setup_vm, writing
from tests.waiting import HANG_S, until


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("resume"))
    yield d
    assert d.stop() == 0


@pytest.fixture
async def channel(daemon: DaemonProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(daemon.tcp) as ch:
        yield ch


async def _events(stream: Any, until: int) -> list[int]:
    """Seqs of the events read until one >= ``until`` arrived; fails on a gap."""
    seqs: list[int] = []
    while not seqs or seqs[-1] < until:
        msg = await asyncio.wait_for(stream.read(), HANG_S)
        assert msg is not grpc.aio.EOF
        kind = msg.WhichOneof("kind")
        assert kind in ("events", "progress"), msg
        if kind == "events":
            seqs.extend(msg.events.seq)
    return seqs


async def test_resume_under_writes_has_no_gap_and_no_repeat(
    daemon: DaemonProcess, channel: grpc.aio.Channel
) -> None:
    """A reader that disconnects and resumes from last + 1, again and again while a
    writer never stops, sees every seq exactly once, in order."""
    vm = "resume-live"
    await setup_vm(channel, vm)
    watch = pbg.WatchServiceStub(channel)
    seen: list[int] = []
    async with writing(daemon.tcp, vm, pause=0.002):
        stream: Any = watch.Watch(pb.WatchRequest(vm=vm, start_seq=1))
        reg = (await stream.read()).registered
        assert reg.start_seq == 1
        for _ in range(8):
            # Read a little past what is written now, then drop the connection mid-stream.
            head = (await pbg.VmServiceStub(channel).GetVm(pb.GetVmRequest(vm=vm))).vm.head_seq
            seen += await _events(stream, head + BATCH // 2)
            stream.cancel()

            async def written_past(seq: int = seen[-1]) -> bool:
                vm_now = await pbg.VmServiceStub(channel).GetVm(pb.GetVmRequest(vm=vm))
                return vm_now.vm.head_seq > seq

            await until(written_past, "writes while nobody watches")
            stream = watch.Watch(pb.WatchRequest(vm=vm, start_seq=seen[-1] + 1))
            reg = (await stream.read()).registered
            assert reg.start_seq == seen[-1] + 1 and reg.head_seq > seen[-1]
            assert reg.oldest_seq <= reg.start_seq
    head = (await pbg.VmServiceStub(channel).GetVm(pb.GetVmRequest(vm=vm))).vm.head_seq
    seen += await _events(stream, head)
    stream.cancel()
    assert seen == list(range(1, head + 1))


async def test_byte_bounded_ring_names_its_oldest_seq(channel: grpc.aio.Channel) -> None:
    """A history ring bounded by bytes (not events) drops its oldest batches; a start_seq
    before what it holds is OUT_OF_RANGE naming the oldest seq held (the one GetVm
    reports); allow_compacted gives a Gap(COMPACTED) for exactly the lost range and then
    every held event, then live events."""
    vm = "resume-bytes"
    # 64 KiB of history: batches of 256 writes x 64 bytes (+ per-event overhead) fill it
    # after a few batches.
    await setup_vm(channel, vm, pb.VmOptions(limits=pb.VmLimits(history_bytes=64 << 10)))
    mem = pbg.MemoryServiceStub(channel)
    for i in range(16):
        await mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
            vm=vm, gpa=[(k % 512) << 12 for k in range(256)], vcpu=[0], length=[64] * 256,
            data=bytes([i]) * 64 * 256))
    info = (await pbg.VmServiceStub(channel).GetVm(pb.GetVmRequest(vm=vm))).vm
    assert info.head_seq == 16 * 256
    oldest = info.oldest_seq
    assert 256 < oldest <= info.head_seq
    watch = pbg.WatchServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await watch.Watch(pb.WatchRequest(vm=vm, start_seq=oldest - 1)).read()
    assert exc.value.code() == grpc.StatusCode.OUT_OF_RANGE
    named = [int(n) for n in re.findall(r"\d+", exc.value.details() or "")]
    assert oldest in named, exc.value.details()
    stream: Any = watch.Watch(pb.WatchRequest(vm=vm, start_seq=1, allow_compacted=True))
    reg = (await stream.read()).registered
    assert reg.oldest_seq == oldest
    gap = (await stream.read()).gap
    assert (gap.first_seq, gap.last_seq, gap.count, gap.reason) == (
        1, oldest - 1, oldest - 1, pb.GAP_REASON_COMPACTED)
    assert await _events(stream, info.head_seq) == list(range(oldest, info.head_seq + 1))
    await mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=0, data=b"live"))
    assert await _events(stream, info.head_seq + 1) == [info.head_seq + 1]
    stream.cancel()
    # Exactly the oldest held seq resumes without a gap.
    stream = watch.Watch(pb.WatchRequest(vm=vm, start_seq=oldest))
    await stream.read()
    assert (await _events(stream, oldest))[0] == oldest
    stream.cancel()


class _Tally:
    """What a stream has sent so far, to check each Progress against."""

    def __init__(self, queue_limit: int) -> None:
        self.queue_limit = queue_limit
        self.received = self.dropped = self.newest = 0
        self.beats: list[pb.Progress] = []

    def take(self, msg: pb.WatchResponse) -> str:
        kind = msg.WhichOneof("kind")
        if kind == "events":
            self.received += len(msg.events.seq)
            self.newest = max(self.newest, msg.events.seq[-1])
        elif kind == "gap":
            assert msg.gap.reason == pb.GAP_REASON_QUEUE_OVERFLOW
            self.dropped += msg.gap.count
            self.newest = max(self.newest, msg.gap.last_seq)
        elif kind == "progress":
            p = msg.progress
            self.beats.append(p)
            assert (p.sent_total, p.dropped_total, p.coalesced_total) == (
                self.received, self.dropped, 0)
            assert p.sent_seq == self.newest
            assert p.head_seq >= p.sent_seq and p.lag == p.head_seq - p.sent_seq
            assert p.queue_depth <= self.queue_limit
        return str(kind)


async def test_progress_heartbeats_under_load_are_exact_and_on_time(
    daemon: DaemonProcess, channel: grpc.aio.Channel
) -> None:
    """Progress says exactly what came before it on the stream: sent_total = events
    received, dropped_total = gap counts, sent_seq = newest seq received or reported,
    lag = head_seq - sent_seq, queue_depth within the queue limit. With a prompt reader
    under load it comes every heartbeat_interval_ms, not sooner (server timestamps); after the
    reader stalls while page-sized writes pour in, the beats show the lag, the queue
    and the drops, and the last one, once the writer stops, shows them drained."""
    vm = "progress-load"
    interval_ms = 100
    queue_limit = 2000
    await setup_vm(channel, vm)
    stream: Any = pbg.WatchServiceStub(channel).Watch(pb.WatchRequest(
        vm=vm, heartbeat_interval_ms=interval_ms, queue_limit=queue_limit,
        max_batch_events=256))
    reg = (await stream.read()).registered
    assert reg.heartbeat_interval_ms == interval_ms
    tally = _Tally(queue_limit)
    async with writing(daemon.tcp, vm, in_flight=1, pause=0.01):
        while len(tally.beats) < 10:
            tally.take(await asyncio.wait_for(stream.read(), HANG_S))
    on_time = tally.beats[1:]
    spacing = [(b.timestamp_ns - a.timestamp_ns) / 1e6
               for a, b in zip(on_time, on_time[1:], strict=False)]
    # Due every interval, not sooner (a busy machine only makes them later; how late they
    # come is a figure for a benchmark, not a test).
    assert statistics.median(spacing) >= interval_ms * 0.9, spacing
    notifiers = pbg.WatchServiceStub(channel)

    async def dropped() -> int:
        got = await notifiers.ListNotifiers(pb.ListNotifiersRequest(vm=vm))
        return sum(n.dropped_total for n in got.notifiers)

    stalled = len(tally.beats)

    def backlog_shown() -> bool:
        late = tally.beats[stalled:]
        return any(p.lag > 0 for p in late) and any(p.queue_depth > 0 for p in late)

    async with writing(daemon.tcp, vm, length=4096):
        # The reader stalls until transport buffers and the queue have filled and the
        # daemon has dropped events, then reads a few beats. A stream held up at a
        # Progress it had just built sends its next one a full interval later, when a
        # fast reader may have drained the queue, so the stall repeats until a beat has
        # shown the backlog (the deadline only bounds a hang).
        deadline = asyncio.get_running_loop().time() + HANG_S
        while not backlog_shown():
            assert asyncio.get_running_loop().time() < deadline, tally.beats[stalled:]
            before = await dropped()

            async def dropped_more(before: int = before) -> bool:
                return await dropped() > before

            await until(dropped_more, "the stalled stream to drop events")
            beats = len(tally.beats)
            while len(tally.beats) < beats + 2:
                tally.take(await asyncio.wait_for(stream.read(), HANG_S))
    head = (await pbg.VmServiceStub(channel).GetVm(pb.GetVmRequest(vm=vm))).vm.head_seq
    while True:  # drain what is left once the writer stopped
        if tally.take(await asyncio.wait_for(stream.read(), HANG_S)) == "progress":
            last = tally.beats[-1]
            if last.head_seq == head and last.lag == 0 and last.queue_depth == 0:
                break
    stream.cancel()
    assert tally.dropped > 0 and last.dropped_total == tally.dropped
    assert backlog_shown()
    assert last.sent_seq == tally.newest == head
    assert tally.received + tally.dropped == head - reg.head_seq
