"""Streams never lose a write silently: a stalled consumer under a million events, every
slow-consumer policy, over a real daemon and socket."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import DaemonProcess, start_daemon
from tests.rich_status import check_details, details_of

EVENTS = 1_000_000
BATCH = 8192
RSS_BOUND = 300 << 20  #: daemon RSS growth allowed while a consumer is stalled


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("acct"), "--history-events", "4096")
    yield d
    assert d.stop() == 0


async def _setup(ch: grpc.aio.Channel, name: str) -> None:
    await pbg.VmServiceStub(ch).CreateVm(pb.CreateVmRequest(name=name))
    await pbg.MemoryServiceStub(ch).SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=name, slot=0, npages=4096)
    )
    await pbg.TrackingServiceStub(ch).AddTracking(
        pb.TrackingChangeRequest(vm=name, ranges=[pb.GfnRange(start=0, count=1024)])
    )


async def _write(ch: grpc.aio.Channel, name: str, total: int) -> None:
    mem = pbg.MemoryServiceStub(ch)
    rng = np.random.default_rng(7)
    done = 0
    while done < total:
        n = min(BATCH, total - done)
        gfn = rng.integers(0, 1024, n)
        await mem.WriteGuestBatch(
            pb.WriteGuestBatchRequest(
                vm=name, gpa=(gfn << 12).tolist(), vcpu=[0], length=[8] * n, data=b"\xab" * 8 * n
            )
        )
        done += n


@pytest.mark.parametrize("policy", ["DROP", "COALESCE", "BLOCK", "DISCONNECT"])
async def test_stalled_consumer_accounts_for_every_event(
    daemon: DaemonProcess, policy: str
) -> None:
    """A consumer stalls while a million events are written; afterwards events received
    + events reported lost == events written, and the daemon's memory stayed bounded."""
    name = f"acct-{policy.lower()}"
    async with grpc.aio.insecure_channel(daemon.tcp) as ch:
        await _setup(ch, name)
        rss_before = daemon.rss_bytes()
        stream: Any = pbg.WatchServiceStub(ch).Watch(
            pb.WatchRequest(
                vm=name, queue_limit=20000, max_batch_events=4096,
                policy=getattr(pb, f"SLOW_CONSUMER_POLICY_{policy}"), block_timeout_ms=2,
                heartbeat_interval_ms=60000,
            )
        )
        first = await stream.read()
        assert first.HasField("registered")
        await _write(ch, name, EVENTS)  # the consumer reads nothing meanwhile
        rss_peak = daemon.rss_bytes()
        received = lost = coalesced = 0
        last_seq = 0
        reasons: set[int] = set()
        try:
            while received + lost + coalesced < EVENTS:
                msg = await asyncio.wait_for(stream.read(), 10)
                kind = msg.WhichOneof("kind")
                if kind == "events":
                    seqs = list(msg.events.seq)
                    assert seqs[0] > last_seq or policy == "COALESCE"
                    last_seq = max(last_seq, seqs[-1])
                    received += len(seqs)
                elif kind == "gap":
                    reasons.add(msg.gap.reason)
                    if msg.gap.reason == pb.GAP_REASON_COALESCED:
                        coalesced += msg.gap.count
                    else:
                        lost += msg.gap.count
        except grpc.aio.AioRpcError as exc:
            assert policy == "DISCONNECT", exc
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "behind" in (exc.details() or "")
            # A QuotaFailure names the queue limit the stream asked for.
            assert check_details(exc, pb.WatchRequest.DESCRIPTOR) is None
            quota = details_of(exc)["google.rpc.QuotaFailure"].violations[0]
            assert (quota.quota_id, quota.quota_value) == ("queue_limit", 20000)
            # The stream says how far it got; everything after is reported lost.
            lost = EVENTS - received
        stream.cancel()
        assert received + lost + coalesced == EVENTS
        assert received > 0
        if policy == "DROP":
            assert reasons == {pb.GAP_REASON_QUEUE_OVERFLOW}
        if policy == "COALESCE":
            assert coalesced > 0
        if policy == "BLOCK":
            assert lost > 0  # 2 ms of patience per write cannot outlast a stalled reader
        assert rss_peak - rss_before < RSS_BOUND
        stats = await pbg.AdminServiceStub(ch).GetStats(pb.GetStatsRequest(vm=name))
        assert stats.vms[0].emulations == EVENTS
