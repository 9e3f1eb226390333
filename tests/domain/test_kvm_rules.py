"""One test per KVM rule the core implements, named after the rule (docs/kvm-rules.md).

Kernel paths are in torvalds/linux. docs/kvm-rules.md is generated from these tests
(and the plugins'): a test named ``test_rX_Y_...`` checks rule RX.Y, its docstring says
how and cites the kernel function. R7 and R8 (the shadow MMU and vGPU plugins) are
tested with the plugins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import structlog

from pagetrackd.domain import (
    PAGE_SIZE,
    AlreadyExists,
    CostModel,
    CounterOverflow,
    DmaPolicy,
    DmaRejected,
    EventBatch,
    FailedPrecondition,
    GfnNotInSlot,
    InvalidArgument,
    MoveRefused,
    NotTracked,
    Registry,
    Semantics,
    SlotChange,
    SlotFlags,
    SlotNotFound,
    Source,
    TenantId,
    TrackInfo,
    Vm,
    VmNotFound,
    WriteEvent,
    WritePath,
    WritePiece,
)
from pagetrackd.domain.types import NO_VCPU
from pagetrackd.plugins.shadow_mmu import ShadowMmu
from pagetrackd.workloads.guest_os import AddressSpace, GuestOs

MMIO, FAST, EMUL = WritePath.MMIO_EXIT, WritePath.FAST, WritePath.EMULATED
V2016, V66 = Semantics.V2016, Semantics.LINUX_6_6


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[Any]]:
    """Capture the core's log lines (failing notifiers are logged)."""
    with structlog.testing.capture_logs() as captured:
        yield captured


class Rec:
    """A notifier that records what it is told into a shared call log, and may run a
    hook inside each callback."""

    def __init__(
        self,
        name: str,
        calls: list[tuple[Any, ...]] | None = None,
        *,
        external: bool = True,
        on_write: Callable[[Vm, WriteEvent], object] | None = None,
        on_region: Callable[[Vm, int, int], object] | None = None,
    ) -> None:
        self.name = name
        self.external = external
        self.calls = calls if calls is not None else []
        self.events: list[WriteEvent] = []
        self.regions: list[tuple[int, int]] = []
        self.on_write = on_write
        self.on_region = on_region

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        self.calls.append(("write", self.name, event.seq))
        self.events.append(event)
        if self.on_write:
            self.on_write(vm, event)

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        self.calls.append(("region", self.name, base_gfn, npages))
        self.regions.append((base_gfn, npages))
        if self.on_region:
            self.on_region(vm, base_gfn, npages)


class BatchRec(Rec):
    """A batch-capable recorder."""

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.batches: list[list[WriteEvent]] = []

    def track_write_batch(self, vm: Vm, batch: EventBatch) -> None:
        self.batches.append(list(batch.events()))


def make_vm(semantics: Semantics = V2016, **kw: Any) -> Vm:
    """A VM with slot 0 = gfns 0x100..0x13f."""
    vm = Vm("rules", semantics=semantics, **kw)
    vm.set_memslot(0, 0x100, 0x40)
    return vm


def aligned_vm() -> Vm:
    """A VM whose one slot covers a whole 1 GiB region (gfns 0..0x3ffff), so no huge
    page is disallowed at its edges (R3.5)."""
    vm = Vm("aligned")
    vm.set_memslot(0, 0, 1 << 18)
    return vm


def untracked(info: TrackInfo) -> bool:
    """No counter, no owner, not write-protected (huge pages may still be disallowed at
    a slot's edges, R3.5)."""
    return (info.count, info.owners, info.write_protected) == (0, {}, False)


def count(vm: Vm, gfn: int) -> int:
    return vm.track_query([gfn])[0].count


# ---------------------------------------------------------------- 1. data structures


def test_r1_1_one_uint16_counter_per_gfn_indexed_from_slot_base() -> None:
    """Each slot keeps one 16-bit counter per gfn at index gfn - base_gfn, zero at
    creation (arch/x86/kvm/mmu/page_track.c: gfn_write_track, __vcalloc,
    gfn_to_index). pagetrack allocates the counters lazily in chunks rather than
    all up front; the values are the same."""
    vm = make_vm()
    vm.set_memslot(1, 0x1000, 0x20)
    slot = vm.slots.by_id[1]
    idx = np.arange(0x20, dtype=np.int64)
    assert slot.tracking.counters.get(idx).dtype == np.uint16
    assert not slot.tracking.counters.get(idx).any()
    vm.track_add([0x1005, 0x1005, 0x101F])
    assert slot.tracking.counters.get(idx).dtype == np.uint16
    vm.track_add(np.full(300, 0x1006))
    assert slot.tracking.counters.get1(6) == 300  # past 8 bits
    assert slot.tracking.counters.get1(5) == 2
    assert slot.tracking.counters.get1(0x1F) == 1
    assert vm.slots.by_id[0].tracking.counters.nonzero == 0


def test_r1_3_counter_bounds_refused_not_warned() -> None:
    """KVM WARNs and leaves the counter unchanged when it would pass USHRT_MAX or go
    below 0 (page_track.c: update_gfn_write_track). pagetrack deliberately differs: it
    refuses with CounterOverflow / NotTracked, and the whole call changes nothing."""
    vm = make_vm()
    assert vm.track_add(np.full(0xFFFF, 0x110)) == 1
    assert count(vm, 0x110) == 0xFFFF
    with pytest.raises(CounterOverflow, match="65535"):
        vm.track_add([0x111, 0x110])  # 0x111 is fine, 0x110 overflows: nothing happens
    assert count(vm, 0x110) == 0xFFFF
    assert not vm.is_tracked(0x111)
    with pytest.raises(NotTracked):
        vm.track_remove([0x112])
    assert count(vm, 0x112) == 0
    assert vm.track_remove(np.full(0xFFFF, 0x110)) == 1
    assert count(vm, 0x110) == 0


def test_r1_4_refused_overflow_leaves_lpage_state_consistent() -> None:
    """In KVM a refused overflow still bumps the lpage-disallow count, so counter and
    lpage count disagree afterwards (page_track.c: __kvm_write_track_add_gfn). pagetrack
    deliberately does not copy that quirk: a refused add touches nothing, and after the
    last remove large pages are allowed again."""
    vm = aligned_vm()
    vm.track_add(np.full(0xFFFF, 0x120))
    with pytest.raises(CounterOverflow):
        vm.track_add([0x120])
    vm.track_remove(np.full(0xFFFF, 0x120))
    assert vm.track_query([0x120])[0] == TrackInfo(0x120, 0)


def test_r1_5_is_tracked_is_boolean_and_false_without_slot() -> None:
    """kvm_gfn_is_write_tracked is counter != 0, and false when there is no slot
    (page_track.c)."""
    vm = make_vm()
    vm.track_add([0x101] * 3)
    assert vm.is_tracked(0x101) is True
    assert vm.track_query([0x101])[0].count == 3
    assert vm.is_tracked(0x102) is False
    assert vm.is_tracked(0x5000) is False
    assert vm.track_query([0x5000])[0] == TrackInfo(0x5000, 0)
    vm.set_memslot(0, 0, 0)
    assert vm.is_tracked(0x101) is False


def test_r1_6_r1_7_tracking_is_always_enabled() -> None:
    """KVM allocates the arrays only when write tracking is enabled (KVMGT built, TDP
    off or a shadow root allocated) and bugs the VM if add is used otherwise
    (page_track.c: kvm_page_track_write_tracking_enabled). pagetrack does not model
    that: tracking is always enabled, on a fresh VM with no shadow root."""
    vm = make_vm()
    assert vm.track_add([0x100]) == 1
    assert vm.write(0, 0x100 << 12, b"x").pieces[0].path is EMUL


# ---------------------------------------------------------------- 2. API


def test_r2_2_add_and_remove_find_the_slot_by_gfn() -> None:
    """The 6.6 API takes a gfn and looks up its slot (page_track.c:
    kvm_write_track_add_gfn, gfn_to_memslot); one call may span slots."""
    vm = make_vm()
    vm.set_memslot(1, 0x2000, 0x10)
    assert vm.track_add([0x100, 0x2003, 0x2003]) == 2
    assert vm.slots.by_id[0].tracking.counters.get1(0) == 1
    assert vm.slots.by_id[1].tracking.counters.get1(3) == 2
    assert vm.tracked_gfns().tolist() == [0x100, 0x2003]
    assert vm.track_remove([0x2003, 0x100]) == 1


def test_r2_3_gfn_without_memslot_refused_and_nothing_changes() -> None:
    """A gfn with no memslot gives -EINVAL and changes nothing (page_track.c:
    kvm_write_track_add_gfn); there is no -EEXIST, adding twice is fine. pagetrack raises
    GfnNotInSlot for the whole call, and records the owner of each reference (KVM keeps
    one anonymous count)."""
    vm = make_vm()
    with pytest.raises(GfnNotInSlot, match="0x200"):
        vm.track_add([0x101, 0x200])
    assert isinstance(GfnNotInSlot("x"), FailedPrecondition)
    assert not vm.is_tracked(0x101)
    with pytest.raises(GfnNotInSlot):
        vm.track_remove([0x200])
    vm.track_add([0x101])
    vm.track_add([0x101], "lease:7")
    assert vm.track_query([0x101])[0].owners == {"tenant": 1, "lease:7": 1}


def test_r2_4_refcounted_n_adds_need_n_removes() -> None:
    """N adds need N removes before the gfn is untracked; a remove at 0 only WARNs in
    KVM and returns 0 (page_track.c). pagetrack refuses it with NotTracked."""
    vm = make_vm()
    vm.track_add([0x105, 0x105])
    vm.track_add([0x105])
    assert vm.track_remove([0x105]) == 0
    assert vm.track_remove([0x105]) == 0
    assert vm.is_tracked(0x105)
    assert vm.track_remove([0x105]) == 1
    assert not vm.is_tracked(0x105)
    with pytest.raises(NotTracked, match="holds 0"):
        vm.track_remove([0x105])


# ---------------------------------------------------------------- 3. MMU effects


def test_r3_1_first_add_write_protects_and_disallows_lpages() -> None:
    """add: counter += 1, lpage disallow at 2M and 1G, SPTEs made read-only (page_track.c:
    __kvm_write_track_add_gfn; mmu.c: kvm_mmu_gfn_disallow_lpage,
    kvm_mmu_slot_gfn_write_protect). Visible here through track_query."""
    vm = Vm("lp")
    vm.set_memslot(0, 0, 1 << 19)  # 2 GiB: two 1 GiB regions
    gfn = (1 << 18) + 0x201
    before = vm.track_query([gfn])[0]
    assert not (before.write_protected or before.lpage_disallowed_2m or before.lpage_disallowed_1g)
    vm.track_add([gfn])
    same, same_2m, same_1g, other_1g = vm.track_query(
        [gfn, gfn + 1, (1 << 18) + 0x10000, 0x201]
    )
    assert same.write_protected and same.lpage_disallowed_2m and same.lpage_disallowed_1g
    assert not same_2m.write_protected
    assert same_2m.lpage_disallowed_2m and same_2m.lpage_disallowed_1g
    assert not same_1g.lpage_disallowed_2m and same_1g.lpage_disallowed_1g
    assert not other_1g.lpage_disallowed_2m and not other_1g.lpage_disallowed_1g


def test_r3_2_last_remove_allows_lpages_again() -> None:
    """remove: counter -= 1 and lpage disallow -= 1 (page_track.c:
    __kvm_write_track_remove_gfn). KVM leaves SPTEs read-only until the next fault;
    pagetrack reports write_protected as "counter > 0", i.e. as the next fault sees it."""
    vm = aligned_vm()
    vm.track_add([0x101, 0x102])
    vm.track_remove([0x101])
    info = vm.track_query([0x101])[0]
    assert not info.write_protected and info.lpage_disallowed_2m  # 0x102 still tracked
    vm.track_remove([0x102])
    assert vm.track_query([0x101, 0x102]) == [TrackInfo(0x101, 0), TrackInfo(0x102, 0)]


def test_r3_3_tracked_gfn_is_never_written_natively() -> None:
    """While the counter is > 0 no writable SPTE is installed, so every write traps
    (mmu.c: mmu_try_to_unsync_pages returns -EPERM for a tracked gfn)."""
    vm = make_vm()
    vm.track_add([0x101])
    paths = [vm.write(0, (0x101 << 12) + 8 * i, b"12345678").pieces[0].path for i in range(5)]
    assert paths == [EMUL] * 5
    assert vm.write(0, 0x102 << 12, b"x").pieces[0].path is FAST


def test_r3_4_internal_and_external_users_share_one_counter() -> None:
    """The shadow MMU and KVMGT share one counter; one removing leaves the gfn tracked
    (page_track.c, mmu.c: account_shadowed). pagetrack also says who holds what."""
    vm = make_vm()
    vm.track_add([0x110], "plugin:shadow-mmu")
    vm.track_add([0x110])
    assert count(vm, 0x110) == 2
    vm.track_remove([0x110])
    info = vm.track_query([0x110])[0]
    assert info.tracked and info.owners == {"plugin:shadow-mmu": 1}


def test_r3_5_slot_edges_disallow_huge_pages_from_creation_tracked_or_not() -> None:
    """R3.5: when a slot is created, the first 2M/1G region gets disallow_lpage = 1 if
    base_gfn is not aligned to it, the last if base_gfn + npages is not; independent of
    tracking, so removing the last reference there does not re-allow huge pages
    (arch/x86/kvm/x86.c kvm_alloc_memslot_metadata)."""
    vm = Vm("edges")
    vm.set_memslot(0, 0x100, 0x100)  # half of 2M region 0
    vm.set_memslot(1, 0x200, 0x400)  # 2M regions 1 and 2 whole; 1G region 0 in part
    vm.set_memslot(2, 0x600, 0x100)  # starts aligned, ends inside 2M region 3
    vm.set_memslot(3, 1 << 18, 1 << 18)  # exactly 1G region 1
    def flags(gfn: int) -> tuple[int, bool, bool]:
        i = vm.track_query([gfn])[0]
        return i.count, i.lpage_disallowed_2m, i.lpage_disallowed_1g
    assert flags(0x100) == flags(0x1FF) == (0, True, True)
    assert flags(0x200) == flags(0x5FF) == (0, False, True)
    assert flags(0x600) == flags(0x6FF) == (0, True, True)
    assert flags((1 << 18) + 5) == flags((2 << 18) - 1) == (0, False, False)
    vm.track_add([0x150, 0x300])
    assert flags(0x150) == (1, True, True) and flags(0x3FF) == (0, True, True)
    vm.track_remove([0x150, 0x300])
    assert flags(0x150) == (0, True, True)  # the edge stays disallowed
    assert flags(0x300) == (0, False, True)  # a whole region is allowed again


# ---------------------------------------------------------------- 4. write path


def test_r4_1_only_a_write_fault_on_a_tracked_gfn_is_emulated() -> None:
    """R4.1: a fault goes to emulation iff it is a write to a tracked gfn; a read fault
    on a tracked gfn maps the page read-only and the guest reads natively, and host
    reads never trap (arch/x86/kvm/mmu/mmu.c page_fault_handle_page_track). Checked
    through the shadow MMU's fault path."""
    vm = Vm("r41", vcpus=2)
    vm.set_memslot(0, 0x1000, 4096)
    guest = GuestOs(vm, 0x1000, 4096)
    mm = AddressSpace(guest)
    data = guest.get_frame()
    assert data is not None
    gva = 0x5555_5540_0000
    mm.map(gva, data)
    vm.write(0, (data << 12) + 8, b"hello")
    vm.track_add([data])
    mmu = ShadowMmu()
    mmu.attach(vm, root=mm.cr3)
    read = mmu.fault(gva + 8)
    assert read["present"] and not read["emulated"] and not read["writable"]
    assert not mmu.translate(gva + 8)["faulted"]  # the read-only SPTE serves reads
    for _ in range(2):
        write = mmu.fault(gva + 8, write=True)
        assert write["present"] and write["emulated"] and not write["writable"]
    vm.register_notifier(Rec("r"))
    seq, pieces = vm.seq, list(vm.stats.pieces)
    assert vm.read((data << 12) + 8, 5) == b"hello"  # a host read: no trap, no event
    assert (vm.seq, vm.stats.pieces) == (seq, pieces)


def test_r4_2_first_write_to_a_tracked_gfn_is_emulated_too() -> None:
    """A not-present write fault on a tracked gfn installs a read-only SPTE and
    emulates too: no write lands natively (mmu.c)."""
    vm = make_vm()
    vm.track_add([0x130])
    result = vm.write(2, (0x130 << 12) + 0xFF8, b"\x01" * 8)
    assert result.pieces[0].path is EMUL and result.pieces[0].seq == 1
    assert vm.stats.emulations == 1 and vm.stats.fast_writes == 0


def test_r4_3_crossing_write_is_split_into_page_pieces() -> None:
    """R4.3: the emulator splits an access that crosses a page into one-page accesses,
    so each notification covers one page; once the write traps, every piece that
    reaches RAM is notified, tracked or not (arch/x86/kvm/x86.c emulator_read_write,
    emulator_read_write_onepage)."""
    vm = make_vm()
    vm.track_add([0x101, 0x103])
    rec = Rec("r")
    vm.register_notifier(rec)
    data = bytes(range(256)) * 33  # 8448 bytes from 0x101ff0: pages 0x101..0x104
    result = vm.write(1, 0x101FF0, data)
    assert [(p.gpa, p.length, p.path, p.seq) for p in result.pieces] == [
        (0x101FF0, 0x10, EMUL, 1),
        (0x102000, 0x1000, EMUL, 2),
        (0x103000, 0x1000, EMUL, 3),
        (0x104000, 8448 - 0x2010, EMUL, 4),
    ]
    assert [(e.gpa, e.length, e.untracked) for e in rec.events] == [
        (0x101FF0, 0x10, False), (0x102000, 0x1000, True),
        (0x103000, 0x1000, False), (0x104000, 8448 - 0x2010, True),
    ]
    assert all((e.gpa >> 12) == ((e.gpa + e.length - 1) >> 12) for e in rec.events)
    assert vm.read(0x101FF0, len(data)) == data
    # A write that touches no tracked page and only RAM never traps: natively, no event.
    assert [p.path for p in vm.write(0, 0x104FFC, b"12345678").pieces] == [FAST, FAST]
    assert len(rec.events) == 4


@pytest.mark.parametrize("batched", [False, True])
def test_r4_3_r4_6_write_crossing_into_an_untracked_page_notifies_every_piece(
    batched: bool,
) -> None:
    """R4.3/R4.6: a write crossing from a tracked page into an untracked one faults on
    the tracked page and is emulated whole; after writing each piece the emulator calls
    kvm_page_track_write, tracked or not (arch/x86/kvm/x86.c emulator_write_phys). Two
    EMULATED pieces, two events in order, the second flagged untracked. A piece with
    no memslot or on a read-only slot is an MMIO exit, and a write that only crosses
    from untracked RAM into MMIO is emulated too (the MMIO page faults)."""
    vm = make_vm()
    vm.set_memslot(1, 0x140, 0x10, SlotFlags.READONLY)
    vm.track_add([0x101, 0x13F])
    rec, brec = Rec("r"), BatchRec("b")
    vm.register_notifier(rec)
    vm.register_notifier(brec)
    writes = [
        (0x101FFC, b"ABCDEFGH"),  # tracked 0x101 -> untracked 0x102
        (0x13FFFC, b"12345678"),  # tracked 0x13f -> read-only slot 0x140
        (0x14FFFC, b"abcdefgh"),  # read-only 0x14f -> no slot 0x150
        (0x120FFE, b"wxyz"),  # untracked 0x120 -> untracked 0x121: native
        (0x0FFFFC, b"mmio+ram"),  # no slot 0x0ff -> untracked RAM 0x100
    ]
    if batched:
        res = vm.write_batch(
            [g for g, _ in writes], [0] * len(writes), [len(d) for _, d in writes],
            b"".join(d for _, d in writes),
        )
        pieces = list(zip(res.gpa.tolist(), res.path.tolist(), res.seq.tolist(), strict=True))
    else:
        pieces = [
            (p.gpa, int(p.path), p.seq or 0) for g, d in writes for p in vm.write(0, g, d).pieces
        ]
    assert pieces == [
        (0x101FFC, EMUL, 1), (0x102000, EMUL, 2),
        (0x13FFFC, EMUL, 3), (0x140000, MMIO, 0),
        (0x14FFFC, MMIO, 0), (0x150000, MMIO, 0),
        (0x120FFE, FAST, 0), (0x121000, FAST, 0),
        (0x0FFFFC, MMIO, 0), (0x100000, EMUL, 4),
    ]
    want = [
        (1, 0x101FFC, b"ABCD", False), (2, 0x102000, b"EFGH", True),
        (3, 0x13FFFC, b"1234", False), (4, 0x100000, b"+ram", True),
    ]
    for events in (rec.events, brec.events + [e for b in brec.batches for e in b]):
        assert [(e.seq, e.gpa, e.data, e.untracked) for e in events] == want
    assert vm.read(0x101FFC, 8) == b"ABCDEFGH" and vm.read(0x100000, 4) == b"+ram"
    assert vm.stats.emulations == 4 and vm.stats.mmio_exits == 4


def test_r4_4_write_lands_before_notification() -> None:
    """The write is committed to guest memory first, then kvm_page_track_write runs,
    so handlers see the new value in memory (x86.c: emulator_write_phys). Same for
    batched writes and DMA with the notify policy."""
    vm = make_vm()
    vm.track_add([0x101, 0x102])
    seen: list[bytes] = []
    vm.register_notifier(
        Rec("reader", on_write=lambda vm, e: seen.append(vm.read(e.gpa, e.length)))
    )
    vm.write(0, 0x101008, b"new bytes")
    vm.write_batch([0x102000, 0x101000], [0, 1], [3, 3], b"abcdef")
    vm.set_policy(dma_policy=DmaPolicy.NOTIFY)
    vm.dma_write(0x102800, b"dma!")
    assert seen == [b"new bytes", b"abc", b"def", b"dma!"]


def test_r4_5_emulated_cmpxchg_notifies_only_when_it_exchanges() -> None:
    """x86.c emulator_cmpxchg_emulated: on a tracked page a LOCK CMPXCHG exits and is
    emulated; if the compare fails it returns X86EMUL_CMPXCHG_FAILED with no
    kvm_page_track_write, if it succeeds the notification carries the new bytes. The page
    is marked dirty either way (kvm_vcpu_mark_page_dirty before the check)."""
    vm = Vm("cx")
    vm.set_memslot(0, 0x100, 0x40, SlotFlags.LOG_DIRTY_PAGES)
    vm.track_add([0x101])
    rec = Rec("rec")
    vm.register_notifier(rec)
    old = (7).to_bytes(8, "little")
    new = (9).to_bytes(8, "little")
    vm.write(0, 0x101010, old)  # seq 1
    vm.get_dirty_log(0)
    failed = vm.cmpxchg(1, 0x101010, new, (11).to_bytes(8, "little"))
    assert (failed.exchanged, failed.current, failed.as_write) == (False, old, False)
    assert failed.write.pieces == (WritePiece(0x101010, 8, WritePath.EMULATED, None),)
    assert [e.seq for e in rec.events] == [1] and vm.read(0x101010, 8) == old
    assert vm.get_dirty_log(0)[0] == 0b10  # dirty although nothing changed
    done = vm.cmpxchg(1, 0x101010, old, new)
    assert (done.exchanged, done.current) == (True, old)
    assert done.write.pieces == (WritePiece(0x101010, 8, WritePath.EMULATED, 2),)
    assert (rec.events[-1].seq, rec.events[-1].data, rec.events[-1].vcpu) == (2, new, 1)
    assert vm.read(0x101010, 8) == new and vm.get_dirty_log(0)[0] == 0b10
    assert vm.stats.pieces[WritePath.EMULATED] == 3


def test_r4_5_cmpxchg_on_an_untracked_page_runs_natively() -> None:
    """Without write protection the instruction never exits: no emulation, no event,
    exchanged or not (x86.c is reached only through a write-protection fault)."""
    vm = make_vm()
    rec = Rec("rec")
    vm.register_notifier(rec)
    res = vm.cmpxchg(0, 0x102000, bytes(4), b"\x01\x02\x03\x04")
    assert res.exchanged and res.write.pieces[0].path is WritePath.FAST
    res = vm.cmpxchg(0, 0x102000, bytes(4), b"\xff" * 4)
    assert not res.exchanged and res.current == b"\x01\x02\x03\x04"
    assert rec.events == [] and vm.seq == 0


def test_r4_5_cmpxchg_that_cannot_be_atomic_is_emulated_as_a_write() -> None:
    """x86.c emulator_cmpxchg_emulated: a size that is not 1, 2, 4 or 8, an access that
    crosses a page, or a target that is not RAM goes to emul_write ("emulating exchange
    as write"): the new bytes are written whatever memory held, compare ignored."""
    vm = make_vm()
    vm.track_add([0x101, 0x102])
    rec = Rec("rec")
    vm.register_notifier(rec)
    vm.write(0, 0x101000, b"\x05" * 16)
    res = vm.cmpxchg(0, 0x101000, bytes(16), b"\x06" * 16)  # 16 bytes: CMPXCHG16B
    assert (res.exchanged, res.as_write, res.current) == (True, True, b"")
    assert vm.read(0x101000, 16) == b"\x06" * 16
    res = vm.cmpxchg(0, 0x101ffc, bytes(8), b"\x07" * 8)  # crosses into 0x102
    assert res.as_write and [p.path for p in res.write.pieces] == [WritePath.EMULATED] * 2
    res = vm.cmpxchg(0, 0x900000, bytes(8), b"\x08" * 8)  # no memslot: MMIO
    assert res.as_write and res.write.pieces[0].path is WritePath.MMIO_EXIT
    assert [e.seq for e in rec.events] == [1, 2, 3, 4]
    with pytest.raises(InvalidArgument):
        vm.cmpxchg(0, 0x101000, bytes(4), bytes(8))


def test_r4_6_notification_is_not_filtered_by_tracked_state() -> None:
    """R4.6: kvm_page_track_write calls every notifier for every emulated write, whether
    or not the written gfn is tracked, and whoever tracks it; each notifier must decide
    whether it cares (arch/x86/kvm/mmu/page_track.c __kvm_page_track_write: "the node
    should figure out ... by itself"). Here a notifier that tracks nothing hears the
    untracked half of a crossing write and a write to a gfn only a lease tracks."""
    vm = make_vm()
    a, b = Rec("a"), Rec("b")
    vm.register_notifier(a)
    vm.register_notifier(b)
    vm.track_add([0x101], "lease:a")
    vm.write(0, 0x101000, b"1")
    vm.write(0, 0x101FFF, b"23")  # the second byte lands on untracked 0x102
    want = [(1, 0x101000, False), (2, 0x101FFF, False), (3, 0x102000, True)]
    assert [(e.seq, e.gpa, e.untracked) for e in a.events] == want
    assert [(e.seq, e.gpa, e.untracked) for e in b.events] == want
    assert not vm.is_tracked(0x102) and vm.stats.notifications == 6


def test_r4_7_dma_bypass_never_notifies() -> None:
    """Host, userspace and device (DMA) writes never notify, nor do native writes to
    untracked pages or writes a notifier makes (x86.c; page_track.c). The default DMA
    policy, bypass, is that."""
    vm = make_vm()
    vm.track_add([0x101])
    rec = Rec("r", on_write=lambda vm, e: vm.dma_write(e.gpa + 8, b"from the notifier"))
    vm.register_notifier(rec)
    assert vm.dma_policy is DmaPolicy.BYPASS
    result = vm.dma_write(0x101000, b"device data")
    assert [p.path for p in result.pieces] == [FAST] and vm.seq == 0
    assert rec.events == [] and vm.read(0x101000, 11) == b"device data"
    vm.write(0, 0x102000, b"native")
    assert rec.events == []
    vm.write(0, 0x101100, b"guest")  # notified once; the notifier's DMA is not
    assert [e.seq for e in rec.events] == [1]
    assert vm.read(0x101108, 17) == b"from the notifier"
    assert vm.stats.dma_writes == 2 and vm.stats.dma_notified == 0


def test_r4_8_newest_notifier_called_first() -> None:
    """Registration inserts at the list head and dispatch walks from the head, so the
    most recently registered notifier runs first (page_track.c:
    kvm_page_track_register_notifier, hlist_add_head_rcu); also for remove_region."""
    vm = make_vm()
    calls: list[tuple[Any, ...]] = []
    for name in ("first", "second", "third"):
        vm.register_notifier(Rec(name, calls))
    vm.track_add([0x100])
    vm.write(0, 0x100000, b"x")
    vm.set_memslot(0, 0, 0)
    assert calls == [
        ("write", "third", 1),
        ("write", "second", 1),
        ("write", "first", 1),
        ("region", "third", 0x100, 0x40),
        ("region", "second", 0x100, 0x40),
        ("region", "first", 0x100, 0x40),
    ]


def test_r4_9_event_carries_gpa_new_bytes_and_length() -> None:
    """track_write gets (gpa, new, bytes), and before 6.6 the vcpu (page_track.h).
    pagetrack's event has all of them plus a per-VM seq and the source."""
    vm = make_vm()
    vm.track_add([0x120])
    rec = Rec("r")
    vm.register_notifier(rec)
    vm.write(5, 0x120ABC, b"\xde\xad\xbe\xef")
    assert rec.events == [WriteEvent(1, 5, 0x120ABC, b"\xde\xad\xbe\xef", Source.GUEST)]
    e = rec.events[0]
    assert (e.gfn, e.length) == (0x120, 4)


# ---------------------------------------------------------------- 5. notifier lifetime


def test_r5_1_register_inserts_at_head_and_returns_a_node() -> None:
    """register inserts at the list head (page_track.c: kvm_page_track_register_notifier);
    pagetrack returns a node whose id names the registration."""
    vm = make_vm()
    n1 = vm.register_notifier(Rec("a"))
    n2 = vm.register_notifier(Rec("b"))
    assert vm.notifiers.nodes() == (n2, n1)
    assert n1.node_id != n2.node_id


def test_r5_2_unregister_during_dispatch_never_called_again() -> None:
    """After unregister returns, the node is never called again (page_track.c:
    kvm_page_track_unregister_notifier, synchronize_srcu), even by the dispatch that
    is running when it is unregistered."""
    vm = make_vm()
    vm.track_add([0x101])
    victim = Rec("victim")
    victim_node = vm.register_notifier(victim)  # older: called after the killer
    killer = Rec("killer", on_write=lambda vm, e: vm.unregister_notifier(victim_node))
    vm.register_notifier(killer)
    vm.write(0, 0x101000, b"a")
    vm.write(0, 0x101000, b"b")
    vm.write_batch([0x101000], [0], [1], b"c")
    assert victim.events == []
    assert [e.seq for e in killer.events] == [1, 2, 3]
    assert vm.unregister_notifier(victim_node) is False


def test_r5_2_unregister_self_during_dispatch() -> None:
    """A notifier that unregisters itself in its callback is not called again."""
    vm = make_vm()
    vm.track_add([0x101])
    nodes: list[Any] = []
    rec = Rec("once", on_write=lambda vm, e: vm.unregister_notifier(nodes[0]))
    nodes.append(vm.register_notifier(rec))
    other = Rec("other")
    vm.register_notifier(other)
    for _ in range(3):
        vm.write(0, 0x101000, b"z")
    assert [e.seq for e in rec.events] == [1]
    assert [e.seq for e in other.events] == [1, 2, 3]


def test_r5_3_register_during_dispatch_is_never_called_twice() -> None:
    """A notifier registered during a dispatch may or may not see it (page_track.c:
    hlist under SRCU); here it first hears the next event. Regression: with one
    notifier registered, registering another from its callback used to call the first
    one twice for the same event."""
    vm = make_vm()
    vm.track_add([0x101])
    late = Rec("late")
    first = Rec("first", on_write=lambda vm, e: vm.register_notifier(late) if e.seq == 1 else None)
    vm.register_notifier(first)
    vm.write(0, 0x101000, b"1")
    vm.write(0, 0x101000, b"2")
    assert [e.seq for e in first.events] == [1, 2]
    assert [e.seq for e in late.events] == [2]


def test_r5_3_no_notifiers_still_numbers_emulated_writes() -> None:
    """With an empty list KVM's dispatch returns at once (page_track.c); pagetrack still
    gives each emulated write a seq so streams that join later can resume."""
    vm = make_vm()
    vm.track_add([0x101])
    assert vm.write(0, 0x101000, b"1").pieces[0].seq == 1
    assert vm.stats.notifications == 0 and vm.seq == 1


def test_r5_4_hooks_are_track_write_and_track_remove_region() -> None:
    """Since 6.6 a notifier has track_write(gpa, new, bytes) and
    track_remove_region(gfn, nr_pages) (arch/x86/include/asm/kvm_page_track.h); the
    2016 track_flush_slot is modelled by the same remove_region hook."""
    for semantics in (V2016, V66):
        vm = make_vm(semantics)
        rec = Rec("r")
        vm.register_notifier(rec)
        vm.track_add([0x101])
        vm.write(0, 0x101004, b"ab")
        vm.set_memslot(0, 0, 0)
        assert [(e.gpa, e.data) for e in rec.events] == [(0x101004, b"ab")]
        assert rec.regions == [(0x100, 0x40)]


@pytest.mark.parametrize("change", ["delete", "move"])
def test_r5_5_2016_flush_slot_runs_while_the_slot_still_exists(change: str) -> None:
    """track_flush_slot ran from kvm_arch_flush_shadow_memslot for DELETE and MOVE,
    before the memslot update was committed (SERIES 18/29 changelog): the notifier
    still sees the slot, and may remove its tracking there as KVMGT did."""
    vm = make_vm(V2016)
    vm.track_add([0x101, 0x102], "plugin:kvmgt")
    seen: list[Any] = []

    def on_region(vm: Vm, base: int, npages: int) -> None:
        seen.append([m.base_gfn for m in vm.memslots()])
        vm.track_remove([0x101, 0x102], "plugin:kvmgt")

    vm.register_notifier(Rec("kvmgt", on_region=on_region))
    if change == "delete":
        assert vm.set_memslot(0, 0, 0) is SlotChange.DELETE
    else:
        assert vm.set_memslot(0, 0x800, 0x40) is SlotChange.MOVE
        assert vm.tracked_gfns().tolist() == []
    assert seen == [[0x100]]


def test_r5_6_linux_6_6_remove_region_after_the_slot_is_gone_and_only_on_delete() -> None:
    """track_remove_region is called only for DELETE, from
    kvm_arch_commit_memory_region once the deletion is certain, with (base, npages)
    (x86.c; page_track.c: kvm_page_track_delete_slot). A gfn of the gone slot can no
    longer be untracked. pagetrack also tells non-external (in-kernel, shadow-MMU-like)
    notifiers of a MOVE, because KVM zaps the moved slot's shadow pages."""
    vm = make_vm(V66)
    seen: list[Any] = []
    errors: list[type[Exception]] = []

    def on_region(vm: Vm, base: int, npages: int) -> None:
        seen.append((base, npages, [m.base_gfn for m in vm.memslots()]))
        try:
            vm.track_remove([base])
        except Exception as e:
            errors.append(type(e))

    ext = Rec("kvmgt", on_region=on_region)
    vm.register_notifier(ext)
    vm.set_memslot(1, 0x2000, 0x10)  # CREATE
    vm.set_memslot(1, 0x2000, 0x10, SlotFlags.LOG_DIRTY_PAGES)  # FLAGS_ONLY
    assert seen == []
    vm.track_add([0x100])
    vm.set_memslot(0, 0, 0)
    assert seen == [(0x100, 0x40, [0x2000])]
    assert errors == [GfnNotInSlot]
    # MOVE: only in-kernel notifiers hear it (an external one would refuse it, R6.3).
    vm.unregister_notifier(vm.notifiers.nodes()[0])
    mmu = Rec("mmu", external=False)
    vm.register_notifier(mmu)
    assert vm.set_memslot(1, 0x3000, 0x10, SlotFlags.LOG_DIRTY_PAGES) is SlotChange.MOVE
    assert mmu.regions == [(0x2000, 0x10)]


# ---------------------------------------------------------------- 6. memslots vs counters


def test_r6_1_create_starts_zeroed_and_calls_no_notifier() -> None:
    """CREATE allocates a zeroed counter array and calls no notifier (x86.c:
    kvm_arch_prepare_memory_region; page_track.c: kvm_page_track_create_memslot)."""
    vm = make_vm()
    rec = Rec("r")
    vm.register_notifier(rec)
    assert vm.set_memslot(1, 0x500, 0x10) is SlotChange.CREATE
    assert not any(i.count for i in vm.track_query(range(0x500, 0x510)))
    assert rec.calls == []


def test_r6_2_flags_only_keeps_counters() -> None:
    """FLAGS_ONLY shares the arch data, so every count survives (x86.c:
    kvm_arch_prepare_memory_region copies new->arch from old->arch)."""
    vm = make_vm()
    rec = Rec("r")
    vm.register_notifier(rec)
    vm.track_add([0x101, 0x101])
    vm.track_add([0x102], "lease:1")
    before = vm.track_query([0x101, 0x102])
    assert vm.set_memslot(0, 0x100, 0x40, SlotFlags.LOG_DIRTY_PAGES) is SlotChange.FLAGS_ONLY
    assert vm.set_memslot(0, 0x100, 0x40) is SlotChange.FLAGS_ONLY
    assert vm.track_query([0x101, 0x102]) == before
    assert rec.calls == []


def test_r6_3_move_linux_6_6_refused_with_external_notifier() -> None:
    """6.6+: a MOVE fails with -EINVAL while an external page-track user is registered
    (x86.c: kvm_arch_prepare_memory_region, kvm_page_track_has_external_user).
    pagetrack raises MoveRefused and changes nothing."""
    vm = make_vm(V66)
    vm.track_add([0x101])
    vm.write(0, 0x101000, b"data")
    rec = Rec("kvmgt", external=True)
    vm.register_notifier(rec)
    with pytest.raises(MoveRefused, match="external notifier"):
        vm.set_memslot(0, 0x800, 0x40)
    assert [m.base_gfn for m in vm.memslots()] == [0x100]
    assert vm.is_tracked(0x101) and vm.read(0x101000, 4) == b"data"
    assert rec.calls == []


def test_r6_3_move_linux_6_6_zeroes_counters_without() -> None:
    """6.6+ without external users: the moved slot gets a fresh zeroed array, so every
    count is lost; KVM zaps the slot's shadow pages (x86.c; Sean: "losing the
    write-tracking counts is benign"). Guest memory moves with the slot."""
    vm = make_vm(V66)
    vm.track_add([0x101, 0x101])
    vm.track_add([0x102], "lease:1")
    vm.write(0, 0x101000, b"data")
    mmu = Rec("mmu", external=False)
    vm.register_notifier(mmu)
    assert vm.set_memslot(0, 0x800, 0x40) is SlotChange.MOVE
    assert vm.tracked_count == 0 and vm.tracked_gfns("lease:1").tolist() == []
    assert untracked(vm.track_query([0x801])[0])
    assert vm.read(0x801000, 4) == b"data"
    assert mmu.regions == [(0x100, 0x40)]
    assert vm.write(0, 0x801000, b"x").pieces[0].path is FAST


def test_r6_3_move_2016_keeps_counters_and_notifies() -> None:
    """2016 (the seed series, v2 fix): a MOVE keeps the slot's counters, which follow
    the slot to its new base, and notifiers hear that the old range is gone
    (track_flush_slot from kvm_arch_flush_shadow_memslot). KVMGT removed its own
    tracking of the range in flush_slot (arch/x86/kvm/page_track.c, v4.6), so plugin
    references are dropped; the tenant's and leases' move with the slot."""
    vm = make_vm(V2016)
    vm.track_add([0x101, 0x101])
    vm.track_add([0x13F], "lease:1")
    vm.track_add([0x101, 0x120], "plugin:vgpu")
    rec = Rec("kvmgt", external=True)
    vm.register_notifier(rec)
    # The new range 0x1f0..0x22f straddles two 2 MiB regions (gfn >> 9 = 0 and 1).
    assert vm.set_memslot(0, 0x1F0, 0x40) is SlotChange.MOVE
    assert rec.regions == [(0x100, 0x40)]
    moved, last, old = vm.track_query([0x1F1, 0x22F, 0x101])
    assert (moved.count, moved.owners) == (2, {"tenant": 2})
    assert last.owners == {"lease:1": 1}
    assert untracked(old)
    assert not vm.is_tracked(0x1F0 + 0x20)  # was held only by the plugin
    assert vm.write(0, 0x1F1000, b"x").pieces[0].path is EMUL
    # Large-page regions are recomputed for the new base.
    # Large-page regions are recomputed for the new base: the tracking counts per
    # region (both regions are also slot edges now, R3.5, so track_query says True).
    regions = vm.slots.by_id[0].tracking
    assert regions.lpage_2m == {0: 1, 1: 1}
    vm.release_owner("lease:1")
    assert regions.lpage_2m == {0: 1}
    assert [i.lpage_disallowed_2m for i in vm.track_query([0x1F0, 0x200])] == [True, True]


@pytest.mark.parametrize("semantics", [V2016, V66])
def test_r6_4_delete_notifies_then_frees(semantics: Semantics) -> None:
    """DELETE: track_remove_region(base, npages) goes to every notifier, then the
    counters are freed with the slot (x86.c: kvm_arch_commit_memory_region; page_track.c:
    kvm_page_track_delete_slot). A later remove for such a gfn gets -EINVAL."""
    vm = make_vm(semantics)
    vm.track_add([0x101])
    vm.write(0, 0x101000, b"data")
    counts: list[int] = []
    rec = Rec("r", on_region=lambda vm, b, n: counts.append(vm.tracked_count))
    vm.register_notifier(rec)
    assert vm.set_memslot(0, 0, 0) is SlotChange.DELETE
    assert rec.regions == [(0x100, 0x40)]
    # 2016 tells while the slot (and its counters) still exist; 6.6 after.
    assert counts == ([1] if semantics is V2016 else [0])
    assert vm.tracked_count == 0 and vm.memory_bytes == 0 and vm.counter_bytes == 0
    with pytest.raises(GfnNotInSlot):
        vm.track_remove([0x101])
    with pytest.raises(FailedPrecondition):
        vm.read(0x101000, 4)


def test_r6_5_recreated_slot_starts_at_zero() -> None:
    """Re-creating a slot over the same range starts at zero; old tracking never comes
    back (x86.c). A late remove by the old owner is refused rather than underflowing
    (R9.6)."""
    vm = make_vm()
    vm.track_add([0x101], "lease:1")
    vm.write(0, 0x101000, b"data")
    vm.set_memslot(0, 0, 0)
    vm.set_memslot(0, 0x100, 0x40)
    assert untracked(vm.track_query([0x101])[0])
    assert vm.read(0x101000, 4) == bytes(4)
    with pytest.raises(NotTracked):
        vm.track_remove([0x101], "lease:1")


def test_r6_6_has_external_user_is_not_inverted() -> None:
    """The merged kvm_page_track_has_external_user is !hlist_empty (an early SERIES
    revision had it inverted): MOVE is refused exactly when an external notifier is
    registered (page_track.h)."""
    vm = make_vm(V66)
    assert vm.set_memslot(0, 0x200, 0x40) is SlotChange.MOVE
    vm.register_notifier(Rec("mmu", external=False))
    assert vm.set_memslot(0, 0x300, 0x40) is SlotChange.MOVE
    node = vm.register_notifier(Rec("kvmgt", external=True))
    with pytest.raises(MoveRefused):
        vm.set_memslot(0, 0x400, 0x40)
    vm.unregister_notifier(node)
    assert vm.set_memslot(0, 0x400, 0x40) is SlotChange.MOVE


# ---------------------------------------------------------------- 9. pitfalls


def test_r9_6_owners_cannot_drop_each_others_references() -> None:
    """KVM keeps a bare count, so a user removing twice drops another user's reference
    (R9.6). pagetrack deliberately differs: a reference can only be dropped by its owner,
    and release_owner (a lease ending) drops only that owner's references."""
    vm = make_vm()
    vm.track_add([0x101], "lease:1")
    vm.track_add([0x101, 0x102], "plugin:vgpu")
    with pytest.raises(NotTracked, match="'lease:1' holds 0"):
        vm.track_remove([0x102], "lease:1")
    with pytest.raises(NotTracked):
        vm.track_remove([0x101])  # the tenant holds none
    assert vm.release_owner("lease:1") == 0
    assert vm.track_query([0x101])[0].owners == {"plugin:vgpu": 1}
    assert vm.release_owner("plugin:vgpu") == 2
    assert vm.tracked_count == 0
    with pytest.raises(InvalidArgument):
        vm.release_owner("tenant")
    with pytest.raises(InvalidArgument, match="owner"):
        vm.track_add([0x101], "Not An Owner")


# ---------------------------------------------------------------- memslot checks


def test_unknown_slot_flags_are_refused() -> None:
    """KVM refuses unknown memslot flags with -EINVAL (virt/kvm/kvm_main.c:
    check_memory_region_flags). Regression: flag bit 4 used to be accepted, because ~
    on an IntFlag only spans the known bits."""
    vm = make_vm()
    with pytest.raises(InvalidArgument, match="flags"):
        vm.set_memslot(1, 0x1000, 1, SlotFlags(4))
    with pytest.raises(InvalidArgument, match="flags"):
        vm.set_memslot(0, 0x100, 0x40, SlotFlags(5))
    assert [m.flags for m in vm.memslots()] == [SlotFlags.NONE]


def test_memslot_changes_that_are_refused() -> None:
    """Overlaps, size changes, READONLY toggles, bad ids and ranges past the gfn limit
    are refused with a message naming the problem, and change nothing
    (virt/kvm/kvm_main.c: __kvm_set_memory_region)."""
    vm = make_vm()
    with pytest.raises(InvalidArgument, match="cannot change size"):
        vm.set_memslot(0, 0x100, 0x41)
    with pytest.raises(InvalidArgument, match="READONLY"):
        vm.set_memslot(0, 0x100, 0x40, SlotFlags.READONLY)
    with pytest.raises(InvalidArgument, match="slot id"):
        vm.set_memslot(509, 0, 1)
    with pytest.raises(InvalidArgument, match="gfn space"):
        vm.set_memslot(1, (1 << 40) - 1, 2)
    with pytest.raises(InvalidArgument, match="npages"):
        vm.set_memslot(1, 0, -1)
    from pagetrackd.domain import SlotOverlap

    with pytest.raises(SlotOverlap, match="overlap slot 0"):
        vm.set_memslot(1, 0x13F, 4)
    with pytest.raises(SlotNotFound):
        vm.set_memslot(3, 0, 0)
    assert vm.set_memslot(0, 0x100, 0x40) is SlotChange.NONE
    assert [(m.slot_id, m.base_gfn, m.npages) for m in vm.memslots()] == [(0, 0x100, 0x40)]


def test_readonly_slot_writes_exit_as_mmio_and_are_not_applied() -> None:
    """A write to a READONLY slot or to no slot exits to user space as MMIO and is not
    applied (virt/kvm/kvm_main.c: KVM_MEM_READONLY; x86.c emulator MMIO path)."""
    vm = make_vm()
    vm.set_memslot(1, 0x200, 4, SlotFlags.READONLY)
    result = vm.write(0, 0x200FFE, b"abcd")
    assert [p.path for p in result.pieces] == [MMIO, MMIO] and not result.applied
    assert vm.read(0x200FFE, 4) == bytes(4)
    assert vm.write(0, 0x9000000, b"x").pieces[0].path is MMIO
    assert vm.stats.mmio_exits == 3 and vm.stats.bytes_written == 0


# ---------------------------------------------------------------- DMA policies


def test_dma_notify_policy_delivers_source_dma_events() -> None:
    """dma_policy=notify: a DMA write into a tracked gfn is applied, then notified with
    source DMA and no vCPU (DESIGN §1; KVM itself never notifies, R4.7)."""
    vm = make_vm(dma_policy=DmaPolicy.NOTIFY)
    vm.track_add([0x102])
    rec = Rec("r")
    vm.register_notifier(rec)
    result = vm.dma_write(0x101FFE, b"wxyz")
    assert [(p.path, p.seq) for p in result.pieces] == [(FAST, None), (EMUL, 1)]
    assert rec.events == [WriteEvent(1, NO_VCPU, 0x102000, b"yz", Source.DMA)]
    assert vm.stats.dma_notified == 1 and vm.stats.dma_writes == 1


def test_dma_reject_policy_refuses_and_writes_nothing() -> None:
    """dma_policy=reject: a DMA that touches a tracked gfn fails whole, as GVT-g's "DMA to
    PPGTT is not supported" (drivers/gpu/drm/i915/gvt); DMA elsewhere is applied."""
    vm = make_vm(dma_policy=DmaPolicy.REJECT)
    vm.track_add([0x102])
    with pytest.raises(DmaRejected, match="0x102"):
        vm.dma_write(0x101FFE, b"wxyz")
    assert vm.read(0x101FFE, 4) == bytes(4)
    assert vm.stats.dma_rejected == 1 and vm.stats.dma_writes == 0
    assert vm.dma_write(0x103000, b"ok").applied
    with pytest.raises(FailedPrecondition, match="not in a writable memslot"):
        vm.dma_write(0x13FFFF, b"ab")  # second byte is past the slot
    assert vm.read(0x13FFFF, 1) == b"\x00"


# ---------------------------------------------------------------- dirty log, memory


def test_dirty_log_get_and_clear_bitmap_layout() -> None:
    """KVM_GET_DIRTY_LOG: bit i of the little-endian bitmap is page i of the slot, padded
    to 64-bit words; reading clears it (virt/kvm/kvm_main.c: kvm_get_dirty_log).
    Fast, emulated and DMA writes dirty a page; MMIO exits do not."""
    vm = Vm("dirty")
    vm.set_memslot(0, 0x1000, 130, SlotFlags.LOG_DIRTY_PAGES)
    vm.track_add([0x1000 + 64])
    for page in (0, 7, 8, 64):
        vm.write(0, (0x1000 + page) << 12, b"x")
    vm.dma_write((0x1000 + 129) << 12, b"d")
    vm.write(0, (0x1000 + 130) << 12, b"m")  # past the slot: MMIO
    log = vm.get_dirty_log(0)
    assert len(log) == 3 * 8
    expected = bytearray(24)
    expected[0] = 0b1000_0001  # pages 0 and 7
    expected[1] = 0b0000_0001  # page 8
    expected[8] = 0b0000_0001  # page 64
    expected[16] = 0b0000_0010  # page 129
    assert log == bytes(expected)
    assert vm.get_dirty_log(0) == bytes(24)
    vm.set_memslot(1, 0x2000, 1)
    with pytest.raises(FailedPrecondition, match="LOG_DIRTY_PAGES"):
        vm.get_dirty_log(1)
    with pytest.raises(SlotNotFound):
        vm.get_dirty_log(2)


def test_linux_6_6_move_that_enables_dirty_logging_starts_a_dirty_log() -> None:
    """A MOVE that also sets LOG_DIRTY_PAGES gets a dirty bitmap, as KVM allocates one
    (virt/kvm/kvm_main.c: kvm_prepare_memory_region). Regression: under linux-6.6 the
    moved slot had no bitmap and get_dirty_log failed."""
    for semantics in (V2016, V66):
        vm = make_vm(semantics)
        vm.set_memslot(0, 0x800, 0x40, SlotFlags.LOG_DIRTY_PAGES)
        vm.write(0, 0x801000, b"x")
        assert vm.get_dirty_log(0)[0] == 0b10
        vm.write(0, 0x802000, b"x")
        vm.set_memslot(0, 0x900, 0x40, SlotFlags.LOG_DIRTY_PAGES)  # keeps the bitmap
        assert vm.get_dirty_log(0)[0] == 0b100


def test_sparse_memory_grows_with_bytes_written_not_slot_size() -> None:
    """Guest memory is sparse: a 4 GiB slot holds nothing until written, and a few PTEs
    in many pages cost bytes, not pages (DESIGN §1). Unwritten memory reads as zeros."""
    vm = Vm("sparse")
    vm.set_memslot(0, 0, 1 << 20)
    assert vm.memory_bytes == 0
    for i in range(100):
        vm.write(0, i * 1000 * PAGE_SIZE + 64, b"8 bytes!")
    assert vm.memory_bytes == 800
    assert vm.read(5 * 1000 * PAGE_SIZE, 80) == bytes(64) + b"8 bytes!" + bytes(8)
    vm.write(0, 7 * PAGE_SIZE, bytes(PAGE_SIZE))
    assert vm.memory_bytes == 800 + PAGE_SIZE
    assert vm.read((1 << 32) - 16, 16) == bytes(16)


def test_chunked_counters_cost_little_for_a_huge_slot() -> None:
    """KVM allocates 2 bytes per page of every slot up front (page_track.c: __vcalloc):
    2 MiB for a 4 GiB slot. pagetrack allocates counters in chunks on first use: an idle
    4 GiB slot costs almost nothing, and a few tracked gfns a small directory and chunks."""
    vm = Vm("huge")
    vm.set_memslot(0, 0, 1 << 20)
    dense = 2 * (1 << 20)
    assert vm.counter_bytes < 1024
    vm.track_add([5, 1000, 500_000, (1 << 20) - 1], "lease:1")
    assert vm.counter_bytes < dense // 8
    assert vm.tracked_gfns().tolist() == [5, 1000, 500_000, (1 << 20) - 1]


# ---------------------------------------------------------------- notifier errors, cost


def test_notifier_exception_is_counted_and_breaks_nothing(logs: list[Any]) -> None:
    """A notifier that raises does not stop the write or the other notifiers; the error
    is counted per VM and per node and logged with the notifier's name (KVM's callbacks
    are void: errors never reach KVM, drivers/gpu/drm/i915/gvt/kvmgt.c)."""
    vm = make_vm()
    vm.track_add([0x101])
    calls: list[tuple[Any, ...]] = []

    def boom(vm: Vm, *args: Any) -> None:
        raise RuntimeError("boom")

    vm.register_notifier(Rec("before", calls))
    bad = vm.register_notifier(Rec("bad", calls, on_write=boom, on_region=boom))
    vm.register_notifier(Rec("after", calls))
    result = vm.write(0, 0x101000, b"data")
    assert result.pieces[0].path is EMUL and vm.read(0x101000, 4) == b"data"
    assert [c[1] for c in calls] == ["after", "bad", "before"]
    assert vm.stats.notifier_errors == 1 and bad.errors == 1
    assert [(e["event"], e["notifier"], e["hook"]) for e in logs] == [
        ("notifier.failed", "bad", "track_write")
    ]
    vm.write_batch([0x101000, 0x101008], [0, 1], [1, 1], b"ab")
    assert vm.stats.notifier_errors == 3
    # Regression: errors in track_remove_region used to be missing from the VM's stats.
    vm.set_memslot(0, 0, 0)
    assert vm.stats.notifier_errors == 4 and bad.errors == 4
    assert [c[1] for c in calls if c[0] == "region"] == ["after", "bad", "before"]


def test_batch_notifier_gets_one_batch_per_write_batch() -> None:
    """A batch-capable notifier gets the events of a write_batch in one call, after the
    batch; single writes and DMA still reach it one at a time."""
    vm = make_vm(dma_policy=DmaPolicy.NOTIFY)
    vm.track_add([0x101, 0x102])
    b = BatchRec("b")
    vm.register_notifier(b)
    res = vm.write_batch([0x101000, 0x105000, 0x102000], [0, 1, 2], [1, 1, 1], b"abc")
    assert res.first_seq == 1 and res.last_seq == 2
    assert [[(e.seq, e.vcpu, e.data) for e in batch] for batch in b.batches] == [
        [(1, 0, b"a"), (2, 2, b"c")]
    ]
    vm.write(0, 0x101000, b"d")
    vm.dma_write(0x102000, b"e")
    assert [(e.seq, e.source) for e in b.events] == [(3, Source.GUEST), (4, Source.DMA)]
    assert vm.stats.notifications == 4


def test_cost_model_sums_per_path_and_per_vcpu() -> None:
    """Each piece is charged its path's cycles, summed per path and per vCPU; DMA has its
    own sum. The seed's figure: 5000-cycle exits at 100k writes/s take ~15% of a
    3.3 GHz CPU."""
    cost = CostModel(mmio_exit_cycles=5000, emulate_cycles=1500, fast_cycles=10, dma_cycles=3)
    vm = make_vm(cost=cost)
    vm.set_memslot(1, 0x200, 1, SlotFlags.READONLY)
    vm.track_add([0x101])
    vm.write(0, 0x101FFF, b"ab")  # emulated + emulated (the write traps on 0x101, R4.3)
    vm.write(1, 0x200000, b"ro")  # mmio
    vm.write_batch([0x101000, 0x9000000, 0x103000], [1, 2, 2], [1, 1, 1], b"xyz")
    vm.dma_write(0x104000, b"dma")
    s = vm.stats
    assert s.pieces == [2, 1, 3]
    assert s.cycles == [10000, 10, 4500]
    assert s.vcpu_cycles == {0: 3000, 1: 6500, 2: 5010}
    assert s.dma_cycles == 3
    assert cost.cpu_fraction(5000, 100_000) == pytest.approx(0.1515, abs=1e-3)
    with pytest.raises(InvalidArgument, match="emulate_cycles"):
        CostModel(emulate_cycles=-1)
    with pytest.raises(InvalidArgument, match="host_hz"):
        CostModel(host_hz=10.0)


def test_write_argument_errors_change_nothing() -> None:
    """Bad vCPU ids, empty or oversized writes and gpas past the address space are
    refused with InvalidArgument before anything is written or counted."""
    vm = make_vm(vcpus=2)
    vm.track_add([0x101])
    for call in (
        lambda: vm.write(2, 0x101000, b"x"),
        lambda: vm.write(0, 0x101000, b""),
        lambda: vm.write(0, (1 << 52) - 1, b"xy"),
        lambda: vm.write(0, 0x101000, bytes((1 << 20) + 1)),
        lambda: vm.write_batch([0x101000], [5], [1], b"x"),
        lambda: vm.write_batch([0x101000], [0], [2], b"x"),
        lambda: vm.write_batch([0x101000, 0], [0], [1], b"x"),
        lambda: vm.dma_write(-4096, b"x"),
    ):
        with pytest.raises(InvalidArgument):
            call()
    assert vm.stats.writes == 0 and vm.seq == 0 and vm.memory_bytes == 0


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("a" * 64, "64 characters; at most 63"),
        ("Web1", "lowercase letters"),
        ("web 1", "lowercase letters"),
        ("-web", "start and end with a letter or digit"),
        ("web.", "start and end with a letter or digit"),
    ],
)
def test_vm_name_validation_says_which_rule_failed(name: str, message: str) -> None:
    """VM names: 1-63 chars of [a-z0-9._-], starting and ending alphanumeric; the
    error names the rule that failed."""
    reg = Registry()
    with pytest.raises(InvalidArgument, match=message):
        reg.create_vm(TenantId("t"), name)
    assert reg.count_vms(TenantId("t")) == 0


def test_vm_names_accepted_and_unique_per_tenant() -> None:
    """Valid names are accepted; a taken name is AlreadyExists for the same tenant."""
    reg = Registry()
    for name in ("a", "web-1", "db_2.prod", "x" * 63):
        reg.create_vm(TenantId("t"), name)
    with pytest.raises(AlreadyExists):
        reg.create_vm(TenantId("t"), "a")


def test_registry_isolates_tenants() -> None:
    """A tenant never sees another's VMs: get and delete of another tenant's VM raise
    the same VmNotFound as an unknown name, and listings are per tenant."""
    reg = Registry()
    a, b = TenantId("alice"), TenantId("bob")
    vm = reg.create_vm(a, "shared-name", semantics=V66)
    other = reg.create_vm(b, "shared-name")
    assert vm is not other and vm.semantics is V66
    with pytest.raises(VmNotFound) as e1:
        reg.get_vm(b, "only-alice")
    reg.create_vm(a, "only-alice")
    with pytest.raises(VmNotFound) as e2:
        reg.get_vm(b, "only-alice")
    assert str(e1.value) == str(e2.value)
    with pytest.raises(VmNotFound):
        reg.delete_vm(b, "only-alice")
    assert [v.name for _, v in reg.list_vms(b)] == ["shared-name"]
    assert [(t, v.name) for t, v in reg.list_vms()] == [
        (a, "only-alice"), (a, "shared-name"), (b, "shared-name")
    ]
    reg.delete_vm(a, "shared-name")
    assert reg.get_vm(b, "shared-name") is other
    assert vm.closed and reg.count_vms(a) == 1
