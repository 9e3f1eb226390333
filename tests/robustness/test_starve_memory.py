"""Memory a tenant causes is counted as the daemon really holds it and capped by the
tenant's quotas: guest memory, track counters, event history, Watch queues. Each case
runs against a real daemon with two tenants: the attacker gets small quotas (so the cap
is reached cheaply), the victim keeps being served meanwhile."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.starve_support import (
    ATTACKER,
    MiB,
    Tenant,
    daemon,
    refused,
    victim_meanwhile,
)

#: the victim's p99 latency while the attacker works: generous, as the machine is shared
#: (a stalled daemon answers in seconds, a serving one in milliseconds)
VICTIM_P99_S = 1.0


async def _stats(tenant: Tenant, vm: str) -> pb.GetStatsResponse:
    reply: pb.GetStatsResponse = await tenant.call(
        tenant.api.admin.GetStats, pb.GetStatsRequest(vm=vm)
    )
    return reply


async def test_scattered_guest_writes_stop_at_guest_memory_bytes(tmp_path: Path) -> None:
    """8-byte writes to scattered pages cost some 330-500 bytes each (the page's objects
    and index), not 8. GetStats reports what is really held, and the write that would
    pass guest_memory_bytes is refused whole. Today's code (before this quota) counted
    8 bytes a page and let 11.5M such writes take 3.5 GiB."""
    quota = 48 * MiB
    with daemon(tmp_path, f"[tenant_quotas.attacker]\nguest_memory_bytes = {quota}\n") as d:
        att = Tenant(d.tcp, ATTACKER)
        vm = await att.new_vm(1 << 30)
        rss0 = d.rss_bytes()
        rng = np.random.default_rng(17)
        batch = 4096
        message = ""
        async with victim_meanwhile(d.tcp) as lat:
            # 256 batches would hold ~1M pages (>= 330 MB): far past the quota.
            for _ in range(256):
                gpa = (rng.integers(0, 1 << 30, batch) << 12) | (rng.integers(0, 512, batch) << 3)
                request = pb.WriteGuestBatchRequest(
                    vm=vm, gpa=gpa.tolist(), vcpu=[0], length=[8] * batch, data=b"\x5a" * 8 * batch
                )
                before = (await _stats(att, vm)).vms[0]
                try:
                    await att.call(att.api.mem.WriteGuestBatch, request)
                except grpc.aio.AioRpcError:
                    message = await refused(att.call(att.api.mem.WriteGuestBatch, request),
                                            "guest_memory_bytes")
                    break
        p99 = lat.p99()  # after the block: a request held up is counted
        grown = d.rss_bytes() - rss0
        print(f"rss_growth_mib: {grown / MiB:.0f}")
        print(f"victim_p99_s: {p99:.3f}")
        assert message, "no write was refused: guest memory is not capped"
        after = (await _stats(att, vm)).vms[0]
        # Refused whole: nothing written, no write counted, memory unchanged.
        assert after.guest_writes == before.guest_writes
        assert after.memory_bytes == before.memory_bytes
        got = await att.call(
            att.api.mem.ReadGuest, pb.ReadGuestRequest(vm=vm, gpa=int(gpa[0]), length=8)
        )
        assert got.data == bytes(8)
        # The truth: at least 300 bytes per written page, and under the quota.
        pages = after.bytes_written // 8
        assert 300 * pages <= after.memory_bytes <= quota
        assert after.memory_bytes > quota * 3 // 4
        assert grown < quota + 96 * MiB, f"RSS grew {grown / MiB:.0f} MiB"
        assert not lat.errors, lat.errors[:3]
        assert p99 < VICTIM_P99_S, f"victim p99 {p99:.3f}s"
        await att.close()


async def _fill(att: Tenant, vm: str) -> int:
    """Write 8 bytes to fresh pages 0, 1, ... (in batches, then one by one) until the
    guest memory quota refuses one; returns how many pages were written."""
    page = 0
    for size in (256, 1):
        while True:
            request = pb.WriteGuestBatchRequest(
                vm=vm, gpa=[(page + i) << 12 for i in range(size)], vcpu=[0],
                length=[8] * size, data=b"\x5a" * 8 * size,
            )
            try:
                await att.call(att.api.mem.WriteGuestBatch, request)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                break
            page += size
    return page


async def _held_writes_land(att: Tenant, vm: str, fresh_page: int) -> None:
    """A fresh page is refused; writes into bytes held already (unary and batched) land
    and grow nothing."""
    before = (await _stats(att, vm)).vms[0]
    await refused(att.call(att.api.mem.WriteGuest, pb.WriteGuestRequest(
        vm=vm, gpa=fresh_page << 12, data=b"\x01" * 8)), "guest_memory_bytes")
    await att.call(att.api.mem.WriteGuest,
                   pb.WriteGuestRequest(vm=vm, gpa=7 << 12, data=b"\x11" * 8))
    await att.call(att.api.mem.WriteGuestBatch, pb.WriteGuestBatchRequest(
        vm=vm, gpa=[p << 12 for p in range(64)], vcpu=[0], length=[8] * 64,
        data=b"\x22" * 8 * 64))
    after = (await _stats(att, vm)).vms[0]
    assert after.memory_bytes == before.memory_bytes
    assert after.guest_writes == before.guest_writes + 65
    got = await att.call(att.api.mem.ReadGuest, pb.ReadGuestRequest(vm=vm, gpa=7 << 12,
                                                                     length=8))
    assert got.data == b"\x22" * 8


async def test_writes_into_memory_already_held_pass_at_the_quota(tmp_path: Path) -> None:
    """guest_memory_bytes stops growth: at the quota a write to a fresh page is refused,
    but writes into bytes the tenant's memory holds already still land (they grow
    nothing), also after a restart with a quota below what the tenant holds (its VMs
    are loaded as they were)."""
    state = tmp_path / "state"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quota = f"[tenant_quotas.attacker]\nguest_memory_bytes = {MiB}\n"
    with daemon(tmp_path / "a", quota, "--state-dir", str(state)) as d:
        att = Tenant(d.tcp, ATTACKER)
        vm = await att.new_vm(1 << 20)
        pages = await _fill(att, vm)
        assert pages > 1000, pages
        await _held_writes_land(att, vm, pages + 1)
        await att.close()
    lower = f"[tenant_quotas.attacker]\nguest_memory_bytes = {MiB // 2}\n"
    with daemon(tmp_path / "b", lower, "--state-dir", str(state)) as d:
        att = Tenant(d.tcp, ATTACKER)
        held = (await _stats(att, vm)).vms[0].memory_bytes
        assert held > MiB // 2, held  # over the new quota
        await _held_writes_land(att, vm, pages + 1)
        await att.close()


async def test_tracking_on_a_huge_slot_stops_at_tracking_bytes(tmp_path: Path) -> None:
    """Counters keep a dense directory per slot: tracking scattered gfns on a slot of 2^31
    pages makes it hold 128 MiB. That is counted against tracking_bytes before anything
    is tracked (today's code took +1 GiB for 65,536 gfns on a larger slot)."""
    quota = 16 * MiB
    with daemon(tmp_path, f"[tenant_quotas.attacker]\ntracking_bytes = {quota}\n") as d:
        att = Tenant(d.tcp, ATTACKER)
        huge = await att.new_vm(1 << 31)
        small = await att.new_vm(1 << 16)
        rss0 = d.rss_bytes()
        gfns = (np.arange(65536, dtype=np.int64) * ((1 << 31) // 65536)).tolist()
        async with victim_meanwhile(d.tcp) as lat:
            await refused(
                att.call(att.api.track.AddTracking, pb.TrackingChangeRequest(
                    vm=huge, gfns=gfns, mode=pb.TRACK_MODE_WRITE)),
                "tracking_bytes",
            )
            # Tracking within the quota still works.
            done = await att.call(att.api.track.AddTracking, pb.TrackingChangeRequest(
                vm=small, ranges=[pb.GfnRange(start=0, count=1 << 16)], mode=pb.TRACK_MODE_WRITE))
            assert done.transitions == 1 << 16
        p99 = lat.p99()  # after the block: a request held up is counted
        stats = (await _stats(att, huge)).vms[0]
        assert stats.tracked_gfns == 0 and stats.track_pool_bytes < MiB
        small_stats = (await _stats(att, small)).vms[0]
        assert small_stats.track_pool_bytes >= (1 << 16) * 2  # counters really held
        grown = d.rss_bytes() - rss0
        print(f"rss_growth_mib: {grown / MiB:.0f}")
        assert grown < 48 * MiB, f"RSS grew {grown / MiB:.0f} MiB"
        print(f"victim_p99_s: {p99:.3f}")
        assert p99 < VICTIM_P99_S, f"victim p99 {p99:.3f}s"
        await att.close()


async def test_a_watch_that_never_reads_holds_its_queue_bytes(tmp_path: Path) -> None:
    """A Watch whose client never reads keeps at most queue_bytes (default 4 MiB) queued,
    whatever the size of the events; what did not fit is dropped and reported. Today's
    code bounded the queue in events only: 65,536 events of 4 KiB each, 256 MiB."""
    config = f"[tenant_quotas.attacker]\nstream_queue_bytes = {12 * MiB}\n"
    with daemon(tmp_path, config) as d:
        att = Tenant(d.tcp, ATTACKER)
        vm = await att.new_vm(256)
        await att.call(att.api.track.AddTracking, pb.TrackingChangeRequest(
            vm=vm, ranges=[pb.GfnRange(start=0, count=256)], mode=pb.TRACK_MODE_WRITE))
        stalled = att.api.watch.Watch(pb.WatchRequest(vm=vm), metadata=att.md)
        first = await stalled.read()
        assert isinstance(first, pb.WatchResponse)
        assert first.registered.queue_bytes == 4 * MiB
        rss0 = d.rss_bytes()
        page = b"\xc3" * 4096
        gpas = [g << 12 for g in range(256)]
        async with victim_meanwhile(d.tcp) as lat:
            for _ in range(96):  # 96 MiB of tracked 4 KiB writes, never read
                await att.call(att.api.mem.WriteGuestBatch, pb.WriteGuestBatchRequest(
                    vm=vm, gpa=gpas, vcpu=[0], length=[4096] * 256, data=page * 256))
        p99 = lat.p99()  # after the block: a request held up is counted
        (info,) = (await att.call(
            att.api.watch.ListNotifiers, pb.ListNotifiersRequest(vm=vm))).notifiers
        assert info.queue_depth * 4096 <= 4 * MiB
        assert info.dropped_total > 0
        grown = d.rss_bytes() - rss0
        print(f"rss_growth_mib: {grown / MiB:.0f}")
        assert grown < 48 * MiB, f"RSS grew {grown / MiB:.0f} MiB"
        print(f"victim_p99_s: {p99:.3f}")
        assert p99 < VICTIM_P99_S, f"victim p99 {p99:.3f}s"
        # The queues' bounds add up against stream_queue_bytes (12 MiB: the stalled
        # stream's 4 MiB, one more of 8 MiB, then no more).
        second = att.api.watch.Watch(pb.WatchRequest(vm=vm, queue_bytes=8 * MiB), metadata=att.md)
        registered = await second.read()
        assert isinstance(registered, pb.WatchResponse)
        assert registered.registered.queue_bytes == 8 * MiB
        third = att.api.watch.Watch(pb.WatchRequest(vm=vm, queue_bytes=4096), metadata=att.md)
        await refused(third.read(), "stream_queue_bytes")
        stalled.cancel()
        second.cancel()
        await att.close()
