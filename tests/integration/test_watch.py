"""WatchService against a real daemon: registration, columnar batches, filters, batching
bounds, heartbeats, region records, drops with exact gaps, Unwatch, VM deletion."""

from __future__ import annotations

import time

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.integration.support import (
    Api,
    Watch,
    expect_error,
    expect_stream_error,
    notifiers_gone,
    open_watch,
    snapshot,
    split_events,
    tracked_writes,
)
from tests.waiting import until

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SLOT0 = 0x100 << 12
GUEST_WRITE = pb.TRACK_MODE_WRITE << 8  # flags of a guest write in WRITE mode
NO_VCPU = 0xFFFF_FFFF


async def track(api: Api, vm: str, *gfns: int) -> None:
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=list(gfns)))


async def test_registered_comes_first_with_settings_in_force(api: Api, vm: str) -> None:
    """The first message is Registered: notifier id, head seq, start seq, a stream
    lease and every effective setting; the stream is listed as a notifier."""
    await track(api, vm, 0x100)
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0, data=b"before"))
    limits = (await api.admin.GetServerInfo(pb.GetServerInfoRequest())).limits
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_events=7))
    reg = w.registered
    assert reg.notifier_id > 0 and reg.head_seq == 1 and reg.start_seq == 2
    assert reg.oldest_seq == 1 and reg.lease_id
    assert reg.max_batch_events == 7
    assert reg.max_batch_bytes == limits.default_watch_batch_bytes
    assert reg.max_batch_delay_ms == limits.default_watch_batch_delay_ms
    assert reg.queue_limit == limits.default_queue_limit
    assert reg.heartbeat_interval_ms == limits.default_heartbeat_interval_ms
    assert reg.policy == pb.SLOW_CONSUMER_POLICY_DROP and reg.block_timeout_ms == 0
    notifiers = (await api.watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))).notifiers
    assert [(n.notifier_id, n.kind, n.lease_id) for n in notifiers] == [
        (reg.notifier_id, pb.NOTIFIER_KIND_WATCH, reg.lease_id)
    ]
    assert (await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.notifier_count == 1
    w.call.cancel()


async def test_events_arrive_as_columnar_batches_with_their_data(api: Api, vm: str) -> None:
    """Single and batched writes arrive as batches whose columns and data match the
    writes, with gap-free seqs; a write crossing a page is two events."""
    await track(api, vm, 0x100, 0x101, 0x102, 0x103)
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_delay_ms=0))
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, vcpu=5, gpa=SLOT0 + 8, data=b"one"))
    await api.mem.WriteGuestBatch(
        pb.WriteGuestBatchRequest(
            vm=vm, gpa=[SLOT0 + 4096, SLOT0 + 3 * 4096 + 9, SLOT0 + 2 * 4096 + 4094],
            vcpu=[1, 2, 3], length=[2, 3, 4], data=b"ab" + b"xyz" + b"WXYZ",
        )
    )
    batches = await w.events_until(5)
    events = [e for b in batches for e in split_events(b)]
    assert events == [
        (1, SLOT0 + 8, 3, 5, GUEST_WRITE, b"one"),
        (2, SLOT0 + 4096, 2, 1, GUEST_WRITE, b"ab"),
        (3, SLOT0 + 3 * 4096 + 9, 3, 2, GUEST_WRITE, b"xyz"),
        (4, SLOT0 + 2 * 4096 + 4094, 2, 3, GUEST_WRITE, b"WX"),
        (5, SLOT0 + 3 * 4096, 2, 3, GUEST_WRITE, b"YZ"),
    ]
    for b in batches:
        n = len(b.seq)
        assert len(b.gpa) == len(b.length) == len(b.vcpu) == len(b.flags) == n
        assert len(b.timestamp_ns) == n and min(b.timestamp_ns) > 0
        assert len(b.data) == sum(b.length) and b.head_seq >= b.seq[-1]
    w.call.cancel()


async def test_omit_data_leaves_data_out_and_flags_it(api: Api, vm: str) -> None:
    """With omit_data the batch has no bytes and every event has DATA_OMITTED set."""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, omit_data=True, max_batch_delay_ms=0))
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0, data=b"secret"))
    (b,) = await w.events_until(1)
    assert b.data == b"" and list(b.length) == [6]
    assert list(b.flags) == [GUEST_WRITE | pb.EVENT_FLAG_DATA_OMITTED]
    w.call.cancel()


async def test_filters_by_gfn_range_and_source(api: Api, vm: str) -> None:
    """A gfn-range filter keeps only events in its ranges; a source filter only DMA
    events (flag SOURCE_DMA, vcpu 2^32-1); both for single and batched writes."""
    await track(api, vm, 0x100, 0x101)
    await api.vm.SetVmPolicy(pb.SetVmPolicyRequest(vm=vm, dma_policy=pb.DMA_POLICY_NOTIFY))
    by_gfn = await open_watch(api, pb.WatchRequest(
        vm=vm, gfn_ranges=[pb.GfnRange(start=0x101, count=1)], max_batch_delay_ms=0))
    dma_only = await open_watch(api, pb.WatchRequest(
        vm=vm, sources=[pb.EVENT_SOURCE_DMA], max_batch_delay_ms=0))
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0, data=b"g0"))  # 1
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0 + 4096, data=b"g1"))  # 2
    await tracked_writes(api, vm, [SLOT0 + 4096, SLOT0, SLOT0 + 4096], b"bb")  # 3, 4, 5
    await api.mem.DmaWrite(pb.DmaWriteRequest(vm=vm, gpa=SLOT0 + 4096, data=b"d1"))  # 6
    await api.mem.DmaWrite(pb.DmaWriteRequest(vm=vm, gpa=SLOT0, data=b"d0"))  # 7
    got = [e for b in await by_gfn.events_until(6) for e in split_events(b)]
    assert [(e[0], e[1]) for e in got] == [(s, SLOT0 + 4096) for s in (2, 3, 5, 6)]
    assert got[-1][3:] == (NO_VCPU, GUEST_WRITE | pb.EVENT_FLAG_SOURCE_DMA, b"d1")
    dma = [e for b in await dma_only.events_until(7) for e in split_events(b)]
    assert [(e[0], e[3], e[4], e[5]) for e in dma] == [
        (6, NO_VCPU, GUEST_WRITE | pb.EVENT_FLAG_SOURCE_DMA, b"d1"),
        (7, NO_VCPU, GUEST_WRITE | pb.EVENT_FLAG_SOURCE_DMA, b"d0"),
    ]
    by_gfn.call.cancel()
    dma_only.call.cancel()


async def test_batches_hold_at_most_max_batch_events(api: Api, vm: str) -> None:
    """No batch has more than max_batch_events events, and none is lost."""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_events=3, max_batch_delay_ms=0))
    await tracked_writes(api, vm, [SLOT0 + 8 * i for i in range(10)])
    batches = await w.events_until(10)
    assert all(1 <= len(b.seq) <= 3 for b in batches)
    assert [s for b in batches for s in b.seq] == list(range(1, 11))
    w.call.cancel()


async def test_batches_hold_at_most_max_batch_bytes(api: Api, vm: str) -> None:
    """No batch carries more than max_batch_bytes bytes of data, and none is lost."""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_bytes=4096, max_batch_delay_ms=0))
    await tracked_writes(api, vm, [SLOT0] * 12, b"q" * 1000)
    batches = await w.events_until(12)
    assert all(len(b.data) <= 4096 for b in batches), [len(b.data) for b in batches]
    assert [s for b in batches for s in b.seq] == list(range(1, 13))
    w.call.cancel()


async def test_batch_delay_waits_for_more_events_up_to_the_bound(api: Api, vm: str) -> None:
    """A lone event waits max_batch_delay_ms for company; a full batch goes out as one
    message. (How much sooner a full batch arrives is a timing figure: not tested here.)"""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_events=4, max_batch_delay_ms=400))
    t0 = time.monotonic()
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0, data=b"1"))
    await w.events_until(1)
    lone = time.monotonic() - t0
    await tracked_writes(api, vm, [SLOT0] * 4)
    (full,) = await w.events_until(5)
    assert lone >= 0.3, lone  # a busy machine only makes it later
    assert list(full.seq) == [2, 3, 4, 5]
    w.call.cancel()


async def test_each_stream_waits_its_own_batch_delay(api: Api, vm: str) -> None:
    """Streams with different batch delays share the daemon's timers but each waits its
    own: the short delay's stream gets the event, the long one's still holds it."""
    await track(api, vm, 0x100)
    short = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_delay_ms=20))
    long = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_delay_ms=600))
    t0 = time.monotonic()
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0, data=b"1"))
    (first,) = await short.events_until(1)
    (held,) = await long.events_until(1)
    assert time.monotonic() - t0 >= 0.5  # a busy machine only makes it later
    assert list(first.seq) == list(held.seq) == [1]
    short.call.cancel()
    long.call.cancel()


async def test_unwatch_sends_events_held_for_the_batch_delay_first(api: Api, vm: str) -> None:
    """Events held for a long batch delay are not lost to Unwatch: they come, in order,
    before Closed(UNWATCHED)."""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_delay_ms=1000,
                                              heartbeat_interval_ms=60000))
    await tracked_writes(api, vm, [SLOT0] * 3)
    r = await api.watch.Unwatch(pb.UnwatchRequest(vm=vm, notifier_id=w.registered.notifier_id))
    assert r.last_seq == 3
    kinds = []
    while (msg := await w.next_kind()) is not None:
        kinds.append(msg.WhichOneof("kind"))
    assert kinds == ["events", "closed"], kinds
    assert [s for b in w.of_kind("events") for s in b.seq] == [1, 2, 3]
    assert w.of_kind("closed")[0].reason == pb.CLOSE_REASON_UNWATCHED


async def test_progress_heartbeats_while_idle(api: Api, vm: str) -> None:
    """An idle stream gets Progress every heartbeat_interval_ms with the head seq, lag
    and counters."""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, heartbeat_interval_ms=50,
                                              max_batch_delay_ms=0))
    await tracked_writes(api, vm, [SLOT0] * 3)
    await w.events_until(3)
    beats: list[pb.Progress] = []
    while len(beats) < 3:
        msg = await w.next()
        assert msg is not None and msg.WhichOneof("kind") == "progress", msg
        beats.append(msg.progress)
    assert all(a.timestamp_ns < b.timestamp_ns for a, b in zip(beats, beats[1:], strict=False))
    last = beats[-1]
    assert (last.head_seq, last.sent_seq, last.lag, last.queue_depth) == (3, 3, 0, 0)
    assert (last.sent_total, last.dropped_total) == (3, 0) and last.timestamp_ns > 0
    w.call.cancel()


async def test_region_removed_on_memslot_move_and_delete(api: Api, vm: str) -> None:
    """A MOVE and a DELETE each send a RegionRemoved for the old range, ordered with
    the events by at_seq."""
    await api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=vm, slot=3, base_gfn=0x400,
                                                            npages=4))
    await track(api, vm, 0x400)
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_delay_ms=0))
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=0x400 << 12, data=b"a"))
    moved = await api.mem.SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=vm, slot=3, base_gfn=0x500, npages=4))
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=0x500 << 12, data=b"b"))
    deleted = await api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=vm, slot=3, npages=0))
    assert (moved.at_seq, deleted.at_seq) == (1, 2)
    kinds: list[tuple[str, tuple[int, ...]]] = []
    while len(kinds) < 4:
        msg = await w.next_kind()
        assert msg is not None
        kind = msg.WhichOneof("kind")
        if kind == "events":
            kinds.append(("events", tuple(msg.events.seq)))
        else:
            r = msg.region_removed
            kinds.append(("region_removed", (r.base_gfn, r.npages, r.at_seq, r.slot, r.change,
                                             r.new_base_gfn)))
    assert kinds == [
        ("events", (1,)), ("region_removed", (0x400, 4, 1, 3, pb.MEMSLOT_CHANGE_MOVE, 0x500)),
        ("events", (2,)), ("region_removed", (0x500, 4, 2, 3, pb.MEMSLOT_CHANGE_DELETE, 0)),
    ]
    w.call.cancel()


def check_accounting(w: Watch, written: list[int]) -> tuple[int, int]:
    """Every written seq was either received exactly once or lies in exactly one gap
    whose count is exact; returns (received, dropped)."""
    received = [s for b in w.of_kind("events") for s in b.seq]
    assert received == sorted(set(received)), "events out of order or duplicated"
    gaps = w.of_kind("gap")
    lost: list[int] = []
    for g in gaps:
        assert g.reason == pb.GAP_REASON_QUEUE_OVERFLOW
        in_range = [s for s in written if g.first_seq <= s <= g.last_seq]
        assert g.count == len(in_range), (g, in_range)
        assert not set(in_range) & set(received), "a gap covers a delivered event"
        lost.extend(in_range)
    assert sorted(received + lost) == written
    return len(received), len(lost)


async def test_drop_policy_reports_exact_gap(api: Api, vm: str) -> None:
    """With queue_limit 4, a batch of 20 events delivers 4 and one Gap for exactly
    seqs 5..20 (count 16); later events flow again; the drops are counted."""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, queue_limit=4, max_batch_delay_ms=0,
                                              heartbeat_interval_ms=60000))
    await tracked_writes(api, vm, [SLOT0] * 20)
    await tracked_writes(api, vm, [SLOT0] * 3)
    await w.events_until(23)
    assert [list(b.seq) for b in w.of_kind("events")][0] == [1, 2, 3, 4]
    (gap,) = w.of_kind("gap")
    assert (gap.first_seq, gap.last_seq, gap.count, gap.reason) == (
        5, 20, 16, pb.GAP_REASON_QUEUE_OVERFLOW,
    )
    assert check_accounting(w, list(range(1, 24))) == (7, 16)
    notifiers = (await api.watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))).notifiers
    assert notifiers[0].dropped_total == 16 and notifiers[0].sent_total == 7
    stats = (await api.admin.GetStats(pb.GetStatsRequest(vm=vm))).vms[0]
    assert stats.events_dropped == 16
    w.call.cancel()


async def test_drop_policy_with_a_stalled_reader(api: Api, vm: str) -> None:
    """A reader that stops reading while writes go on loses events, never silently:
    received + dropped == written, and every gap names its exact range and count."""
    await track(api, vm, 0x100, 0x101)
    w = await open_watch(api, pb.WatchRequest(vm=vm, queue_limit=16, max_batch_delay_ms=0,
                                              heartbeat_interval_ms=60000))
    payload = b"s" * 4096
    written = 0
    for _ in range(40):  # 40 x 64 x 4 KiB = 10 MiB, far past the transport's buffers
        r = await tracked_writes(api, vm, [SLOT0] * 64, payload)
        written = r.last_seq
    msg = None
    while True:
        msg = await w.next(5.0)
        assert msg is not None
        kind = msg.WhichOneof("kind")
        last = (msg.events.seq[-1] if kind == "events" else
                msg.gap.last_seq if kind == "gap" else 0)
        if last >= written:
            break
    received, dropped = check_accounting(w, list(range(1, written + 1)))
    assert dropped > 0 and received + dropped == written == 40 * 64
    w.call.cancel()


async def test_unwatch_confirms_then_only_closed_arrives(api: Api, vm: str) -> None:
    """After Unwatch returns, the stream sends nothing but Closed(UNWATCHED) and ends
    OK; later writes do not reach it; the notifier and its lease are gone."""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_delay_ms=0,
                                              heartbeat_interval_ms=60000))
    await tracked_writes(api, vm, [SLOT0] * 2)
    await w.events_until(2)
    r = await api.watch.Unwatch(pb.UnwatchRequest(vm=vm, notifier_id=w.registered.notifier_id))
    assert r.last_seq == 2
    await tracked_writes(api, vm, [SLOT0] * 2)
    msg = await w.next()
    assert msg is not None and msg.WhichOneof("kind") == "closed", msg
    assert (msg.closed.reason, msg.closed.last_seq) == (pb.CLOSE_REASON_UNWATCHED, 2)
    assert await w.next() is None
    assert await w.call.code() == grpc.StatusCode.OK
    assert not (await api.watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))).notifiers
    leases = (await api.lease.ListLeases(pb.ListLeasesRequest())).leases
    assert w.registered.lease_id not in {le.id for le in leases}


async def test_vm_deletion_closes_streams(api: Api, vm: str) -> None:
    """Deleting the VM sends each stream its region records, then Closed(VM_DELETED),
    and ends it OK."""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_delay_ms=0,
                                              heartbeat_interval_ms=60000))
    await tracked_writes(api, vm, [SLOT0])
    await w.events_until(1)
    assert (await api.vm.DeleteVm(pb.DeleteVmRequest(vm=vm))).last_seq == 1
    rest = []
    while (msg := await w.next()) is not None:
        rest.append(msg)
    assert [m.WhichOneof("kind") for m in rest] == ["region_removed"] * 2 + ["closed"]
    assert {(m.region_removed.base_gfn, m.region_removed.npages) for m in rest[:2]} == {
        (0x100, 64), (0x200, 16),
    }
    assert (rest[-1].closed.reason, rest[-1].closed.last_seq) == (pb.CLOSE_REASON_VM_DELETED, 1)
    assert await w.call.code() == grpc.StatusCode.OK


async def test_stream_lease_tracking_ends_with_the_stream(api: Api, vm: str) -> None:
    """Tracking added under a stream's lease is released when the stream ends."""
    w = await open_watch(api, pb.WatchRequest(vm=vm))
    await api.track.AddTracking(
        pb.TrackingChangeRequest(vm=vm, gfns=[0x105, 0x106], lease_id=w.registered.lease_id))
    assert (await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.tracked_gfns == 2
    w.call.cancel()

    async def released() -> bool:
        return (await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.tracked_gfns == 0

    await until(released, "the stream's tracking to be released")
    assert not (await api.watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))).notifiers


async def test_resume_from_history_and_compaction(api: Api) -> None:
    """start_seq inside the history replays from there; a compacted start_seq is
    OUT_OF_RANGE naming the oldest seq, or a COMPACTED gap with allow_compacted; a
    start_seq in the future is OUT_OF_RANGE."""
    from tests.integration.support import new_name

    name = new_name()
    await api.vm.CreateVm(pb.CreateVmRequest(
        name=name, options=pb.VmOptions(limits=pb.VmLimits(history_events=8))))
    try:
        await api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=name, slot=0, npages=4))
        await track(api, name, 0)
        for _ in range(4):
            await tracked_writes(api, name, [0] * 8)  # seqs 1..32 in batches of 8
        w = await open_watch(api, pb.WatchRequest(vm=name, start_seq=27, max_batch_delay_ms=0))
        assert w.registered.start_seq == 27 and w.registered.head_seq == 32
        assert [s for b in await w.events_until(32) for s in b.seq] == list(range(27, 33))
        w.call.cancel()
        oldest = w.registered.oldest_seq
        assert 1 < oldest <= 27
        await expect_stream_error(
            api.watch.Watch(pb.WatchRequest(vm=name, start_seq=1)),
            grpc.StatusCode.OUT_OF_RANGE, str(oldest),
        )
        await expect_stream_error(
            api.watch.Watch(pb.WatchRequest(vm=name, start_seq=34)),
            grpc.StatusCode.OUT_OF_RANGE, "34",
        )
        w = await open_watch(api, pb.WatchRequest(vm=name, start_seq=1, allow_compacted=True,
                                                  max_batch_delay_ms=0))
        first = await w.next()
        assert first is not None and first.WhichOneof("kind") == "gap"
        assert (first.gap.first_seq, first.gap.last_seq, first.gap.count, first.gap.reason) == (
            1, oldest - 1, oldest - 1, pb.GAP_REASON_COMPACTED,
        )
        assert [s for b in await w.events_until(32) for s in b.seq] == list(range(oldest, 33))
        w.call.cancel()
        assert await notifiers_gone(api, name)
    finally:
        await api.vm.DeleteVm(pb.DeleteVmRequest(vm=name))


BAD_WATCH = [
    ({"max_batch_events": 0}, "max_batch_events"),
    ({"max_batch_events": 2**32 - 1}, "max_batch_events"),
    ({"max_batch_bytes": 4095}, "max_batch_bytes"),
    ({"max_batch_bytes": 2**32 - 1}, "max_batch_bytes"),
    ({"max_batch_delay_ms": 100000}, "max_batch_delay_ms"),
    ({"queue_limit": 0}, "queue_limit"),
    ({"queue_limit": 2**32 - 1}, "queue_limit"),
    ({"heartbeat_interval_ms": 1}, "heartbeat_interval_ms"),
    ({"heartbeat_interval_ms": 2**32 - 1}, "heartbeat_interval_ms"),
    ({"policy": 99}, "policy"),
    ({"policy": pb.SLOW_CONSUMER_POLICY_BLOCK, "block_timeout_ms": 0}, "block_timeout_ms"),
    ({"policy": pb.SLOW_CONSUMER_POLICY_BLOCK, "block_timeout_ms": 10**9}, "block_timeout_ms"),
    ({"gfn_ranges": [pb.GfnRange(start=0x100, count=0)]}, "count"),
    ({"gfn_ranges": [pb.GfnRange(start=2**64 - 1, count=2)]}, "gfn space"),
    ({"gfn_ranges": [pb.GfnRange(start=1, count=1)] * 1025}, "gfn_ranges"),
    ({"sources": [pb.EVENT_SOURCE_UNSPECIFIED]}, "sources"),
    ({"sources": [42]}, "sources"),
    ({"modes": [9]}, "modes"),
    ({"only_owned": True, "owner_leases": ["no-such-lease"]}, "no-such-lease"),
    ({"owner_leases": ["x"] * 65, "only_owned": True}, "owner_leases"),
]


@pytest.mark.parametrize(("fields", "needle"), BAD_WATCH)
async def test_watch_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, object], needle: str
) -> None:
    """Each malformed Watch field ends the stream at once with INVALID_ARGUMENT (or
    NOT_FOUND for an unknown lease) naming it; no notifier or lease is left behind."""
    before = await snapshot(api, vm)
    code = grpc.StatusCode.NOT_FOUND if needle == "no-such-lease" else INVALID
    await expect_stream_error(
        api.watch.Watch(pb.WatchRequest(vm=vm, **fields)),  # type: ignore[arg-type]
        code, needle,
    )
    assert await snapshot(api, vm) == before


async def test_owner_leases_need_only_owned(api: Api, vm: str) -> None:
    """owner_leases without only_owned is INVALID_ARGUMENT naming both."""
    lease = (await api.lease.CreateLease(pb.CreateLeaseRequest(ttl_ms=60000))).lease
    await expect_stream_error(
        api.watch.Watch(pb.WatchRequest(vm=vm, owner_leases=[lease.id])), INVALID, "only_owned",
    )
    await api.lease.RevokeLease(pb.RevokeLeaseRequest(lease_id=lease.id))


async def test_watch_unwatch_list_on_unknown_vm_or_notifier(api: Api, vm: str) -> None:
    """An unknown VM is NOT_FOUND for all three calls; an unknown notifier id (or
    another VM's) is NOT_FOUND for Unwatch and leaves the stream open."""
    await expect_stream_error(
        api.watch.Watch(pb.WatchRequest(vm="ghost-vm")), grpc.StatusCode.NOT_FOUND, "ghost-vm")
    await expect_error(api.watch.Unwatch(pb.UnwatchRequest(vm="ghost-vm", notifier_id=1)),
                       grpc.StatusCode.NOT_FOUND, "ghost-vm")
    await expect_error(api.watch.ListNotifiers(pb.ListNotifiersRequest(vm="ghost-vm")),
                       grpc.StatusCode.NOT_FOUND, "ghost-vm")
    w = await open_watch(api, pb.WatchRequest(vm=vm))
    for nid in (0, w.registered.notifier_id + 1000, 2**64 - 1):
        await expect_error(api.watch.Unwatch(pb.UnwatchRequest(vm=vm, notifier_id=nid)),
                           grpc.StatusCode.NOT_FOUND, str(nid))
    assert len((await api.watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))).notifiers) == 1
    w.call.cancel()


async def test_batches_from_several_calls_share_a_message(api: Api, vm: str) -> None:
    """Events of several write calls made within max_batch_delay_ms arrive in one
    EventBatch, in seq order, each event with its own bytes."""
    await track(api, vm, 0x100)
    w = await open_watch(api, pb.WatchRequest(vm=vm, max_batch_delay_ms=300,
                                              heartbeat_interval_ms=60000))
    await tracked_writes(api, vm, [SLOT0, SLOT0 + 8], b"a" * 8)
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0 + 16, data=b"b" * 4))
    await tracked_writes(api, vm, [SLOT0 + 24] * 3, b"c" * 2)
    (batch,) = await w.events_until(6)
    assert [(e[0], e[1], e[5]) for e in split_events(batch)] == [
        (1, SLOT0, b"a" * 8), (2, SLOT0 + 8, b"a" * 8), (3, SLOT0 + 16, b"b" * 4),
        (4, SLOT0 + 24, b"cc"), (5, SLOT0 + 24, b"cc"), (6, SLOT0 + 24, b"cc"),
    ]
    assert len(set(batch.timestamp_ns)) >= 2  # each call keeps its own time
    w.call.cancel()
