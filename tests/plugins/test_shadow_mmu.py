"""The shadow MMU plugin against KVM's shadow paging (rules R3, R4, R7 of docs/kvm-rules.md).

Sources: torvalds/linux arch/x86/kvm/mmu/mmu.c (account_shadowed, kvm_mmu_track_write,
mmu_pte_write_fetch_gpte, detect_write_misaligned, detect_write_flooding,
get_written_sptes, kvm_mmu_unprotect_page, kvm_mmu_hugepage_adjust) and
arch/x86/kvm/mmu/paging_tmpl.h (FNAME(walk_addr_generic), FNAME(fetch) with its
clear_sp_write_flooding_count on every level walked).
"""

from __future__ import annotations

import numpy as np
import pytest

from pagetrackd.domain import (
    PAGE_SHIFT,
    FailedPrecondition,
    InvalidArgument,
    Vm,
    WriteEvent,
    WritePath,
)
from pagetrackd.domain.types import TENANT_OWNER
from pagetrackd.plugins import PLUGINS
from pagetrackd.plugins.shadow_mmu import OWNER, ShadowMmu, detect_write_misaligned
from pagetrackd.plugins.x86_paging import (
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    index,
    make_leaf_entry,
    pages_per,
)
from pagetrackd.workloads.guest_os import DIRECT_MAP, AddressSpace, GuestOs

BASE = 0x1000  # first gfn of the test memslot
PAGES = 4096
GVA = 0x0000_5555_5540_0000
G1 = 1 << 30  # one GiB, in bytes


def make_guest(*, base: int = BASE, pages: int = PAGES, direct_map: bool = False):
    """A VM with one memslot, a guest OS writing at once, and one address space."""
    vm = Vm("shadow", vcpus=2)
    vm.set_memslot(0, base, pages)
    os = GuestOs(vm, base, pages, direct_map=direct_map)
    mm = AddressSpace(os)
    return vm, os, mm


def attach(vm: Vm, mm: AddressSpace, **options) -> ShadowMmu:
    mmu = ShadowMmu()
    mmu.attach(vm, root=mm.cr3, **options)
    return mmu


def shadowed(**options: str | bool) -> tuple[Vm, GuestOs, AddressSpace, ShadowMmu, int]:
    """A guest with one data page mapped at GVA and a shadow MMU attached that has
    shadowed the path to it (one fault)."""
    vm, os, mm = make_guest()
    data = os.get_frame()
    assert data is not None
    mm.map(GVA, data)
    mmu = attach(vm, mm, **options)
    mmu.translate(GVA)
    return vm, os, mm, mmu, data


def tables(mm: AddressSpace, level: int) -> list[int]:
    """Gfns of the address space's tables at ``level``."""
    return [gfn for gfn, lvl in mm.tables.items() if lvl == level]


def write_entry(vm: Vm, table: int, idx: int, value: int, *, vcpu: int = 0) -> WritePath:
    result = vm.write(vcpu, (table << PAGE_SHIFT) + idx * 8, value.to_bytes(8, "little"))
    return result.pieces[0].path


def sptes_of(mmu: ShadowMmu, gfn: int, level: int) -> int:
    """Entries held by the (indirect) shadow page of a guest table; -1 if none."""
    for sp in mmu.shadow_pages():
        if sp["gfn"] == gfn and sp["level"] == level and not sp["direct"]:
            return int(sp["entries"])
    return -1


def test_registered_under_its_name_as_an_internal_user() -> None:
    """PLUGINS["shadow_mmu"] makes the plugin; it is not an external notifier."""
    plugin = PLUGINS["shadow_mmu"]()
    assert isinstance(plugin, ShadowMmu)
    assert plugin.name == "shadow_mmu" and plugin.external is False


def test_r7_1_fault_shadows_each_table_on_the_path_and_write_tracks_it() -> None:
    """A translation walks PML4, PDPT, PD and PT; each gets a shadow page holding one
    track reference owned by plugin:shadow-mmu (mmu.c account_shadowed; leaf tables
    too, the documented difference from KVM's unsync leaves)."""
    vm, os, mm = make_guest()
    data = os.get_frame()
    assert data is not None
    mm.map(GVA, data)
    mmu = attach(vm, mm)
    out = mmu.translate(GVA + 0x123)
    assert out["present"] and out["faulted"]
    assert out["gpa"] == (data << PAGE_SHIFT) + 0x123
    assert out["page_bytes"] == 4096 and out["writable"]
    assert mmu.status()["shadow_pages"] == 4
    for gfn in mm.tables:
        info = vm.track_query([gfn])[0]
        assert info.count == 1 and info.owners == {OWNER: 1}
        assert info.lpage_disallowed_2m
    # Served from the shadow now: no exit.
    again = mmu.translate(GVA + 0x123, write=True)
    assert not again["faulted"] and again["gpa"] == out["gpa"]


def test_r4_2_every_guest_write_to_a_shadowed_table_is_emulated_and_notified() -> None:
    """Once shadowed, a guest table write traps (emulated path), untracked data does not."""
    vm, os, mm, mmu, data = shadowed()
    pt = tables(mm, 1)[0]
    assert write_entry(vm, pt, 7, 0) is WritePath.EMULATED
    assert vm.write(0, data << PAGE_SHIFT, b"x").pieces[0].path is WritePath.FAST
    assert mmu.status()["emulations"] == 1


def test_r7_3_detect_write_misaligned_matches_mmu_c() -> None:
    """mmu.c detect_write_misaligned: crossing a pte or shorter than 4 bytes is
    misaligned, except one byte at a pte-aligned offset (the clear_bit andb idiom)."""
    assert not detect_write_misaligned(0x10, 1)
    assert detect_write_misaligned(0x11, 1)
    assert detect_write_misaligned(0x10, 2)
    assert not detect_write_misaligned(0x10, 8)
    assert detect_write_misaligned(0x14, 8)
    assert detect_write_misaligned(0x10, 16)
    assert detect_write_misaligned(0x0, 4096)
    assert not detect_write_misaligned(0x14, 4)  # within one pte, >= 4 bytes


@pytest.mark.parametrize(
    ("offset", "nbytes"),
    [(4, 8), (0, 2), (8, 16), (3, 1), (0, 4096), (6, 3)],
    ids=["crosses-pte", "two-bytes", "two-ptes", "odd-byte", "whole-page", "three-bytes"],
)
def test_r7_3_misaligned_or_partial_write_zaps_the_whole_shadow_page(
    offset: int, nbytes: int
) -> None:
    """A misaligned write to a shadowed table zaps its shadow page and drops the
    track reference (mmu.c kvm_mmu_track_write -> kvm_mmu_prepare_zap_page)."""
    vm, os, mm, mmu, data = shadowed()
    pt = tables(mm, 1)[0]
    vm.write(0, (pt << PAGE_SHIFT) + 0x100 + offset, bytes(nbytes))
    status = mmu.status()
    assert status["misaligned"] == 1 and status["flooded"] == 0
    assert sptes_of(mmu, pt, 1) == -1
    assert not vm.is_tracked(pt)
    assert mmu.audit().clean


def test_r7_3_single_byte_aligned_write_is_not_misaligned() -> None:
    """clear_bit(_PAGE_BIT_RW) on a PTE is a one-byte write at a pte-aligned offset:
    only that SPTE is zapped; the refault sees the read-only entry (mmu.c comment on
    andb in clear_bit)."""
    vm, os, mm = make_guest()
    data = os.get_frame()
    assert data is not None
    mm.map(GVA, data)
    mm.map(GVA + 0x1000, data)
    mmu = attach(vm, mm)
    mmu.translate(GVA, write=True)
    mmu.translate(GVA + 0x1000)
    pt = tables(mm, 1)[0]
    mm.set_writable(GVA, False)
    status = mmu.status()
    assert status["misaligned"] == 0 and status["sptes_zapped"] == 1
    assert sptes_of(mmu, pt, 1) == 1  # the other SPTE is untouched
    assert vm.is_tracked(pt)
    out = mmu.translate(GVA, write=True)
    assert not out["present"] and "read-only" in out["fault"]
    assert mmu.translate(GVA)["writable"] is False
    assert mmu.audit().clean


def test_r7_2_four_byte_write_is_widened_to_the_gpte_in_long_mode() -> None:
    """mmu_pte_write_fetch_gpte: with CR4.PAE set (long mode) a 4-byte write is widened
    to the aligned 8-byte gpte, so it is not misaligned, even off a 4-byte boundary;
    two halves re-point the SPTE at the new frame."""
    vm, os, mm = make_guest()
    old, new = os.get_frame(), os.get_frame()
    assert old is not None and new is not None
    mm.map(GVA, old)
    mmu = attach(vm, mm)
    assert mmu.translate(GVA)["gpa"] == old << PAGE_SHIFT
    mm.remap_halves(GVA, new)
    status = mmu.status()
    assert status["misaligned"] == 0 and status["sptes_zapped"] == 1
    assert mmu.translate(GVA)["gpa"] == new << PAGE_SHIFT
    pt = tables(mm, 1)[0]
    gpa = mm.entry_gpa(GVA, 1)
    vm.write(0, gpa + 2, b"\x00\x00\x00\x00")  # odd, but 4 bytes: widened, zaps one SPTE
    assert mmu.status()["misaligned"] == 0
    assert vm.is_tracked(pt)
    assert mmu.audit().clean
    # The widened gpte is re-read: a 4-byte write to a present PD entry re-reads its
    # 8 bytes (gentry != 0), which KVM counts as a pde_zapped (mmu.c kvm_mmu_track_write).
    pd = mm.entry_gpa(GVA, 2)
    before = int(mmu.status()["pde_zapped"])
    vm.write(0, pd + 4, vm.read(pd + 4, 4))
    assert mmu.status()["pde_zapped"] == before + 1


def test_r7_2_four_byte_write_straddling_two_gptes_zaps_the_page() -> None:
    """Deliberate difference from mmu.c: KVM widens *any* 4-byte write to the gpte it
    starts in, so bytes 6..9 would zap only the first SPTE and leave the second
    stale. Here such a write is judged as written (crossing: misaligned)."""
    vm, os, mm = make_guest()
    a, b = os.get_frame(), os.get_frame()
    assert a is not None and b is not None
    mm.map(GVA, a)
    mm.map(GVA + 0x1000, a)
    mmu = attach(vm, mm)
    mmu.translate(GVA)
    mmu.translate(GVA + 0x1000)
    gpa = mm.entry_gpa(GVA, 1)
    vm.write(0, gpa + 6, make_leaf_entry(b).to_bytes(8, "little")[6:8] + b"\x00\x90")
    assert mmu.status()["misaligned"] == 1
    assert mmu.audit().clean


def test_r7_2_written_spte_is_zapped_and_refaults_lazily() -> None:
    """An aligned 8-byte PTE write zaps exactly the written SPTE (get_written_sptes);
    the next access refaults and maps what guest memory now says."""
    vm, os, mm = make_guest()
    a, b, c = os.get_frame(), os.get_frame(), os.get_frame()
    assert a is not None and b is not None and c is not None
    mm.map(GVA, a)
    mm.map(GVA + 0x1000, b)
    mmu = attach(vm, mm)
    mmu.translate(GVA)
    mmu.translate(GVA + 0x1000)
    pt = tables(mm, 1)[0]
    assert sptes_of(mmu, pt, 1) == 2
    write_entry(vm, pt, index(GVA, 1), make_leaf_entry(c))
    assert sptes_of(mmu, pt, 1) == 1
    assert mmu.status()["sptes_zapped"] == 1
    # The untouched neighbour is still served by the shadow; the written one refaults.
    assert mmu.translate(GVA + 0x1000)["faulted"] is False
    out = mmu.translate(GVA)
    assert out["faulted"] and out["gpa"] == c << PAGE_SHIFT
    assert mmu.audit().clean


def test_r7_4_third_write_to_a_nonleaf_table_floods_it() -> None:
    """detect_write_flooding: the 3rd emulated write to a non-leaf shadow page without
    an intervening use zaps it and drops its reference; writes 1 and 2 only zap SPTEs."""
    vm, os, mm, mmu, data = shadowed()
    pd = tables(mm, 2)[0]
    for i in range(2):
        write_entry(vm, pd, 500 + i, 0)
        assert sptes_of(mmu, pd, 2) == 1 and vm.is_tracked(pd)
    write_entry(vm, pd, 502, 0)
    assert sptes_of(mmu, pd, 2) == -1
    assert not vm.is_tracked(pd)
    assert mmu.status()["flooded"] == 1
    # The guest uses the table again: it is shadowed and tracked once more.
    assert mmu.translate(GVA)["present"]
    assert vm.is_tracked(pd)
    assert mmu.audit().clean


def test_r7_4_a_fault_is_a_use_but_a_shadow_hit_is_not() -> None:
    """The flood count is reset when the page is walked by the fault path
    (paging_tmpl.h FNAME(fetch): clear_sp_write_flooding_count); a hardware walk of
    an intact shadow never reaches KVM, so it resets nothing."""
    vm, os, mm, mmu, data = shadowed()
    pd = tables(mm, 2)[0]
    write_entry(vm, pd, 500, 0)
    write_entry(vm, pd, 501, 0)
    assert mmu.translate(GVA)["faulted"] is False  # hit: not a use
    write_entry(vm, pd, 502, 0)
    assert mmu.status()["flooded"] == 1
    mmu.translate(GVA)  # reshadow
    write_entry(vm, pd, 500, 0)
    write_entry(vm, pd, 501, 0)
    mmu.fault(GVA)  # a fault through the PD: a use
    write_entry(vm, pd, 502, 0)
    write_entry(vm, pd, 503, 0)
    assert mmu.status()["flooded"] == 1 and vm.is_tracked(pd)
    write_entry(vm, pd, 504, 0)
    assert mmu.status()["flooded"] == 2


def test_r7_4_leaf_shadow_pages_are_never_flooded() -> None:
    """detect_write_flooding skips level-1 pages (they may go unsync in KVM)."""
    vm, os, mm, mmu, data = shadowed()
    pt = tables(mm, 1)[0]
    for i in range(10):
        write_entry(vm, pt, 100 + i, 0)
    assert mmu.status()["flooded"] == 0 and vm.is_tracked(pt)
    assert sptes_of(mmu, pt, 1) == 1


def test_flood_threshold_and_flood_leaf_options() -> None:
    """flood_threshold=1 zaps at the first write; flood_leaf counts level-1 pages too."""
    vm, os, mm, mmu, data = shadowed(flood_threshold="1", flood_leaf=True)
    pt = tables(mm, 1)[0]
    write_entry(vm, pt, 100, 0)
    assert mmu.status()["flooded"] == 1 and not vm.is_tracked(pt)


def test_r3_4_shared_counter_keeps_gfn_tracked_after_a_flood_zap() -> None:
    """The tenant's reference and the MMU's share one counter: when flooding drops the
    MMU's reference the gfn stays tracked (mmu.c unaccount_shadowed)."""
    vm, os, mm, mmu, data = shadowed()
    pd = tables(mm, 2)[0]
    vm.track_add([pd])
    assert vm.track_query([pd])[0].count == 2
    for i in range(3):
        write_entry(vm, pd, 500 + i, 0)
    info = vm.track_query([pd])[0]
    assert info.count == 1 and info.owners == {TENANT_OWNER: 1}


def test_r7_6_unprotect_zaps_the_gfns_shadow_pages_so_the_write_runs_natively() -> None:
    """kvm_mmu_unprotect_page: every shadow page of the gfn goes with its reference;
    the retried write is then native. retry is true only if something was zapped."""
    vm, os, mm, mmu, data = shadowed()
    pt = tables(mm, 1)[0]
    out = mmu.call("unprotect", gfn=pt)
    assert out["zapped"] == 1 and out["retry"] is True and out["tracked"] is False
    assert write_entry(vm, pt, 9, 0) is WritePath.FAST
    again = mmu.call("unprotect", gfn=pt)
    assert again["zapped"] == 0 and again["retry"] is False
    assert mmu.status()["unprotected"] == 1


def test_r4_10_unprotect_leaves_an_externally_tracked_gfn_tracked() -> None:
    """A gfn an external user also tracks is not freed by unprotect: emulation has to
    succeed (R4.10)."""
    vm, os, mm, mmu, data = shadowed()
    pt = tables(mm, 1)[0]
    vm.track_add([pt])
    out = mmu.unprotect(pt)
    assert out["retry"] is True and out["tracked"] is True
    assert write_entry(vm, pt, 9, 0) is WritePath.EMULATED


def test_r4_10_loop_guard_refuses_a_second_retry_at_the_same_rip_and_address() -> None:
    """last_retry_eip/last_retry_addr: the same (rip, address) is not retried twice."""
    vm, os, mm, mmu, data = shadowed()
    pt = tables(mm, 1)[0]
    assert mmu.call("unprotect", gfn=pt, rip=0xFFFF_FFFF_8100_0000)["retry"] is True
    mmu.translate(GVA)  # shadowed again
    refused = mmu.call("unprotect", gfn=pt, rip=0xFFFF_FFFF_8100_0000)
    assert refused["retry"] is False and refused["reason"] == "loop guard"
    assert vm.is_tracked(pt)
    assert mmu.call("unprotect", gfn=pt, rip=0xFFFF_FFFF_8100_0010)["retry"] is True


def test_r3_1_guest_large_pages_are_split_where_tracking_disallows_them() -> None:
    """kvm_mmu_hugepage_adjust: a guest 2 MiB page is mapped by one large SPTE unless
    a tracked gfn lies in its region; then small SPTEs in a direct shadow page."""
    vm, os, mm = make_guest(base=0x1000, pages=8192)
    plain, tracked = os.get_frame(2), os.get_frame(2)
    assert plain is not None and tracked is not None
    mm.map(GVA, plain, 2)
    mm.map(GVA + (2 << 20), tracked, 2)
    vm.track_add([tracked + 77])
    mmu = attach(vm, mm)
    big = mmu.translate(GVA + 0x5000)
    assert big["page_bytes"] == 2 << 20 and big["shadow_page_bytes"] == 2 << 20
    assert big["gpa"] == (plain << PAGE_SHIFT) + 0x5000
    small = mmu.translate(GVA + (2 << 20) + 0x5000)
    assert small["page_bytes"] == 2 << 20 and small["shadow_page_bytes"] == 4096
    assert small["gpa"] == (tracked << PAGE_SHIFT) + 0x5000
    assert mmu.status()["shadow_pages_direct"] == 1
    # The tracked frame itself: a write is emulated through a read-only SPTE (R4.1).
    hit = mmu.translate(GVA + (2 << 20) + (77 << PAGE_SHIFT), write=True)
    assert hit["emulated"] and not hit["writable"]
    assert mmu.audit().clean


def test_r3_1_a_guest_gib_page_maps_at_the_largest_allowed_size() -> None:
    """A guest 1 GiB page maps as 1 GiB, or 2 MiB where only 2 MiB is allowed, or
    4 KiB inside the 2 MiB region that holds a tracked gfn."""
    base = 1 << 18  # gfn of 1 GiB
    vm = Vm("gib", vcpus=1)
    vm.set_memslot(0, base, 2 * pages_per(3))
    os = GuestOs(vm, base, 4096, direct_map=False)
    mm = AddressSpace(os)
    gib = base + pages_per(3)
    mm.map(G1, gib, 3)
    mmu = attach(vm, mm)
    assert mmu.translate(G1 + 0x1234)["shadow_page_bytes"] == G1
    # Track a frame in the second 2 MiB region of that GiB; reshadow from scratch.
    vm.track_add([gib + pages_per(2) + 5])
    mmu.zap_all()
    assert mmu.translate(G1 + 0x1234)["shadow_page_bytes"] == 2 << 20
    inside = mmu.translate(G1 + (2 << 20) + 0x1234)
    assert inside["shadow_page_bytes"] == 4096 and inside["page_bytes"] == G1
    assert inside["gpa"] == ((gib + pages_per(2)) << PAGE_SHIFT) + 0x1234
    assert mmu.audit().clean


def test_r3_1_direct_map_is_split_over_the_frames_holding_page_tables() -> None:
    """The kernel's 2 MiB direct map maps small over frames the MMU shadows (their
    region disallows large pages) and large elsewhere; writes there are emulated."""
    vm, os, mm = make_guest(base=0x40000, pages=2048, direct_map=True)
    data = os.get_frame()
    assert data is not None
    mm.map(GVA, data)
    mmu = attach(vm, mm)
    mmu.translate(GVA)
    pt = tables(mm, 1)[0]
    via_direct = mmu.translate(DIRECT_MAP + (pt << PAGE_SHIFT) + 8, write=True)
    assert via_direct["gpa"] == (pt << PAGE_SHIFT) + 8
    assert via_direct["shadow_page_bytes"] == 4096 and via_direct["emulated"]
    far = os.alloc.base_gfn + 1024 + 3  # a 2 MiB region with no table in it
    assert mmu.translate(DIRECT_MAP + (far << PAGE_SHIFT))["shadow_page_bytes"] == 2 << 20
    assert mmu.audit().clean


def test_audit_reports_a_stale_shadow_after_a_write_that_bypassed_tracking() -> None:
    """A DMA write (bypass policy: no notification, R4.7) into a shadowed PT leaves the
    SPTE stale; the audit names its gva, level and both values."""
    vm, os, mm = make_guest()
    a, b = os.get_frame(), os.get_frame()
    assert a is not None and b is not None
    mm.map(GVA, a)
    mmu = attach(vm, mm)
    mmu.translate(GVA)
    gpa = mm.entry_gpa(GVA, 1)
    vm.dma_write(gpa, make_leaf_entry(b).to_bytes(8, "little"))
    report = mmu.audit()
    assert len(report.mismatches) == 1
    m = report.mismatches[0]
    assert (m.address, m.level) == (GVA, 1)
    assert m.guest == make_leaf_entry(b)
    assert (m.shadow >> PAGE_SHIFT) & 0xFF_FFFF_FFFF == a and m.shadow & PTE_RW
    assert "another frame" in m.reason
    found = mmu.call("audit")
    assert found["mismatch_count"] == 1
    assert found["mismatches"][0]["table_gfn"] == gpa >> PAGE_SHIFT
    assert found["mismatches"][0]["index"] == index(GVA, 1)


def test_region_removal_drops_shadow_pages_without_untracking() -> None:
    """track_remove_region: shadow pages of tables in the deleted range are dropped
    (no remove call for them); shadow state elsewhere stays and audits clean."""
    vm = Vm("regions", vcpus=2)
    vm.set_memslot(0, 0x1000, 1024)
    vm.set_memslot(1, 0x8000, 1024)
    os_a = GuestOs(vm, 0x1000, 1024, direct_map=False)
    os_b = GuestOs(vm, 0x8000, 1024, direct_map=False)
    mm_a, mm_b = AddressSpace(os_a), AddressSpace(os_b)
    da, db = os_a.get_frame(), os_b.get_frame()
    assert da is not None and db is not None
    mm_a.map(GVA, da)
    mm_b.map(GVA, db)
    mmu = attach(vm, mm_a)
    mmu.call("set_root", cr3=mm_b.cr3, vcpu=1)
    mmu.translate(GVA, vcpu=0)
    mmu.translate(GVA, vcpu=1)
    assert mmu.status()["shadow_pages"] == 8
    vm.set_memslot(1, 0, 0)  # DELETE
    status = mmu.status()
    assert status["shadow_pages"] == 4 and status["region_removed"] == 4
    assert status["untrack_errors"] == 0
    assert sorted(vm.tracked_gfns(OWNER).tolist()) == sorted(mm_a.tables)
    assert mmu.audit().clean
    with pytest.raises(FailedPrecondition):
        mmu.translate(GVA, vcpu=1)


def test_detach_releases_every_reference_and_unregisters() -> None:
    """detach: the notifier is gone, plugin:shadow_mmu holds nothing, state is dropped."""
    vm, os, mm = make_guest()
    data = os.get_frame()
    assert data is not None
    mm.map(GVA, data)
    vm.track_add([data])  # the tenant's reference survives
    mmu = attach(vm, mm)
    mmu.translate(GVA)
    assert len(vm.notifiers) == 1 and len(vm.tracked_gfns(OWNER)) == 4
    mmu.detach()
    assert len(vm.notifiers) == 0
    assert len(vm.tracked_gfns(OWNER)) == 0
    assert vm.tracked_gfns().tolist() == [data]
    assert mmu.released_gfns == 4
    assert write_entry(vm, tables(mm, 1)[0], 3, 0) is WritePath.FAST
    with pytest.raises(FailedPrecondition):
        mmu.call("translate", gva=GVA)


def test_eviction_keeps_shadow_pages_under_the_limit() -> None:
    """max_shadow_pages (n_max_mmu_pages): the oldest non-root pages are zapped first."""
    vm, os, mm = make_guest(pages=8192)
    data = os.get_frame()
    assert data is not None
    for i in range(60):
        mm.map(i << 30, data)  # one PD and one PT per GiB
    mmu = attach(vm, mm, max_shadow_pages=64)
    for i in range(60):
        assert mmu.translate((i << 30) + 0x10)["present"]
    status = mmu.status()
    assert int(status["shadow_pages"]) <= 64 and int(status["evicted"]) > 0
    assert status["tracked_refs"] == status["shadow_pages"]
    assert mmu.audit().clean


def test_set_root_switches_and_reuses_cached_roots() -> None:
    """kvm_mmu_new_pgd: a CR3 among the vCPU's previous roots is a fast switch."""
    vm, os, mm = make_guest()
    other = AddressSpace(os)
    mmu = attach(vm, mm)
    assert mmu.call("set_root", cr3=other.cr3)["cached"] is False
    back = mmu.call("set_root", cr3=mm.cr3)
    assert back["cached"] is True and back["root_gfn"] == mm.pml4
    assert mmu.status()["roots"] == 2
    assert f"vcpu0={mm.cr3:#x}" in str(mmu.status()["cr3"])


def test_guest_faults_are_reported_not_raised() -> None:
    """A gva the guest does not map is a guest #PF: present False with the reason."""
    vm, os, mm = make_guest()
    mmu = attach(vm, mm)
    out = mmu.translate(GVA)
    assert out["present"] is False and out["fault"] == "not present at level 4"
    assert mmu.status()["guest_faults"] == 1


def test_bad_calls_are_invalid_arguments() -> None:
    """Unknown ops, unknown options and malformed gvas raise InvalidArgument."""
    vm, os, mm = make_guest()
    mmu = attach(vm, mm)
    with pytest.raises(InvalidArgument):
        mmu.call("frobnicate")
    with pytest.raises(InvalidArgument):
        mmu.call("translate", gva=1 << 48)  # not canonical
    with pytest.raises(InvalidArgument):
        mmu.call("translate", gva=GVA, bogus=1)
    with pytest.raises(InvalidArgument):
        mmu.call("unprotect")
    with pytest.raises(InvalidArgument):
        ShadowMmu().attach(vm, colour="red")
    with pytest.raises(InvalidArgument):
        ShadowMmu().attach(vm, flood_threshold=0)
    with pytest.raises(FailedPrecondition):
        ShadowMmu().attach(vm, root=0x7000_0000)  # not RAM
    assert len(vm.notifiers) == 1


@pytest.mark.parametrize("seed", range(4))
def test_audit_stays_clean_when_guest_tables_hold_random_garbage(seed: int) -> None:
    """Random entries (any flags, large pages, frames in and out of RAM, tables that
    point at themselves), random writes of any size and random walks: after every
    step the shadow agrees with guest memory (a fresh walk of every entry)."""
    rng = np.random.default_rng(seed)
    base, pages = 0x2000, 48
    vm = Vm("garbage", vcpus=1)
    vm.set_memslot(0, base, pages)

    def entry() -> int:
        gfn = base + int(rng.integers(pages + 8)) if rng.random() < 0.9 else 0x7_0000
        flags = PTE_P if rng.random() < 0.85 else 0
        for bit, p in ((PTE_RW, 0.7), (PTE_US, 0.5), (PTE_PS, 0.15), (PTE_NX, 0.2)):
            if rng.random() < p:
                flags |= bit
        return (gfn << PAGE_SHIFT) | flags

    for gfn in range(base, base + pages):
        vm.write(0, gfn << PAGE_SHIFT, b"".join(entry().to_bytes(8, "little") for _ in range(8)))
    mmu = ShadowMmu()
    mmu.attach(vm, root=base << PAGE_SHIFT)
    checked = 0
    for step in range(400):
        r = rng.random()
        gfn = base + int(rng.integers(pages))
        if r < 0.45:
            idx = int(rng.integers(8))
            vm.write(0, (gfn << PAGE_SHIFT) + idx * 8, entry().to_bytes(8, "little"))
        elif r < 0.55:
            n = int(rng.choice([1, 2, 4, 8, 16]))
            off = int(rng.integers(64))
            vm.write(0, (gfn << PAGE_SHIFT) + off, rng.bytes(n))
        else:
            gva = 0
            for level in (4, 3, 2, 1):
                gva |= int(rng.integers(8)) << (12 + 9 * (level - 1))
            mmu.translate(gva, write=bool(rng.random() < 0.5))
        if step % 10 == 0:
            report = mmu.audit()
            assert report.clean, (step, report.mismatches)
            checked += report.checked
    assert mmu.audit().clean
    assert checked > 100 and int(mmu.status()["faults"]) > 50


@pytest.mark.parametrize("owner", [TENANT_OWNER, "lease:tool", "plugin:vgpu"])
def test_r3_1_r3_3_another_users_add_write_protects_the_sptes_mapping_the_gfn(
    owner: str,
) -> None:
    """R3.1/R3.3: when any user's add takes a gfn's counter 0 -> 1, KVM write-protects
    every SPTE mapping it (arch/x86/kvm/mmu/page_track.c __kvm_write_track_add_gfn ->
    mmu.c kvm_mmu_slot_gfn_write_protect), so the next guest write faults and takes the
    tracked-write path (page_fault_handle_page_track), and the fault path installs no
    writable SPTE while the counter is above 0 (mmu_try_to_unsync_pages: -EPERM)."""
    vm, os, mm, mmu, data = shadowed()
    before = mmu.translate(GVA, write=True)
    assert before["writable"] and not before["emulated"]
    vm.track_add([data], owner=owner)
    assert mmu.audit().clean
    out = mmu.translate(GVA, write=True)
    assert out["faulted"] and out["emulated"] and not out["writable"]
    assert mmu.status()["write_protected"] == 1
    again = mmu.translate(GVA, write=True)  # still read-only: faults and emulates again
    assert again["faulted"] and again["emulated"]
    vm.track_remove([data], owner=owner)
    after = mmu.translate(GVA, write=True)  # write access comes back lazily (R3.2)
    assert after["writable"] and not after["emulated"]


def test_r3_3_audit_checks_every_spte_against_the_current_counters() -> None:
    """R3.3: no writable SPTE may map a gfn whose counter is above 0, whoever holds the
    reference (arch/x86/kvm/mmu/mmu.c mmu_try_to_unsync_pages). The audit reads the
    counters, not only the plugin's own tables: with the VM's add hook cut (the MMU
    never hears of the tenant's add), the stale writable SPTE is reported."""
    vm, os, mm, mmu, data = shadowed()
    assert mmu.translate(GVA, write=True)["writable"]
    vm.track_start_hooks.clear()
    vm.track_add([data])
    report = mmu.audit()
    assert [m.address for m in report.mismatches] == [GVA]
    assert "write-tracked gfn" in report.mismatches[0].reason


@pytest.mark.parametrize("mmu_first", [True, False])
def test_r4_8_shadow_mmu_runs_after_every_external_notifier(mmu_first: bool) -> None:
    """R4.8: KVM calls kvm_mmu_track_write after walking the external notifier list
    (arch/x86/kvm/mmu/page_track.h kvm_page_track_write, 6.6+; before, the MMU's node
    was registered at VM creation and so ran last), whatever the attach order."""
    calls: list[str] = []

    class SpyMmu(ShadowMmu):
        def track_write(self, vm: Vm, event: WriteEvent) -> None:
            calls.append("mmu")
            super().track_write(vm, event)

    class External:
        name = "kvmgt"
        external = True

        def track_write(self, vm: Vm, event: WriteEvent) -> None:
            calls.append("external")

        def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
            pass

    vm, os, mm = make_guest()
    data = os.get_frame()
    assert data is not None
    mm.map(GVA, data)
    mmu = SpyMmu()
    if mmu_first:
        mmu.attach(vm, root=mm.cr3)
        vm.register_notifier(External())
    else:
        vm.register_notifier(External())
        mmu.attach(vm, root=mm.cr3)
    mmu.translate(GVA)
    calls.clear()
    vm.write(0, mm.entry_gpa(GVA, 1), make_leaf_entry(data).to_bytes(8, "little"))
    assert calls == ["external", "mmu"]


def test_owner_ids_are_the_tenant_name_and_shadow_mmu_as_the_api_says() -> None:
    """OwnerCount.id is the tenant's name for tenant references and "shadow-mmu" for the
    shadow MMU's (pagetrack.proto OwnerCount)."""
    from pagetrack.v1 import pagetrack_pb2 as pb
    from pagetrackd.transport.convert import owner_pb

    vm, os, mm, mmu, data = shadowed()
    vm.track_add([mm.cr3 >> PAGE_SHIFT])
    owners = vm.track_query([mm.cr3 >> PAGE_SHIFT])[0].owners
    got = sorted((o.kind, o.id, o.count) for o in (
        owner_pb(k, c, "acme") for k, c in owners.items()
    ))
    assert got == [(pb.OWNER_KIND_TENANT, "acme", 1), (pb.OWNER_KIND_PLUGIN, "shadow-mmu", 1)]


def test_r3_1_a_multi_gfn_add_write_protects_every_gfn() -> None:
    """R3.1: an add of many gfns at once (a range, a list) write-protects the SPTEs of
    each gfn that becomes tracked, as one add per gfn would (arch/x86/kvm/mmu/mmu.c
    kvm_mmu_slot_gfn_write_protect)."""
    vm, os, mm, mmu, data = shadowed()
    other = os.get_frame()
    assert other is not None
    mm.map(GVA + 0x1000, other)
    for gva in (GVA, GVA + 0x1000):
        assert mmu.translate(gva, write=True)["writable"]
    vm.track_add([data, other], owner="lease:tool")
    for gva in (GVA, GVA + 0x1000):
        out = mmu.translate(gva, write=True)
        assert out["faulted"] and out["emulated"] and not out["writable"]
    assert mmu.audit().clean


def test_r7_4_finding_a_shadow_page_by_lookup_resets_its_flood_count() -> None:
    """R7.4: the flood count is reset when the shadow-page lookup finds the page
    (arch/x86/kvm/mmu/mmu.c kvm_mmu_find_shadow_page -> clear_sp_write_flooding_count),
    not only on a fault's walk: two writes to the PML4, another vCPU loading the same
    root, then a third write does not flood it."""
    vm, os, mm, mmu, data = shadowed()
    root = mm.cr3 >> PAGE_SHIFT
    for _ in range(2):
        write_entry(vm, root, 300, 0)
    assert [p["flood"] for p in mmu.shadow_pages() if p["gfn"] == root] == [2]
    mmu.call("set_root", cr3=mm.cr3, vcpu=1)  # found by the lookup: a use
    assert [p["flood"] for p in mmu.shadow_pages() if p["gfn"] == root] == [0]
    write_entry(vm, root, 300, 0)
    assert mmu.status()["flooded"] == 0 and vm.is_tracked(root)
