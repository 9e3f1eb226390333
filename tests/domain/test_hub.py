"""Event hub: bounded queues, slow-consumer policies, history and resume."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.domain import Compacted, DmaPolicy, InvalidArgument, Vm, WriteEvent
from pagetrackd.domain.hub import (
    Gap,
    GapReason,
    History,
    RegionRemoved,
    SlowPolicy,
    Stamped,
    Subscriber,
    VmHub,
    make_filter,
)
from pagetrackd.domain.types import Source


def _vm(tracked: int = 64) -> Vm:
    vm = Vm("vm")
    vm.set_memslot(0, 0, 1024)
    vm.track_add(np.arange(tracked, dtype=np.int64))
    return vm


def _write(vm: Vm, n: int, single: bool, gfns: int = 64) -> None:
    gpa = (np.arange(n, dtype=np.int64) % gfns) << 12
    if single:
        for g in gpa.tolist():
            vm.write(0, g, b"\x01" * 8)
    else:
        vm.write_batch(gpa, np.zeros(n, dtype=np.int64), np.full(n, 8), b"\x01" * 8 * n)


def _drain(
    sub: Subscriber, max_events: int = 1000
) -> tuple[list[int], list[Gap], list[RegionRemoved]]:
    seqs: list[int] = []
    gaps: list[Gap] = []
    regions: list[RegionRemoved] = []
    while sub.pending:
        for item in sub.take(max_events):
            if isinstance(item, Stamped):
                seqs.extend(item.batch.seq.tolist())
            elif isinstance(item, Gap):
                gaps.append(item)
            elif isinstance(item, RegionRemoved):
                regions.append(item)
    return seqs, gaps, regions


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from([SlowPolicy.DROP, SlowPolicy.COALESCE, SlowPolicy.BLOCK]),
    limit=st.integers(1, 50),
    bursts=st.lists(st.tuples(st.integers(1, 120), st.booleans(), st.integers(0, 80)), max_size=6),
)
def test_every_event_is_delivered_or_accounted_for(
    policy: SlowPolicy, limit: int, bursts: list[tuple[int, bool, int]]
) -> None:
    """received + dropped + coalesced == written, seqs increase, and the queue never
    holds more than its limit -- whatever the policy and the consumer's pace."""
    vm = _vm()
    hub = VmHub(History())
    sub = Subscriber(name="s", queue_limit=limit, policy=policy)
    hub.subscribe(vm, sub)
    received: list[int] = []
    gaps: list[Gap] = []
    for n, single, take in bursts:
        _write(vm, n, single)
        assert sub.depth <= limit
        for item in sub.take(take) if take else []:
            if isinstance(item, Stamped):
                received.extend(item.batch.seq.tolist())
            elif isinstance(item, Gap):
                gaps.append(item)
    seqs, more_gaps, _ = _drain(sub)
    received += seqs
    gaps += more_gaps
    written = vm.seq
    lost = sum(g.count for g in gaps)
    assert len(received) + lost == written
    assert received == sorted(received) or policy is SlowPolicy.COALESCE
    assert len(set(received)) == len(received)
    assert sub.counters.dropped + sub.counters.coalesced == lost
    for g in gaps:
        assert g.first_seq <= g.last_seq
        if g.reason is GapReason.DROPPED:
            assert g.count <= g.last_seq - g.first_seq + 1


def test_drop_gap_reports_the_exact_range() -> None:
    """A stalled consumer of queue 10 misses seqs 11..100 and is told exactly that."""
    vm = _vm()
    hub = VmHub(History())
    sub = Subscriber(name="s", queue_limit=10)
    hub.subscribe(vm, sub)
    _write(vm, 100, single=True)
    seqs, gaps, _ = _drain(sub)
    assert seqs == list(range(1, 11))
    assert gaps == [Gap(11, 100, 90, GapReason.DROPPED)]


def test_gap_sits_between_the_events_around_it() -> None:
    """Events after a gap come after the gap record, in seq order."""
    vm = _vm()
    hub = VmHub(History())
    sub = Subscriber(name="s", queue_limit=5)
    hub.subscribe(vm, sub)
    _write(vm, 8, single=False)
    first = sub.take(100)
    _write(vm, 3, single=False)
    rest = sub.take(100)
    kinds = [type(i).__name__ for i in first + rest]
    assert kinds == ["Stamped", "Gap", "Stamped"]
    gap = (first + rest)[1]
    assert isinstance(gap, Gap) and (gap.first_seq, gap.last_seq, gap.count) == (6, 8, 3)


def test_coalesce_keeps_latest_write_per_gfn() -> None:
    """While behind, only the newest event per gfn is kept; the rest are reported."""
    vm = _vm()
    hub = VmHub(History())
    sub = Subscriber(name="s", queue_limit=8, policy=SlowPolicy.COALESCE)
    hub.subscribe(vm, sub)
    _write(vm, 40, single=True, gfns=8)  # 8 fit, 32 are coalesced over 8 gfns
    seqs, gaps, _ = _drain(sub)
    assert seqs[:8] == list(range(1, 9))
    assert sorted(seqs[8:]) == list(range(33, 41))
    assert sum(g.count for g in gaps) == 24
    assert all(g.reason is GapReason.COALESCED for g in gaps)


def test_coalesce_memory_is_bounded_by_the_queue_limit() -> None:
    """Coalescing keeps at most queue_limit gfns; writes to more gfns are dropped and
    reported, so memory stays bounded."""
    vm = _vm()
    hub = VmHub(History())
    sub = Subscriber(name="s", queue_limit=4, policy=SlowPolicy.COALESCE)
    hub.subscribe(vm, sub)
    _write(vm, 40, single=True, gfns=8)
    seqs, gaps, _ = _drain(sub)
    assert len(seqs) + sum(g.count for g in gaps) == 40
    assert any(g.reason is GapReason.DROPPED for g in gaps)


def test_disconnect_policy_records_lag_and_accounts() -> None:
    """The disconnect policy marks the stream with its lag and counts what it lost."""
    vm = _vm()
    hub = VmHub(History())
    sub = Subscriber(name="s", queue_limit=3, policy=SlowPolicy.DISCONNECT)
    hub.subscribe(vm, sub)
    _write(vm, 10, single=True)
    assert sub.overflowed_lag is not None
    assert sub.counters.dropped == 7


def test_filters_by_range_and_source() -> None:
    """Only events in the gfn ranges and of the chosen source are queued."""
    vm = _vm()
    hub = VmHub(History())
    sub = Subscriber(name="s", flt=make_filter([(2, 2)], [Source.GUEST]))
    hub.subscribe(vm, sub)
    _write(vm, 16, single=False, gfns=8)
    _write(vm, 16, single=True, gfns=8)
    seqs, _, _ = _drain(sub)
    assert len(seqs) == 8
    assert sub.counters.filtered == 24


def test_history_resume_and_compaction() -> None:
    """A stream resuming from a held seq gets everything since; an older seq is Compacted."""
    vm = _vm()
    hub = VmHub(History(max_events=100))
    vm.register_notifier(hub.history)
    _write(vm, 50, single=True)
    _write(vm, 200, single=False)
    _write(vm, 30, single=True)
    oldest = hub.history.oldest_seq
    assert 150 <= oldest <= 281
    with pytest.raises(Compacted) as info:
        hub.subscribe(vm, Subscriber(name="old"), start_seq=oldest - 1)
    assert info.value.oldest_seq == oldest
    sub = Subscriber(name="new", queue_limit=1000)
    hub.subscribe(vm, sub, start_seq=oldest)
    _write(vm, 5, single=True)
    seqs, gaps, _ = _drain(sub)
    assert seqs == list(range(oldest, vm.seq + 1))
    assert gaps == []


def test_a_batch_larger_than_the_history_keeps_its_newest_events() -> None:
    """Regression: a batch of more events than the history holds used to leave nothing
    to resume from; now the history keeps its newest max_events events."""
    vm = _vm()
    hub = VmHub(History(max_events=100))
    vm.register_notifier(hub.history)
    _write(vm, 250, single=False)
    assert hub.history.oldest_seq == 151 and hub.history.events == 100
    sub = Subscriber(name="late", queue_limit=1000)
    hub.subscribe(vm, sub, start_seq=151)
    assert _drain(sub)[0] == list(range(151, 251))


def test_history_dump_and_restore_give_the_same_resumes() -> None:
    """A history restored from its dump (a state file) answers every resume as the
    original does: events, region records and the oldest seq."""
    vm = _vm()
    hub = VmHub(History(max_events=300))
    vm.register_notifier(hub.history)
    _write(vm, 120, single=False)
    _write(vm, 30, single=True)
    vm.set_memslot(1, 2048, 16)
    vm.set_memslot(1, 2048, 0)  # a region record between events
    _write(vm, 200, single=False)
    copy = History(max_events=300)
    copy.restore(hub.history.dump(), vm.seq)
    assert copy.oldest_seq == hub.history.oldest_seq > 1
    for start in (copy.oldest_seq, copy.oldest_seq + 17, 149, vm.seq + 1):
        want, got = hub.history.since(start, vm.seq), copy.since(start, vm.seq)
        assert [type(i) for i in got] == [type(i) for i in want]
        for a, b in zip(want, got, strict=True):
            if isinstance(a, Stamped):
                assert isinstance(b, Stamped) and a.ts_ns == b.ts_ns
                assert a.batch.seq.tolist() == b.batch.seq.tolist()
                assert a.batch.data == b.batch.data
            else:
                assert a == b
    with pytest.raises(InvalidArgument):
        History().restore(hub.history.dump(), vm.seq - 1)  # runs past the head


def test_region_removed_reaches_subscribers_in_order() -> None:
    """A slot delete arrives as a record after the events before it."""
    vm = _vm()
    vm.set_memslot(1, 0x1000, 16)
    hub = VmHub(History())
    sub = Subscriber(name="s")
    hub.subscribe(vm, sub)
    _write(vm, 3, single=True)
    vm.set_memslot(1, 0, 0)
    items = sub.take(100)
    assert isinstance(items[-1], RegionRemoved)
    assert (items[-1].base_gfn, items[-1].npages, items[-1].at_seq) == (0x1000, 16, 3)


def test_unsubscribe_stops_delivery_at_once() -> None:
    """After unsubscribe returns, writes queue nothing for the subscriber."""
    vm = _vm()
    hub = VmHub(History())
    sub = Subscriber(name="s")
    hub.subscribe(vm, sub)
    _write(vm, 3, single=True)
    hub.unsubscribe(vm, sub)
    queued = sub.counters.queued
    _write(vm, 3, single=False)
    assert sub.counters.queued == queued


def test_2016_move_drops_plugin_references_keeps_tenants() -> None:
    """2016 semantics: a MOVE tells notifiers the old range is gone; plugin references
    there are dropped (KVMGT's flush_slot removed its own), tenant references move with
    the slot (arch/x86/kvm/page_track.c, v4.6 kvm_page_track_flush_slot)."""
    vm = Vm("vm")
    vm.set_memslot(0, 0x100, 16)
    vm.track_add([0x101, 0x102])
    vm.track_add([0x102, 0x103], owner="plugin:vgpu")
    vm.set_memslot(0, 0x200, 16)
    assert vm.tracked_gfns().tolist() == [0x201, 0x202]
    assert vm.track_query([0x202])[0].owners == {"tenant": 1}


class _DmaOnWrite:
    """A plugin that answers each guest write with a DMA write to another tracked page
    (under dma_policy=notify that DMA is an event of its own, made inside the callback)."""

    name = "dma-on-write"
    external = False

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        if event.source is Source.GUEST:
            vm.dma_write((event.gfn + 1) % 64 << 12, b"dma!")

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        pass


@pytest.mark.parametrize("single", [True, False])
def test_streams_see_events_in_seq_order_when_a_plugin_makes_events(single: bool) -> None:
    """Regression: the history and a stream were told of a plugin's DMA event (seq s+1)
    before the guest write that caused it (seq s) when the plugin was called first; and
    the write path lost the count of the nested notifications. Streams are told first
    now, and a batch hands its held events over before the nested one (notifiers.py)."""
    vm = _vm()
    vm.set_policy(dma_policy=DmaPolicy.NOTIFY)
    hub = VmHub(History())
    vm.register_notifier(hub.history)
    sub = Subscriber(name="s", queue_limit=1 << 16)
    hub.subscribe(vm, sub)
    vm.register_notifier(_DmaOnWrite())  # newest: called first among the plugins
    _write(vm, 20, single)
    assert vm.seq == 40
    got = [s for item in sub.take(1 << 20) if isinstance(item, Stamped)
           for s in item.batch.seq.tolist()]
    assert got == list(range(1, 41))
    held = [s for item in hub.history.since(1, vm.seq) if isinstance(item, Stamped)
            for s in item.batch.seq.tolist()]
    assert held == list(range(1, 41))
    # Each of the 40 events reached the history, the stream and the plugin.
    assert vm.stats.notifications == 40 * 3


@settings(max_examples=80, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(1, 90), st.booleans(), st.integers(1, 24)), min_size=1, max_size=6
    ),
    budgets=st.lists(st.integers(1, 70), min_size=1, max_size=8),
    queue_bytes=st.integers(200, 20_000),
    resume_back=st.integers(0, 300),
)
def test_split_batches_deliver_each_event_with_its_own_bytes(
    writes: list[tuple[int, bool, int]], budgets: list[int], queue_bytes: int, resume_back: int
) -> None:
    """Whatever cuts a batch (take budgets smaller than a batch, a queue that has room
    for part of one, a resume from inside one), every delivered event carries its own
    gpa and bytes, seqs ascend, and what is not delivered is in a gap."""
    vm = _vm()
    hub = VmHub(History(max_events=400))
    vm.register_notifier(hub.history)
    written: dict[int, tuple[int, bytes]] = {}

    def write(n: int, single: bool, size: int) -> None:
        gpa = ((np.arange(n, dtype=np.int64) * 7) % 64 << 12) + vm.seq % 16
        first = vm.seq + 1
        chunks = [bytes([(first + i) % 251]) * size for i in range(n)]
        if single:
            for g, d in zip(gpa.tolist(), chunks, strict=True):
                vm.write(0, g, d)
        else:
            vm.write_batch(gpa, np.zeros(n, dtype=np.int64), np.full(n, size), b"".join(chunks))
        for i, (g, d) in enumerate(zip(gpa.tolist(), chunks, strict=True)):
            written[first + i] = (g, d)

    n0, single0, size0 = writes[0]
    write(n0, single0, size0)
    start = max(hub.history.oldest_seq, vm.seq + 1 - resume_back)
    sub = Subscriber(name="s", queue_limit=1 << 20, queue_bytes=queue_bytes)
    hub.subscribe(vm, sub, start_seq=start)
    seen: list[int] = []
    lost = 0
    k = 0
    for n, single, size in writes[1:] + [(0, False, 1)]:
        while sub.pending:
            for item in sub.take(budgets[k % len(budgets)]):
                if isinstance(item, Stamped):
                    for e in item.batch.events():
                        assert (e.gpa, e.data) == written[e.seq]
                        seen.append(e.seq)
                elif isinstance(item, Gap):
                    lost += item.count
            k += 1
            if k % 3 == 0:
                break  # let the next write find a part-full queue
        if n:
            write(n, single, size)
    while sub.pending:
        for item in sub.take(budgets[0]):
            if isinstance(item, Stamped):
                for e in item.batch.events():
                    assert (e.gpa, e.data) == written[e.seq]
                    seen.append(e.seq)
            elif isinstance(item, Gap):
                lost += item.count
    assert seen == sorted(set(seen))
    assert len(seen) + lost == vm.seq - start + 1
