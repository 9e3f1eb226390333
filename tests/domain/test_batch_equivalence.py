"""``write_batch`` must equal calling ``write`` for each write, in order.

Two identical VMs get the same writes: one through ``write``, one through
``write_batch``. Outcome per piece, seqs, guest memory, dirty logs, tracking, stats and
what every notifier saw must be the same, including when a per-event notifier changes
tracking (and memslots, and memory by DMA) from inside its callback, which forces the
batch to classify the rest of its pieces again, and when it makes events of its own (DMA
under dma_policy=notify) or registers and unregisters the batch notifier mid-batch: batch
notifiers must still see every event in seq order, and only those of their registered time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.domain import (
    DmaPolicy,
    EventBatch,
    SlotFlags,
    Vm,
    WriteEvent,
    WritePath,
)
from pagetrackd.domain.notifiers import NotifierNode

PAGE = 4096
VCPUS = 3
OWNER = "plugin:meddler"
#: slot id -> (base gfn, npages); slot 2 is created and deleted by the meddler
SLOTS = {0: (0, 16), 1: (32, 8)}
EXTRA_SLOT = (2, 48, 4)


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    with structlog.testing.capture_logs():
        yield


@dataclass
class Snooper:
    """Per-event: records each event and the written page as it is when told."""

    name: str = "snooper"
    external: bool = True
    seen: list[tuple[Any, ...]] = field(default_factory=list)
    regions: list[tuple[int, int]] = field(default_factory=list)

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        page = vm.read(event.gpa & ~(PAGE - 1), PAGE)
        self.seen.append(
            (event.seq, event.vcpu, event.gpa, event.data, event.source, event.untracked, page)
        )

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        self.regions.append((base_gfn, npages))


@dataclass
class BatchSnooper:
    """Batch-capable: one call per batch, one per event for single writes."""

    name: str = "batch-snooper"
    external: bool = False
    seen: list[tuple[Any, ...]] = field(default_factory=list)
    regions: list[tuple[int, int]] = field(default_factory=list)
    batches: int = 0

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        self.seen.append(
            (event.seq, event.vcpu, event.gpa, event.data, event.source, event.untracked)
        )

    def track_write_batch(self, vm: Vm, batch: EventBatch) -> None:
        self.batches += 1
        for e in batch.events():
            self.track_write(vm, e)

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        self.regions.append((base_gfn, npages))


@dataclass
class Meddler:
    """Per-event: at given seqs, changes tracking of other gfns, toggles a memslot,
    writes guest memory by DMA, or unregisters / registers again the batch notifier,
    from inside the callback."""

    plan: dict[int, list[tuple[str, int]]]
    name: str = "meddler"
    external: bool = False
    held: set[int] = field(default_factory=set)
    regions: list[tuple[int, int]] = field(default_factory=list)
    batch_snooper: BatchSnooper | None = None
    batch_node: NotifierNode | None = None

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        for action, gfn in self.plan.get(event.seq, []):
            if action == "toggle":
                if gfn in self.held:
                    vm.track_remove([gfn], OWNER)
                    self.held.remove(gfn)
                elif vm.memslots() and any(m.contains(gfn) for m in vm.memslots()):
                    vm.track_add([gfn], OWNER)
                    self.held.add(gfn)
            elif action == "slot":
                sid, base, npages = EXTRA_SLOT
                if any(m.slot_id == sid for m in vm.memslots()):
                    vm.set_memslot(sid, base, 0)
                    self.held -= set(range(base, base + npages))
                else:
                    vm.set_memslot(sid, base, npages)
            elif action == "dma" and any(m.contains(gfn) for m in vm.memslots()):
                vm.dma_write(gfn * PAGE + 100, b"meddled")
            elif action == "batch-node" and self.batch_snooper is not None:
                if self.batch_node is not None:
                    vm.unregister_notifier(self.batch_node)
                    self.batch_node = None
                else:
                    self.batch_node = vm.register_notifier(self.batch_snooper)

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        self.regions.append((base_gfn, npages))


def make_vm(flags: int, tracked: list[int]) -> Vm:
    vm = Vm("eq", vcpus=VCPUS)
    for sid, (base, npages) in SLOTS.items():
        vm.set_memslot(sid, base, npages, SlotFlags(flags if sid == 0 else flags & 1))
    if tracked:
        vm.track_add(tracked)
    return vm


def state_of(vm: Vm) -> dict[str, Any]:
    """Everything observable after the writes."""
    s = vm.stats
    memory = {
        (m.slot_id, page): vm.read((m.base_gfn + page) * PAGE, PAGE)
        for m in vm.memslots()
        for page in range(m.npages)
    }
    dirty = {
        m.slot_id: vm.get_dirty_log(m.slot_id)
        for m in vm.memslots()
        if m.flags & SlotFlags.LOG_DIRTY_PAGES
    }
    return {
        "slots": vm.memslots(),
        "seq": vm.seq,
        "memory": memory,
        "dirty": dirty,
        "tracked": vm.tracked_gfns().tolist(),
        "query": vm.track_query(range(64)),
        "stats": (
            s.writes,
            s.pieces,
            s.bytes_written,
            s.notifications,
            s.notifier_errors,
            s.cycles,
            s.vcpu_cycles,
            s.dma_writes,
        ),
    }


offsets = st.one_of(st.sampled_from([0, 8, 4092, 4095]), st.integers(0, PAGE - 1))
writes_st = st.lists(
    st.tuples(
        st.integers(0, VCPUS - 1),
        st.one_of(st.sampled_from([*range(16), *range(32, 40), 48, 49]), st.integers(0, 52)),
        offsets,
        st.one_of(st.sampled_from([1, 4, 8]), st.integers(1, 40), st.just(PAGE + 10)),
    ),
    min_size=1,
    max_size=25,
)


@st.composite
def case_st(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int]], Any]:
    """Writes, and maybe a meddler's plan: at some seqs, act on gfns the batch writes
    (so a change made inside a callback matters to the pieces that follow)."""
    writes = draw(writes_st)
    if not draw(st.booleans()):
        return writes, None
    written = sorted({gfn for _, gfn, _, _ in writes})
    action = st.tuples(
        st.sampled_from(["toggle", "toggle", "toggle", "slot", "dma", "dma", "batch-node"]),
        st.one_of(st.sampled_from(written), st.sampled_from(written), st.integers(0, 52)),
    )
    plan = draw(
        st.dictionaries(
            st.integers(1, len(writes) + 2), st.lists(action, min_size=1, max_size=3),
            max_size=8,
        )
    )
    return writes, plan


@settings(max_examples=200, deadline=None)
@given(
    case=case_st(),
    flags=st.sampled_from([0, 1, 2, 3]),
    tracked=st.lists(st.sampled_from([*range(16), *range(32, 40)]), max_size=10),
    with_snooper=st.booleans(),
    with_batch=st.booleans(),
    dma_policy=st.sampled_from([DmaPolicy.BYPASS, DmaPolicy.NOTIFY]),
)
def test_write_batch_equals_writes_one_by_one(
    case: tuple[list[tuple[int, int, int, int]], dict[int, list[tuple[str, int]]] | None],
    flags: int,
    tracked: list[int],
    with_snooper: bool,
    with_batch: bool,
    dma_policy: DmaPolicy,
) -> None:
    """Pieces, seqs, memory, tracking, stats and every notifier's view agree."""
    writes, plan = case
    runs = []
    for batched in (False, True):
        vm = make_vm(flags, tracked)
        vm.set_policy(dma_policy=dma_policy)
        snooper, batch_snooper = Snooper(), BatchSnooper()
        meddler = Meddler(plan or {}, batch_snooper=batch_snooper)
        if with_batch:
            meddler.batch_node = vm.register_notifier(batch_snooper)
        if with_snooper:
            vm.register_notifier(snooper)
        if plan is not None:
            vm.register_notifier(meddler)
        datas = [
            ((np.arange(n) * 13 + i) & 0xFF).astype(np.uint8).tobytes()
            for i, (_, _, _, n) in enumerate(writes)
        ]
        gpas = [gfn * PAGE + off for _, gfn, off, _ in writes]
        if batched:
            res = vm.write_batch(
                gpas, [v for v, _, _, _ in writes], [len(d) for d in datas], b"".join(datas)
            )
            pieces = list(
                zip(
                    res.write_index.tolist(),
                    res.gpa.tolist(),
                    res.length.tolist(),
                    res.path.tolist(),
                    res.seq.tolist(),
                    strict=True,
                )
            )
            emulated = res.count(WritePath.EMULATED)
            if plan is None:  # else a meddler may make the batch notifier's events go early
                assert batch_snooper.batches == (1 if with_batch and emulated else 0)
            # The summary fields agree with the per-piece columns.
            assert list(res.counts) == np.bincount(res.path, minlength=3).tolist()
            held = res.seq[res.seq > 0]
            assert (res.first_seq, res.last_seq) == (
                (int(held[0]), int(held[-1])) if held.size else (0, 0)
            )
        else:
            pieces = []
            for i, ((vcpu, _, _, _), gpa, data) in enumerate(zip(writes, gpas, datas, strict=True)):
                for p in vm.write(vcpu, gpa, data).pieces:
                    pieces.append((i, p.gpa, p.length, int(p.path), p.seq or 0))
        runs.append(
            (
                pieces,
                state_of(vm),
                snooper.seen,
                snooper.regions,
                batch_snooper.seen,
                batch_snooper.regions,
                sorted(meddler.held),
                meddler.regions,
            )
        )
    one_by_one, batch = runs
    assert batch == one_by_one


def test_meddler_reclassifies_later_pieces_of_the_same_batch() -> None:
    """A notifier that starts tracking a gfn makes later writes to it in the same batch
    emulated, and one that stops tracking makes them fast, as one-by-one writes would."""
    vm = make_vm(0, [])
    vm.track_add([1], OWNER)
    meddler = Meddler({1: [("toggle", 2)], 2: [("toggle", 1)]}, held={1})
    vm.register_notifier(meddler)
    gpa = [PAGE, 2 * PAGE, PAGE, 2 * PAGE]
    res = vm.write_batch(gpa, [0] * 4, [8] * 4, bytes(32))
    # seq 1 (gfn 1) starts tracking gfn 2; seq 2 (gfn 2) stops tracking gfn 1.
    assert res.path.tolist() == [WritePath.EMULATED, WritePath.EMULATED, WritePath.FAST,
                                 WritePath.EMULATED]
    assert res.seq.tolist() == [1, 2, 0, 3]


def test_batch_with_sync_notifier_emulates_every_write() -> None:
    """A large batch with a per-event notifier emulates every write and calls back for
    each. (Its cost once grew quadratically with the batch; that it stays linear is a
    figure of bench/core.py: ratio_per_event_batch_200k_vs_40k.)"""
    seen: list[int] = []

    class Counter:
        name = "counter"
        external = False

        def track_write(self, vm: Vm, event: WriteEvent) -> None:
            seen.append(event.seq)

        def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
            pass

    vm = Vm("big")
    vm.set_memslot(0, 0, 1024)
    vm.track_add(np.arange(1024))
    vm.register_notifier(Counter())
    count = 50_000
    gpa = (np.arange(count) % 1024) * PAGE
    res = vm.write_batch(gpa, np.zeros(count), np.full(count, 8), bytes(8 * count))
    assert res.count(WritePath.EMULATED) == count
    assert seen == list(range(1, count + 1))
