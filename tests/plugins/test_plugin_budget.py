"""The built-in plugins' state is counted in bytes and capped by a budget (the tenant's
plugin_state_bytes quota in the daemon, see plugins/budget.py).

What is counted is checked against what CPython really allocates for the plugin's
objects (tracemalloc, allocations made by plugin code); a step that would pass the
budget is refused before it changes anything (shadow MMU: a fault or a root load, as
KVM's ``mmu_topup_memory_caches`` fails before the fault; vGPU: shadowing a table or
mapping a page fails as gtt.c's -ENOMEM does, and what the step shadowed is freed)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.domain import PAGE_SHIFT, QuotaExceeded, Vm
from pagetrackd.plugins.budget import StateBudget, StateMeter
from pagetrackd.plugins.shadow_faults import FAULT_BYTES
from pagetrackd.plugins.shadow_mmu import ShadowMmu
from pagetrackd.plugins.shadow_table import SP_BYTES, SPTE_BYTES
from pagetrackd.plugins.vgpu import OWNER as VGPU_OWNER
from pagetrackd.plugins.vgpu import Vgpu
from pagetrackd.plugins.vgpu_shadow import DMA_BYTES, SPT_BYTES

from .test_shadow_mmu import GVA, attach, make_guest
from .vgpu_helpers import pte, put, put_half

PML4, PDP, PD = 0x100, 0x101, 0x102
DATA = 0x10000


def plugin_bytes(run: Callable[[], object]) -> int:
    """Bytes that plugin code allocated (and still holds) while ``run`` ran."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        run()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    only = [tracemalloc.Filter(True, "*pagetrackd/plugins/*")]
    diff = after.filter_traces(only).compare_to(before.filter_traces(only), "filename")
    return sum(d.size_diff for d in diff)


def gpu_vm(tables: int, leaves: int) -> Vm:
    """A VM whose PPGTT at PML4 has ``tables`` page tables of ``leaves`` entries each,
    every entry naming its own data page."""
    vm = Vm("gpu")
    vm.set_memslot(0, PML4, 4096)
    vm.set_memslot(1, DATA, 65536)
    put(vm, PML4, 0, pte(PDP))
    put(vm, PDP, 0, pte(PD))
    data = DATA
    for t in range(tables):
        put(vm, PD, t, pte(PD + 1 + t))
        for i in range(leaves):
            put(vm, PD + 1 + t, i, pte(data))
            data += 1
    return vm


@pytest.mark.parametrize(("tables", "per_table"), [(1, 300), (300, 1), (40, 40)])
def test_shadow_mmu_counts_at_least_what_it_allocates(tables: int, per_table: int) -> None:
    vm, os, mm = make_guest(pages=16384)
    gvas = []
    for t in range(tables):
        for i in range(per_table):
            gva = GVA + t * (2 << 20) + i * 4096
            frame = os.get_frame()
            assert frame is not None
            mm.map(gva, frame)
            gvas.append(gva)
    mmu = attach(vm, mm, max_shadow_pages=1 << 16)
    start = mmu.state_meter.bytes
    real = plugin_bytes(lambda: [mmu.translate(g) for g in gvas])
    counted = mmu.state_meter.bytes - start
    assert real <= counted <= 2 * real + FAULT_BYTES, (real, counted)
    assert mmu.status()["state_bytes"] == mmu.state_meter.bytes
    mmu.zap_all()
    assert mmu.state_meter.bytes == 0
    mmu.detach()
    assert mmu.state_meter.bytes == 0


@pytest.mark.parametrize(("tables", "leaves"), [(100, 0), (100, 1), (3, 300), (30, 30)])
def test_vgpu_counts_at_least_what_it_allocates(tables: int, leaves: int) -> None:
    vm = gpu_vm(tables, leaves)
    vgpu = Vgpu()
    vgpu.attach(vm)
    real = plugin_bytes(lambda: vgpu.call("build_ppgtt", root_gpa=PML4 << PAGE_SHIFT))
    counted = vgpu.state_meter.bytes
    assert real <= counted <= 2 * real, (real, counted)
    vgpu.call("destroy_ppgtt", ppgtt=0)
    assert vgpu.state_meter.bytes == 0


def test_a_shadow_fault_past_the_budget_is_refused_and_changes_nothing() -> None:
    vm, os, mm = make_guest(pages=16384)
    gvas = []
    for t in range(64):
        frame = os.get_frame()
        assert frame is not None
        mm.map(GVA + t * (2 << 20), frame)
        gvas.append(GVA + t * (2 << 20))
    budget = StateBudget(lambda: 40_000)
    mmu = attach(vm, mm)
    mmu.state_meter.join(budget)
    refused = 0
    for gva in gvas:
        before = (mmu.status(), vm.tracked_gfns().tolist())
        try:
            mmu.translate(gva)
        except QuotaExceeded as e:
            assert e.quota == "plugin_state_bytes" and e.limit == 40_000
            assert (mmu.status(), vm.tracked_gfns().tolist()) == before
            refused += 1
        assert budget.used == mmu.state_meter.bytes <= 40_000
    assert refused and refused < len(gvas)
    assert mmu.audit().clean
    mmu.detach()
    assert budget.used == 0


def test_building_a_ppgtt_past_the_budget_is_refused_and_leaves_nothing() -> None:
    vm = gpu_vm(100, 1)
    vgpu = Vgpu()
    vgpu.attach(vm)
    budget = StateBudget(lambda: 200_000)  # about 35 of the 103 tables
    vgpu.state_meter.join(budget)
    with pytest.raises(QuotaExceeded, match="plugin_state_bytes"):
        vgpu.call("build_ppgtt", root_gpa=PML4 << PAGE_SHIFT)
    assert budget.used == vgpu.state_meter.bytes == 0
    assert vm.tracked_gfns(VGPU_OWNER).size == 0
    status = vgpu.status()
    assert status["ppgtts"] == status["shadow_tables"] == status["dma_mapped_pages"] == 0
    assert status["quota_refusals"] == 1
    budget_ok = StateBudget(lambda: 1 << 20)
    vgpu.state_meter.join(budget_ok)
    vgpu.call("build_ppgtt", root_gpa=PML4 << PAGE_SHIFT)
    assert budget_ok.used == vgpu.state_meter.bytes > 200_000
    assert budget.used == 0  # moved to the new budget
    assert vgpu.audit().clean


def test_guest_writes_past_the_budget_keep_the_old_shadow_entry() -> None:
    """A guest write linking a new table, or mapping a new page, that the budget cannot
    hold is handled as gtt.c handles a failed shadowing: the write lands, the old shadow
    entry stays, the failure is counted; the write path never raises."""
    vm = gpu_vm(1, 1)
    vgpu = Vgpu()
    vgpu.attach(vm)
    vgpu.call("build_ppgtt", root_gpa=PML4 << PAGE_SHIFT)
    limit = vgpu.state_meter.bytes + 6000  # one more table
    budget = StateBudget(lambda: limit)
    vgpu.state_meter.join(budget)
    for t in range(1, 5):
        put(vm, PD + 1 + t, 0, pte(DATA + 100 + t))  # an unshadowed table, then link it
        put(vm, PD, t, pte(PD + 1 + t))
    assert vgpu.stats.quota_refusals >= 3
    assert budget.used == vgpu.state_meter.bytes <= budget.limit
    # A leaf write mapping a new page (the inlined fast path) is refused the same way.
    held = vgpu.state_meter.bytes
    full = StateBudget(lambda: held)
    vgpu.state_meter.join(full)
    refusals = vgpu.stats.quota_refusals
    put(vm, PD + 1, 1, pte(DATA + 500))
    assert vgpu.stats.quota_refusals == refusals + 1
    assert full.used == vgpu.state_meter.bytes
    # So is one the handler maps (_dma_map): an entry written in halves, shadowed at
    # the flush (R8.7); the entry stays on the scratch page the first half put it on.
    put_half(vm, PD + 1, 2, pte(DATA + 600), high=False)
    put_half(vm, PD + 1, 2, pte(DATA + 600), high=True)

    def shadow() -> dict[int, list[int]]:
        return {mfn: list(spt.entries) for mfn, spt in vgpu._spt_by_mfn.items()}

    before, mapped = shadow(), vgpu.status()["dma_mapped_pages"]
    assert vgpu.call("flush") == {"flushed": 1}
    assert vgpu.stats.quota_refusals == refusals + 2
    assert full.used == vgpu.state_meter.bytes == held
    assert shadow() == before and vgpu.status()["dma_mapped_pages"] == mapped


def shadow_mmu_held(mmu: ShadowMmu) -> int:
    """What the shadow MMU holds, by the sizes budget.py charges."""
    pages = mmu.status()
    return int(pages["shadow_pages"]) * SP_BYTES + int(pages["sptes"]) * SPTE_BYTES


def vgpu_held(vgpu: Vgpu) -> int:
    status = vgpu.status()
    return int(status["shadow_tables"]) * SPT_BYTES + int(status["dma_mapped_pages"]) * DMA_BYTES


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("mtuwz"), st.integers(0, 15)), max_size=40),
       st.integers(0, 40_000))
def test_shadow_mmu_meter_equals_what_it_holds(ops: list[tuple[str, int]], limit: int) -> None:
    """Whatever maps, faults, guest table writes and zaps happen, refused or not, the
    meter holds exactly the shadow pages' and SPTEs' sizes, and never passes the budget."""
    vm, os, mm = make_guest(pages=4096)
    budget = StateBudget(lambda: limit + FAULT_BYTES)
    mmu = attach(vm, mm, max_shadow_pages=64)
    mmu.state_meter.join(budget)
    mapped: set[int] = set()
    for op, k in ops:
        gva = GVA + k * (1 << 21) + (k % 3) * 4096
        if op == "m" and gva not in mapped:
            frame = os.get_frame()
            if frame is not None:
                mm.map(gva, frame)
                mapped.add(gva)
        elif op == "u" and gva in mapped:
            mm.unmap(gva)
            mapped.discard(gva)
        elif op in "tw":
            try:
                mmu.translate(gva, write=op == "w")
            except QuotaExceeded:
                pass
        elif op == "z":
            mmu.zap_all()
        assert mmu.state_meter.bytes == shadow_mmu_held(mmu) == budget.used
        assert budget.used <= budget.limit
    mmu.detach()
    assert mmu.state_meter.bytes == budget.used == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("lLpPbdf"), st.integers(0, 7), st.integers(0, 3)),
                max_size=40),
       st.integers(0, 60_000))
def test_vgpu_meter_equals_what_it_holds(
    ops: list[tuple[str, int, int]], limit: int
) -> None:
    """Whatever table links, leaf writes (whole or half), builds, destroys and flushes
    happen, refused or not, the meter holds exactly the shadow tables' and DMA mappings'
    sizes, and never passes the budget."""
    vm = gpu_vm(2, 2)
    vgpu = Vgpu()
    vgpu.attach(vm)
    budget = StateBudget(lambda: limit)
    vgpu.state_meter.join(budget)
    for op, i, j in ops:
        pt = PD + 1 + (i % 4)
        try:
            if op == "l":  # link (or relink) a page table into the PD
                put(vm, PD, i % 4, pte(pt))
            elif op == "L":
                put(vm, PD, i % 4, 0)
            elif op == "p":  # a leaf entry naming a data page
                put(vm, pt, j, pte(DATA + 8 * j + i))
            elif op == "P":
                put_half(vm, pt, j, pte(DATA + 8 * j + i), high=bool(i & 1))
            elif op == "b":
                vgpu.call("build_ppgtt", root_gpa=PML4 << PAGE_SHIFT)
            elif op == "d" and vgpu.status()["ppgtts"]:
                vgpu.call("destroy_ppgtt", root_gpa=PML4 << PAGE_SHIFT)
            elif op == "f":
                vgpu.flush()
        except QuotaExceeded:
            pass
        assert vgpu.state_meter.bytes == vgpu_held(vgpu) == budget.used
        assert budget.used <= limit
    vgpu.detach()
    assert vgpu.state_meter.bytes == budget.used == 0


def test_a_meter_takes_within_the_quota_and_a_raised_quota_applies_at_once() -> None:
    quota = [1000]
    budget = StateBudget(lambda: quota[0])
    meter = StateMeter()
    meter.join(budget)
    assert meter.room(600)
    meter.take(600)
    assert meter.room(400)
    meter.take(400)
    assert not meter.room(1)  # room takes nothing
    assert budget.used == meter.bytes == 1000
    with pytest.raises(QuotaExceeded, match="quota is 1000"):
        meter.reserve(1, "one more")
    quota[0] = 1500
    assert meter.room(500)
    meter.take(500)
    assert budget.used == meter.bytes == 1500 == budget.limit
    meter.exempt = lambda: True  # loading a VM accepted before: no check
    assert meter.room(10)
    meter.take(10)
    meter.reserve(10, "loading")
    meter.give(510)
    assert budget.used == meter.bytes == 1000
