"""The vGPU plugin against KVMGT / GVT-g (rules R8 of docs/kvm-rules.md).

Sources: torvalds/linux drivers/gpu/drm/i915/gvt/kvmgt.c (open_device, protect table,
kvmgt_page_track_write, kvmgt_page_track_remove_region), gvt/page_track.c (the page-track
layer) and gvt/gtt.c (ppgtt_write_protection_handler,
ppgtt_handle_guest_write_page_table_bytes, ppgtt_set_post_shadow,
intel_vgpu_flush_post_shadow, ppgtt_populate_spt_by_guest_entry).
"""

from __future__ import annotations

import pytest

from pagetrackd.domain import (
    PAGE_SHIFT,
    AlreadyExists,
    FailedPrecondition,
    GfnNotInSlot,
    InvalidArgument,
    NotFound,
    Semantics,
    Vm,
    WriteEvent,
    WritePath,
)
from pagetrackd.domain.types import TENANT_OWNER
from pagetrackd.plugins import PLUGINS
from pagetrackd.plugins.vgpu import OWNER, Vgpu, find_vgpu

from .vgpu_helpers import (
    DATA_BASE,
    PD,
    PDP,
    PML4,
    PT,
    PT2,
    attach,
    entry_gpa,
    gfn_of,
    make_vm,
    pte,
    put,
    put_half,
    va_of,
)

TABLES = [PML4, PDP, PD, PT]


def owner_refs(vm: Vm, gfn: int, owner: str = OWNER) -> int:
    return vm.track_query([gfn])[0].owners.get(owner, 0)


def test_plugin_is_registered_by_name() -> None:
    assert PLUGINS["vgpu"] is Vgpu
    assert Vgpu.name == "vgpu" and Vgpu.external


# ---------------------------------------------------------------- R8.1 attach / detach


def test_r8_1_second_vgpu_on_same_vm_is_refused() -> None:
    """kvmgt.c intel_vgpu_open_device: -EEXIST for a second vGPU on one VM."""
    vm = make_vm()
    first = attach(vm)
    with pytest.raises(AlreadyExists):
        Vgpu().attach(vm)
    with pytest.raises(AlreadyExists):
        first.attach(make_vm())
    assert find_vgpu(vm) is first
    assert len(vm.notifiers) == 1


def test_r8_1_detach_unregisters_then_drops_every_reference() -> None:
    """kvmgt.c close: unregister the notifier (no callback after), then free the table."""
    vm = make_vm()
    vgpu = attach(vm)
    assert sorted(vm.tracked_gfns(OWNER).tolist()) == TABLES
    vgpu.detach()
    assert len(vm.notifiers) == 0
    assert vm.tracked_count == 0
    assert vgpu.status()["shadowed_tables"] == 0
    result = vm.write(0, entry_gpa(PT, 0), pte(DATA_BASE + 9).to_bytes(8, "little"))
    assert result.pieces[0].path is WritePath.FAST  # untracked now: nobody is told
    vgpu.detach()  # idempotent
    again = Vgpu()
    again.attach(vm)  # a new vGPU may attach once the old one is gone
    assert find_vgpu(vm) is again


def test_r8_1_bad_attach_options_are_refused_without_registering() -> None:
    vm = make_vm()
    with pytest.raises(InvalidArgument):
        Vgpu().attach(vm, partial="sometimes")
    with pytest.raises(InvalidArgument):
        Vgpu().attach(vm, colour="blue")
    assert len(vm.notifiers) == 0


def test_vm_close_drops_shadow_state() -> None:
    vm = make_vm()
    vgpu = attach(vm)
    vm.close()
    assert vgpu.vm is None and vgpu.status()["shadowed_tables"] == 0


# ---------------------------------------------------------------- R8.2 / R8.3 tracking


def test_r8_2_every_shadowed_table_is_tracked_once_by_the_vgpu() -> None:
    """kvmgt.c intel_gvt_page_track_add: one KVM reference per gfn per vGPU."""
    vm = make_vm()
    put(vm, PD, 1, pte(PT))  # a second PDE naming the same PT: the spt is shared
    vgpu = attach(vm)
    assert vgpu.protect_table == frozenset(TABLES)
    for gfn in TABLES:
        assert owner_refs(vm, gfn) == 1
    assert vgpu.status()["shadowed_tables"] == 4


def test_r8_2_protect_table_adds_once_per_gfn() -> None:
    """R8.2: intel_gvt_page_track_add returns 0 without calling KVM when the gfn is
    already in the protect table, so the vGPU holds at most one reference per gfn
    (drivers/gpu/drm/i915/gvt/kvmgt.c); removing it twice drops it once."""
    vm = make_vm()
    vgpu = attach(vm)
    vgpu._protect_add(PT)
    vgpu._protect_add(PT)
    assert owner_refs(vm, PT) == 1
    vgpu._protect_remove(PT)
    vgpu._protect_remove(PT)
    assert owner_refs(vm, PT) == 0 and vgpu.status()["handler_errors"] == 0


def test_r8_2_vgpu_reference_adds_to_the_tenants_counter() -> None:
    """R3.4: users share one counter; the vGPU's unshadowing leaves the tenant's ref."""
    vm = make_vm()
    vm.track_add([PT], owner=TENANT_OWNER)
    vgpu = attach(vm)
    assert vm.track_query([PT])[0].count == 2
    vgpu.call("destroy_ppgtt", ppgtt=0)
    info = vm.track_query([PT])[0]
    assert info.count == 1 and info.owners == {TENANT_OWNER: 1}


def test_r8_3_unlinking_a_table_unshadows_and_untracks_its_subtree() -> None:
    """gtt.c ppgtt_invalidate_spt -> ppgtt_free_spt -> intel_vgpu_unregister_page_track."""
    vm = make_vm()
    vgpu = attach(vm)
    put(vm, PDP, 0, 0)
    assert vgpu.protect_table == frozenset({PML4, PDP})
    assert sorted(vm.tracked_gfns().tolist()) == [PML4, PDP]
    assert vgpu.status()["dma_mapped_pages"] == 0
    assert vgpu.audit().clean
    # Writes to the old tables are now fast-path writes nobody is told of.
    assert vm.write(0, entry_gpa(PT, 0), bytes(8)).pieces[0].path is WritePath.FAST


# ---------------------------------------------------------------- R8.4 / R8.5 the handler


def test_r8_4_writes_to_gfns_outside_the_protect_table_are_not_handled() -> None:
    """kvmgt_page_track_write: only gfns in the protect table reach the handler (R4.6:
    every notifier hears every emulated write and must filter)."""
    vm = make_vm()
    vgpu = attach(vm)
    vm.track_add([DATA_BASE + 100], owner=TENANT_OWNER)
    vm.write(0, (DATA_BASE + 100) << PAGE_SHIFT, pte(PT).to_bytes(8, "little"))
    s = vgpu.status()
    assert s["foreign_writes"] == 1 and s["writes"] == 0


@pytest.mark.parametrize("size", [1, 2, 16])
def test_r8_5_writes_of_other_sizes_are_ignored_and_left_stale(size: int) -> None:
    """gtt.c ppgtt_write_protection_handler: bytes != 4 && bytes != 8 -> -EINVAL, ignored.
    The shadow then disagrees with memory, which the audit shows."""
    vm = make_vm()
    vgpu = attach(vm)
    new = pte(DATA_BASE + 0x55).to_bytes(8, "little")
    if size == 16:  # entry 2 changes, entry 3 is rewritten with its own value
        vm.write(0, entry_gpa(PT, 2), new + pte(DATA_BASE + 3).to_bytes(8, "little"))
    else:  # address bytes only
        vm.write(0, entry_gpa(PT, 2) + 1, new[1 : 1 + size])
    assert vgpu.status()["ignored_writes"] == 1
    assert gfn_of(vgpu, va_of(2)) == DATA_BASE + 2
    stale = vgpu.audit().mismatches
    assert [(m.address, m.level) for m in stale] == [(va_of(2), 1)]


def test_r8_5_the_entry_is_reread_from_guest_memory_not_taken_from_the_event() -> None:
    """gtt.c ppgtt_handle_guest_write_page_table_bytes: ppgtt_get_guest_entry re-reads;
    the `new` bytes are not used (R4.9)."""
    vm = make_vm()
    vgpu = attach(vm)
    # Memory says DATA_BASE + 7 (a write nobody saw), the event claims DATA_BASE + 99.
    slot = vm.slots.find(PT)
    assert slot is not None
    slot.memory.write(PT - slot.base_gfn, 8 * 3, pte(DATA_BASE + 7).to_bytes(8, "little"))
    bogus = WriteEvent(1, 0, entry_gpa(PT, 3), pte(DATA_BASE + 99).to_bytes(8, "little"))
    vgpu.track_write(vm, bogus)
    assert gfn_of(vgpu, va_of(3)) == DATA_BASE + 7
    assert vgpu.audit().clean


def test_r8_5_write_to_an_entry_of_an_unknown_gfn_counts_enxio() -> None:
    """intel_vgpu_page_track_handler: a protected gfn with no handler gives -ENXIO."""
    vm = make_vm()
    vgpu = attach(vm)
    vgpu._protect.add(DATA_BASE)  # inconsistent on purpose (hook for this test)
    vgpu.track_write(vm, WriteEvent(1, 0, DATA_BASE << PAGE_SHIFT, bytes(8)))
    assert vgpu.status()["handler_errors"] == 1


# ---------------------------------------------------------------- R8.6 full writes


def test_r8_6_eight_byte_write_reshadows_at_once() -> None:
    """gtt.c ppgtt_handle_guest_write_page_table: add the new entry, remove the old."""
    vm = make_vm()
    vgpu = attach(vm)
    put(vm, PT, 0, pte(DATA_BASE + 500))
    assert gfn_of(vgpu, va_of(0)) == DATA_BASE + 500
    put(vm, PT, 1, 0)  # cleared: not present -> scratch
    out = vgpu.call("translate", va=va_of(1), ppgtt=0)
    assert out["scratch"] and not out["present"]
    s = vgpu.status()
    assert s["full_writes"] == 2 and s["pending"] == 0
    assert s["dma_mapped_pages"] == 7  # 8 mapped, one remapped, one cleared
    assert vgpu.audit().clean


def test_r8_6_linking_a_new_table_shadows_and_tracks_it() -> None:
    """gtt.c ppgtt_populate_spt_by_guest_entry: a new child spt write-tracks its gfn."""
    vm = make_vm()
    vgpu = attach(vm)
    put(vm, PT2, 5, pte(DATA_BASE + 600))  # untracked yet: fast path
    put(vm, PD, 1, pte(PT2))  # PD entry 1 covers va 2 MiB .. 4 MiB
    assert PT2 in vgpu.protect_table
    assert gfn_of(vgpu, (1 << 21) + va_of(5)) == DATA_BASE + 600
    put(vm, PT2, 6, pte(DATA_BASE + 601))  # now emulated and followed
    assert gfn_of(vgpu, (1 << 21) + va_of(6)) == DATA_BASE + 601
    assert vgpu.audit().clean


def test_r8_6_same_child_rewritten_keeps_its_shadow_table() -> None:
    """Adding before removing keeps a rewritten, unchanged child alive (its refcount)."""
    vm = make_vm()
    vgpu = attach(vm)
    created = vgpu.stats.spts_created
    put(vm, PD, 0, pte(PT))
    assert vgpu.stats.spts_created == created and vgpu.stats.spts_freed == 0


def test_a_table_named_at_two_levels_is_a_type_conflict() -> None:
    vm = make_vm()
    vgpu = attach(vm)
    put(vm, PD, 1, pte(PD))  # a PD entry naming the PD itself as a PT
    assert vgpu.status()["type_conflicts"] == 1
    out = vgpu.call("translate", va=(1 << 21), ppgtt=0)
    assert out["scratch"]
    assert vgpu.audit().clean


# ---------------------------------------------------------------- R8.7 partial writes


def test_r8_7_partial_write_points_at_scratch_until_complete() -> None:
    """gtt.c ppgtt_handle_guest_write_page_table_bytes: a 4-byte write removes the old
    shadow entry and points it at the scratch page, pending in post_shadow_bitmap. With
    the partial="halves" option (a deliberate difference) the second half completes it."""
    vm = make_vm()
    vgpu = attach(vm, partial="halves")
    new = pte(DATA_BASE + 700)
    put_half(vm, PT, 4, new, high=False)
    out = vgpu.call("translate", va=va_of(4), ppgtt=0)
    assert out["scratch"] and out["host_frame"] == vgpu.scratch[1]
    assert vgpu.status()["pending"] == 1
    assert vgpu.audit().clean  # pending entries are allowed to differ
    put_half(vm, PT, 4, new, high=False)  # the same half again: still pending
    assert vgpu.status()["pending"] == 1
    put_half(vm, PT, 4, new, high=True)
    assert gfn_of(vgpu, va_of(4)) == DATA_BASE + 700
    s = vgpu.status()
    assert s["pending"] == 0 and s["partial_writes"] == 3 and s["completed_partials"] == 1
    assert vgpu.audit().clean


def test_r8_7_flush_mode_waits_for_the_submission_and_reshadows_once() -> None:
    """gtt.c intel_vgpu_flush_post_shadow (before workload submission): re-read each
    pending entry, handle it as a full write, clear the bit. Two halves -> one re-shadow."""
    vm = make_vm()
    vgpu = attach(vm, partial="flush")
    new = pte(DATA_BASE + 701)
    put_half(vm, PT, 4, new, high=True)
    put_half(vm, PT, 4, new, high=False)
    assert frame_is_scratch(vgpu, va_of(4))
    assert vgpu.status()["pending"] == 1
    out = vgpu.call("submit", ppgtt=0, batch_va=va_of(0))
    assert out == {"submission": 1, "flushed": 1, "ppgtt": 0, "batch_scratch": False}
    assert gfn_of(vgpu, va_of(4)) == DATA_BASE + 701
    assert vgpu.status()["pending"] == 0
    assert vgpu.audit().clean


def test_r8_7_partial_unlink_of_a_table_frees_it_at_the_first_half() -> None:
    vm = make_vm()
    vgpu = attach(vm, partial="flush")
    put_half(vm, PD, 0, 0, high=False)
    assert PT not in vgpu.protect_table and not vm.is_tracked(PT)
    assert vgpu.call("flush") == {"flushed": 1}
    assert vgpu.audit().clean


def frame_is_scratch(vgpu: Vgpu, va: int) -> bool:
    return bool(vgpu.call("translate", va=va, ppgtt=0)["scratch"])


# ---------------------------------------------------------------- R8.9 validity


def test_r8_9_leaf_outside_memslots_maps_scratch_and_counts_a_violation() -> None:
    vm = make_vm()
    vgpu = attach(vm)
    put(vm, PT, 0, pte(0x80000))  # no memslot there
    out = vgpu.call("translate", va=va_of(0), ppgtt=0)
    assert out["scratch"] and out["present"]
    assert vgpu.status()["violations"] == 1
    assert vgpu.audit().clean


def test_r8_9_table_outside_memslots_maps_scratch_with_the_scratch_option() -> None:
    """With missing_table="scratch" (a deliberate difference from gtt.c) a child table
    whose gfn has no memslot is not shadowed or tracked; the entry maps the scratch table."""
    vm = make_vm()
    vgpu = attach(vm, missing_table="scratch")
    put(vm, PD, 2, pte(0x90000))
    assert vgpu.status()["violations"] == 1
    assert 0x90000 not in vgpu.protect_table
    assert frame_is_scratch(vgpu, 2 << 21)
    assert vgpu.audit().clean


def test_r8_9_shadowing_a_child_table_outside_memslots_fails_by_default() -> None:
    """R8.9: shadowing a child table whose gfn has no memslot fails, because add_gfn
    returns -EINVAL (drivers/gpu/drm/i915/gvt/gtt.c ppgtt_populate_spt_by_guest_entry ->
    intel_vgpu_enable_page_track; ppgtt_handle_guest_write_page_table "goto fail"): the
    write keeps the old shadow entry, nothing is tracked, a violation is counted and the
    audit names the failure; a PPGTT that links such a table cannot be shadowed."""
    vm = make_vm()
    vgpu = attach(vm)
    before = vgpu.call("translate", va=va_of(3), ppgtt=0)
    put(vm, PD, 0, pte(0x90000))  # PD[0] pointed at PT; now at a gfn in no memslot
    assert vgpu.status()["violations"] == 1
    assert 0x90000 not in vgpu.protect_table and not vm.is_tracked(0x90000)
    assert vgpu.call("translate", va=va_of(3), ppgtt=0) == before  # old entry kept
    report = vgpu.audit()
    assert [m.index for m in report.mismatches] == [0]
    assert "shadowing failed" in report.mismatches[0].reason
    other = Vgpu()
    vm2 = make_vm()
    put(vm2, PD, 5, pte(0x90000))
    other.attach(vm2)
    with pytest.raises(FailedPrecondition, match="no memslot"):
        other.call("build_ppgtt", root_gpa=PML4 << PAGE_SHIFT)
    assert other.status()["ppgtts"] == 0 and vm2.tracked_count == 0


def test_r8_7_default_waits_for_the_flush_before_submission() -> None:
    """R8.7: by default two 4-byte halves leave the entry pending on the scratch page
    until the post-shadow list is flushed before a workload is submitted
    (drivers/gpu/drm/i915/gvt/gtt.c intel_vgpu_flush_post_shadow), not when the second
    half arrives; the status counts it under the API's names."""
    vm = make_vm()
    vgpu = attach(vm)
    new = pte(DATA_BASE + 702)
    put_half(vm, PT, 4, new, high=False)
    put_half(vm, PT, 4, new, high=True)
    assert frame_is_scratch(vgpu, va_of(4))
    s = vgpu.status()
    assert (s["pending_partial"], s["scratch_entries"], s["shadow_tables"]) == (1, 1, 4)
    assert s["violations"] == 0 and s["completed_partials"] == 0
    assert vgpu.call("submit", ppgtt=0)["flushed"] == 1
    assert gfn_of(vgpu, va_of(4)) == DATA_BASE + 702
    assert (vgpu.status()["pending_partial"], vgpu.status()["scratch_entries"]) == (0, 0)


def test_r8_9_root_outside_memslots_is_refused() -> None:
    vm = make_vm()
    vgpu = Vgpu()
    vgpu.attach(vm)
    with pytest.raises(GfnNotInSlot):
        vgpu.call("build_ppgtt", root_gpa=0x90000 << PAGE_SHIFT)
    assert vgpu.status()["ppgtts"] == 0


# ---------------------------------------------------------------- R8.10 region removal


def test_r8_10_remove_region_forgets_gfns_without_untracking() -> None:
    """kvmgt_page_track_remove_region: the vGPU drops the gfns from its protect table only,
    and a later unshadow of them does not call remove. Under 2016 semantics a MOVE keeps the
    slot's counters but the vGPU's own references go with the old range, as the 2016
    kvmgt flush_slot removed them (drivers/gpu/drm/i915/gvt/kvmgt.c)."""
    vm = make_vm(semantics=Semantics.V2016)
    vgpu = attach(vm)
    vm.set_memslot(0, 0x8000, 64)  # MOVE the table slot: the old range is gone
    assert vgpu.protect_table == frozenset()
    moved = [0x8000 + (g - 0x100) for g in TABLES]
    assert [owner_refs(vm, g) for g in moved] == [0, 0, 0, 0]
    vgpu.call("destroy_ppgtt", ppgtt=0)
    assert vgpu.status()["handler_errors"] == 0
    vgpu.detach()
    assert vm.tracked_count == 0


def test_r8_10_after_delete_writes_to_the_range_are_not_handled() -> None:
    """R8.10 (6.6+): kvmgt_page_track_remove_region deletes the range's gfns from the
    protect table only and does not call kvm_write_track_remove_gfn for them
    (drivers/gpu/drm/i915/gvt/kvmgt.c)."""
    vm = make_vm(semantics=Semantics.LINUX_6_6)
    vgpu = attach(vm)
    removes: list[tuple[list[int], str]] = []
    real_remove = vm.track_remove

    def spy(gfns: list[int], owner: str = TENANT_OWNER) -> int:
        removes.append((list(gfns), owner))
        return real_remove(gfns, owner)

    vm.track_remove = spy  # type: ignore[method-assign,assignment]
    vm.set_memslot(0, 0, 0)
    assert removes == [] and vgpu.status()["handler_errors"] == 0
    assert vgpu.protect_table == frozenset()
    assert vgpu.status()["regions_removed"] == 1
    audit = vgpu.audit()
    assert audit.mismatches and "no memslot" in audit.mismatches[0].reason


# ---------------------------------------------------------------- ops


def test_build_ppgtt_finds_an_existing_root_and_counts_references() -> None:
    """gtt.c intel_vgpu_get_ppgtt_mm: find by root, else create."""
    vm = make_vm()
    vgpu = attach(vm)
    again = vgpu.call("build_ppgtt", root_gpa=PML4 << PAGE_SHIFT)
    assert again["ppgtt"] == 0 and not again["created"]
    assert vgpu.call("destroy_ppgtt", ppgtt=0)["destroyed"] is False
    assert vgpu.call("destroy_ppgtt", ppgtt=0)["destroyed"] is True
    assert vgpu.protect_table == frozenset()


def test_build_ppgtt_without_a_root_takes_a_fresh_zero_page() -> None:
    vm = make_vm()
    vgpu = Vgpu()
    vgpu.attach(vm)
    out = vgpu.call("build_ppgtt")
    root = out["root_gpa"] >> PAGE_SHIFT
    assert out["created"] and root == DATA_BASE + 1023  # top of the highest slot
    assert vm.is_tracked(root) and out["tables"] == 1
    put(vm, root, 0, pte(PDP))  # the guest fills it in; the vGPU follows
    assert vgpu.status()["shadowed_tables"] == 4
    assert vgpu.audit().clean


def test_attach_with_root_gpa_shadows_at_once() -> None:
    vm = make_vm()
    vgpu = Vgpu()
    vgpu.attach(vm, root_gpa=PML4 << PAGE_SHIFT)
    assert vgpu.status()["shadowed_tables"] == 4


def test_submit_by_root_adopts_an_unknown_ppgtt() -> None:
    vm = make_vm()
    vgpu = Vgpu()
    vgpu.attach(vm)
    out = vgpu.call("submit", root_gpa=PML4 << PAGE_SHIFT, batch_va=va_of(100))
    assert out["ppgtt"] == 0 and out["batch_scratch"] is True  # va page 100 is unmapped
    s = vgpu.status()
    assert s["submissions"] == 1 and s["scratch_batches"] == 1 and s["ppgtts"] == 1


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("frobnicate", {}),
        ("translate", {"va": -1, "ppgtt": 0}),
        ("translate", {"va": 1 << 48, "ppgtt": 0}),
        ("build_ppgtt", {"root_gpa": 0x100123}),
        ("build_ppgtt", {"root_gpa": "0x100000"}),
        ("submit", {"ppgtt": 0, "colour": 1}),
    ],
)
def test_bad_calls_raise_invalid_argument_and_change_nothing(
    op: str, args: dict[str, object]
) -> None:
    vm = make_vm()
    vgpu = attach(vm)
    before = vgpu.status()
    with pytest.raises(InvalidArgument):
        vgpu.call(op, **args)
    assert vgpu.status() == before


def test_unknown_ppgtt_is_not_found() -> None:
    vm = make_vm()
    vgpu = attach(vm)
    with pytest.raises(NotFound):
        vgpu.call("translate", va=0, ppgtt=7)


def test_status_reports_the_shadow() -> None:
    vm = make_vm(leaves=8)
    vgpu = attach(vm)
    s = vgpu.status()
    assert s["attached"] == 1 and s["ppgtts"] == 1 and s["shadowed_tables"] == 4
    assert s["shadow_entries"] == 3 + 8  # three links and eight pages
    assert s["protected_gfns"] == 4 and s["violations"] == 0
    assert vgpu.call("protect_table") == {"gfns": TABLES}
    assert vgpu.call("ppgtts")["ppgtts"] == [
        {"ppgtt": 0, "root_gpa": PML4 << PAGE_SHIFT, "refs": 1}
    ]
