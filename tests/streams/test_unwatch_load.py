"""Unregistering under load: while a writer keeps tracked writes coming, a stream that is
unwatched gets nothing newer than the seq Unwatch confirmed, every event up to it is
delivered or accounted for, and the stream ends with Closed(UNWATCHED); a stream that is
cancelled leaves the subscriber counts where they were."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import DaemonProcess, start_daemon
from tests.streams.load import BATCH, setup_vm, writing
from tests.waiting import HANG_S

ROUNDS = 12


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("unwatch"))
    yield d
    assert d.stop() == 0


@pytest.fixture
async def channel(daemon: DaemonProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(daemon.tcp) as ch:
        yield ch


@dataclass
class Received:
    """What one stream delivered, in order."""

    seqs: list[int] = field(default_factory=list)
    gaps: list[pb.Gap] = field(default_factory=list)
    closed: pb.Closed | None = None
    kinds: list[str] = field(default_factory=list)
    #: set once ``enough`` events have arrived
    enough: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


async def _read_all(stream: Any, out: Received, delay: float) -> None:
    """Read until the stream ends, sleeping ``delay`` per message (a slow consumer)."""
    while True:
        msg = await stream.read()
        if msg is grpc.aio.EOF:
            return
        kind = msg.WhichOneof("kind")
        out.kinds.append(kind)
        if kind == "events":
            out.seqs.extend(msg.events.seq)
            if len(out.seqs) >= out.enough:
                out.arrived.set()
        elif kind == "gap":
            out.gaps.append(msg.gap)
        elif kind == "closed":
            assert out.closed is None, "two Closed messages"
            out.closed = msg.closed
        if delay:
            await asyncio.sleep(delay)


POLICIES = {
    "drop": (pb.SLOW_CONSUMER_POLICY_DROP, 1 << 20, 0.0),  # big queue: nothing lost
    "drop-small": (pb.SLOW_CONSUMER_POLICY_DROP, 300, 0.002),
    "coalesce": (pb.SLOW_CONSUMER_POLICY_COALESCE, 300, 0.002),
    "block": (pb.SLOW_CONSUMER_POLICY_BLOCK, 300, 0.002),
}


@pytest.mark.parametrize("policy", list(POLICIES))
async def test_nothing_after_unwatch_confirms_under_load(
    daemon: DaemonProcess, channel: grpc.aio.Channel, policy: str
) -> None:
    """Round after round under continuous writes: open a stream, let events flow, Unwatch.
    No event after UnwatchResponse.last_seq ever arrives; Closed(UNWATCHED) is the last
    message and names that seq; every event between registration and it was received
    once, or reported in a gap (drop) or folded (coalesce)."""
    number, queue_limit, delay = POLICIES[policy]
    vm = f"unwatch-{policy}"
    await setup_vm(channel, vm)
    watch = pbg.WatchServiceStub(channel)
    async with writing(daemon.tcp, vm):
        for _ in range(ROUNDS):
            stream: Any = watch.Watch(pb.WatchRequest(
                vm=vm, policy=number, queue_limit=queue_limit, block_timeout_ms=5,
                max_batch_events=512, heartbeat_interval_ms=50))
            reg = (await stream.read()).registered
            got = Received(enough=2 * BATCH)
            reader = asyncio.create_task(_read_all(stream, got, delay))
            await asyncio.wait_for(got.arrived.wait(), HANG_S)
            reply = await watch.Unwatch(
                pb.UnwatchRequest(vm=vm, notifier_id=reg.notifier_id))
            at_reply = len(got.seqs)
            await asyncio.wait_for(reader, HANG_S)
            assert await stream.code() == grpc.StatusCode.OK
            # Nothing newer than the confirmed seq, before or after the reply.
            assert max(got.seqs) <= reply.last_seq
            assert got.kinds[-1] == "closed" and got.closed is not None
            assert got.closed.reason == pb.CLOSE_REASON_UNWATCHED
            assert got.closed.last_seq <= reply.last_seq
            assert "closed" not in got.kinds[:-1]
            # Every event between registration and the confirmed seq is accounted for.
            expected = reply.last_seq - reg.head_seq
            lost = sum(g.count for g in got.gaps)
            if policy == "coalesce":
                assert len(got.seqs) + lost == expected
                assert len(set(got.seqs)) == len(got.seqs)
            else:
                assert got.closed.last_seq == reply.last_seq
                assert got.seqs == sorted(got.seqs)
                covered = set(got.seqs)
                for g in got.gaps:
                    span = set(range(g.first_seq, g.last_seq + 1))
                    assert len(span) == g.count and not span & covered
                    covered |= span
                assert covered == set(range(reg.head_seq + 1, reply.last_seq + 1))
            if policy == "drop":
                assert lost == 0 and len(got.seqs) == expected
            assert at_reply <= len(got.seqs)
    listed = await watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))
    assert not listed.notifiers


async def _process(ch: grpc.aio.Channel) -> pb.ProcessInfo:
    return (await pbg.AdminServiceStub(ch).GetServerInfo(pb.GetServerInfoRequest())).process


async def test_cancel_under_load_returns_counts_to_baseline(
    daemon: DaemonProcess, channel: grpc.aio.Channel
) -> None:
    """Streams cancelled by their clients while writes pour in (some mid-read, some with a
    full queue) are unregistered: watchers, notifiers, leases and tasks return to the
    baseline, and the VM's own figures say no notifier is left."""
    vm = "cancel-load"
    await setup_vm(channel, vm)
    base = await _process(channel)
    watch = pbg.WatchServiceStub(channel)
    async with writing(daemon.tcp, vm):
        for round_ in range(4):
            streams: list[Any] = [
                watch.Watch(pb.WatchRequest(vm=vm, queue_limit=64 if i % 2 else 1 << 16,
                                            heartbeat_interval_ms=50))
                for i in range(16)
            ]
            for s in streams:
                assert (await s.read()).HasField("registered")
            during = await _process(channel)
            assert during.watchers == base.watchers + 16
            assert during.notifiers == base.notifiers + 16
            for i, s in enumerate(streams):
                if i % 4 == round_ % 4:
                    continue  # never read after Registered
                for _ in range(3):
                    await s.read()
            for s in streams:
                s.cancel()
    deadline = asyncio.get_running_loop().time() + HANG_S
    while True:
        now = await _process(channel)
        counts = (now.watchers, now.notifiers, now.leases, now.tasks)
        if counts == (base.watchers, base.notifiers, base.leases, base.tasks):
            break
        assert asyncio.get_running_loop().time() < deadline, (base, now)
        await asyncio.sleep(0.05)
    got = await pbg.VmServiceStub(channel).GetVm(pb.GetVmRequest(vm=vm))
    assert got.vm.notifier_count == 0
