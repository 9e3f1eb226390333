"""The application's use cases give typed results without a wire: reads split at MMIO,
DMA outcomes by policy, a lease's revocation counts, and one stats view for every reader."""

from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.application import Engine, access, tracking
from pagetrackd.application.views import vm_stats
from pagetrackd.domain import DmaPolicy, TenantId
from pagetrackd.domain.types import PAGE_SIZE

T = TenantId("t")
SLOTS = [(0, 0, 4), (1, 8, 4)]  # (slot, base gfn, pages): gfns 4..7 and 12.. are MMIO


def _engine(dma: DmaPolicy = DmaPolicy.BYPASS) -> Engine:
    async def make() -> Engine:
        engine = Engine()
        engine.create_vm(T, "v", dma_policy=dma)
        for slot, base, npages in SLOTS:
            access.set_memory_region(
                engine, T, "v", slot, base, npages, readonly=False, log_dirty_pages=False
            )
        return engine

    return asyncio.run(make())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 14 * PAGE_SIZE - 1), st.integers(1, 3 * PAGE_SIZE))
def test_read_lists_exactly_the_bytes_outside_memslots(gpa: int, length: int) -> None:
    """Every byte of a read is RAM or inside one listed MMIO range, ranges merged."""
    engine = _engine()
    read = access.read_guest(engine, T, "v", gpa, length, 1 << 20)
    assert len(read.data) == length
    ram = {g for _, base, n in SLOTS for g in range(base, base + n)}
    outside = [a for a in range(gpa, gpa + length) if a // PAGE_SIZE not in ram]
    listed = [a for start, n in read.mmio for a in range(start, start + n)]
    assert listed == outside
    assert all(a + n < b for (a, n), (b, _) in zip(read.mmio, read.mmio[1:], strict=False))


def test_dma_outcomes_follow_the_policy_and_tracking() -> None:
    """Bypass: a tracked page is bypassed, an untracked one applied; notify: notified."""
    for policy, expected in ((DmaPolicy.BYPASS, "bypassed"), (DmaPolicy.NOTIFY, "notified")):
        engine = _engine(policy)
        sel = tracking.GfnSelection([(1, 1)], np.array([], dtype=np.uint64))
        asyncio.run(tracking.add_tracking(engine, T, "v", sel, "", 1 << 20))
        pieces, _ = access.dma_write(engine, T, "v", 0, bytes(2 * PAGE_SIZE), 1 << 20)
        assert [p.outcome for p in pieces] == ["applied", expected]


def test_revoking_a_lease_counts_what_it_untracked() -> None:
    """Only gfns no one else tracks count as untracked."""
    engine = _engine()
    lease = engine.create_lease(T, 10_000, "")
    both = tracking.GfnSelection([(0, 3)], np.array([], dtype=np.uint64))
    asyncio.run(tracking.add_tracking(engine, T, "v", both, lease.lease_id, 1 << 20))
    mine = tracking.GfnSelection([(0, 1)], np.array([], dtype=np.uint64))
    asyncio.run(tracking.add_tracking(engine, T, "v", mine, "", 1 << 20))
    done = engine.revoke_lease(T, lease.lease_id)
    assert (done.released_references, done.untracked_gfns) == (3, 2)


def test_stats_view_counts_writes_by_path() -> None:
    """The view that GetStats and metrics read sums the VM's write paths."""
    engine = _engine()
    vm = engine.vm(T, "v").vm
    vm.write(0, 0, b"x")
    vm.write(0, 5 * PAGE_SIZE, b"y")  # MMIO
    s = vm_stats(engine.vm(T, "v"))
    assert s.guest_writes == 2
    assert (s.pieces.mmio_exit, s.pieces.total) == (1, 2)
    assert s.cycles_total == s.cycles.total + s.dma_cycles
