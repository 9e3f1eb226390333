"""A KVMGT / GVT-g-like vGPU: shadows the guest's PPGTTs and follows their writes.

Model (``drivers/gpu/drm/i915/gvt/`` in Linux; rule ids R8.x as in docs/kvm-rules.md):

* **PPGTT** -- gen8 48-bit, 4 levels of tables in guest memory, each 512 entries of 8 bytes:
  level 4 (PML4) -> 3 (PDP) -> 2 (PD) -> 1 (PT) -> 4 KiB page. An entry is present when
  bit 0 is set; bits 12..45 hold the next frame (``ADDR_4K_MASK`` in ``gtt.c``). Huge
  (2M/1G) and 64K entries are not modelled: every present level-1 entry maps 4 KiB.
* **spt** -- a shadow page table: one per guest table gfn, shared by every entry that
  points at it (``ppgtt_populate_spt_by_guest_entry`` finds it by gfn and takes a
  reference), with a simulated host frame (``mfn``). Its entries hold host frames: a
  child spt's mfn, a DMA-mapped host frame for a leaf page, or the per-level scratch
  frame. Guest flag bits are copied; a not-present guest entry shadows as the bare
  scratch frame of its level.
* **host frames** -- plain numbers from a counter, so the same operations always give the
  same frames (replay depends on it). Leaf pages are mapped through a refcounted DMA
  cache, as ``kvmgt.c``'s ``gvt_dma`` entries (``gvt_dma_map_page``/``gvt_dma_unmap_page``).
* **protect table** (R8.2) -- gfns this vGPU holds exactly one tracking reference on,
  owner ``plugin:vgpu``; the GVT page-track layer (R8.3) sits above it, gfn -> handler.

Writes: only gfns in the protect table are handled (R8.4); only 4- or 8-byte writes
(R8.5); the entry is re-read from guest memory; 8 bytes re-shadow at once (R8.6); a
4-byte half points the entry at the scratch page and leaves it pending (R8.7) until
:meth:`Vgpu.flush` runs before a submission (``partial="flush"``, the default:
``gtt.c`` ``intel_vgpu_flush_post_shadow``) or, with ``partial="halves"`` (a
difference, kept as an option: ``emulate_ggtt_mmio_write``'s GGTT logic applied to the
PPGTT), as soon as both halves are written. A leaf entry naming a gfn outside every
memslot maps the scratch page and counts a violation. Shadowing a child *table* whose
gfn has no memslot fails (``missing_table="fail"``, the default, R8.9: ``add_gfn``
returns -EINVAL): a write keeps the old shadow entry, and a table being shadowed fails
with it (``ppgtt_populate_spt_by_guest_entry``, ``err_free_spt``); with
``missing_table="scratch"`` (a difference, kept as an option) the entry maps the
scratch table instead. Both failures count a violation.

DMA events (``dma_policy=notify``, a pagetrack extension: GVT-g refuses DMA to PPGTT)
re-shadow every entry they touch, whatever their length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from pagetrackd.domain import (
    PAGE_SHIFT,
    PAGE_SIZE,
    AlreadyExists,
    FailedPrecondition,
    GfnNotInSlot,
    InvalidArgument,
    NotFound,
    PageTrackError,
    Source,
    Vm,
    WriteEvent,
)
from pagetrackd.domain.memslots import MemslotTable, Slot
from pagetrackd.domain.notifiers import NotifierNode
from pagetrackd.plugins.base import AuditReport, Mismatch

__all__ = ["Vgpu", "find_vgpu", "OWNER", "PTE_PRESENT", "PTE_RW", "ADDR_MASK", "LEVELS", "ENTRIES"]

log = structlog.get_logger("pagetrackd.plugins.vgpu")

OWNER = "plugin:vgpu"
LEVELS = 4
ENTRIES = 512
ENTRY_SIZE = 8
PTE_PRESENT = 1 << 0  #: GEN8_PAGE_PRESENT
PTE_RW = 1 << 1  #: GEN8_PAGE_RW
ADDR_MASK = ((1 << 46) - 1) & ~(PAGE_SIZE - 1)  #: GENMASK_ULL(45, 12), gen8 ADDR_4K_MASK
FLAGS_MASK = ~ADDR_MASK & ((1 << 64) - 1)
VA_BITS = 48
#: first simulated host frame; spts, scratch pages and DMA-mapped pages are numbered from here
FIRST_FRAME = 0x100000
#: when a partial (4-byte) write is resolved: only at flush (gtt.c), or once both halves
#: are seen; the first is the default
PARTIAL_MODES = ("flush", "halves")
#: what shadowing a child table outside every memslot does: fail (gtt.c), or map scratch
MISSING_TABLE_MODES = ("fail", "scratch")


class _ShadowFailed(Exception):
    """Shadowing a guest entry failed: a child table's gfn is in no memslot (gtt.c
    returns an error up the call chain; the caller keeps or frees what it had)."""
_DMA = Source.DMA  # an Enum member as a module constant: the class lookup costs ~70 ns


def level_shift(level: int) -> int:
    """Bit position of the va bits that index a level-``level`` table."""
    return PAGE_SHIFT + 9 * (level - 1)


def va_index(va: int, level: int) -> int:
    """Index of the entry for ``va`` in a level-``level`` table."""
    return (va >> level_shift(level)) & (ENTRIES - 1)


@dataclass(slots=True, eq=False)
class Spt:
    """A shadow page table (``struct intel_vgpu_ppgtt_spt``) for one guest table page."""

    gfn: int  #: the guest table page
    level: int  #: 4 = PML4 ... 1 = PT
    mfn: int  #: its simulated host frame
    entries: list[int]  #: shadow entries
    refcount: int = 1  #: entries (and PPGTT roots) pointing at it
    #: post-shadow bitmap: pending index -> halves written (bit 0 low dword, bit 1 high)
    post: dict[int, int] = field(default_factory=dict)
    live: bool = True


@dataclass(slots=True, eq=False)
class _PageTrack:
    """``struct intel_vgpu_page_track`` (``gvt/page_track.c``): gfn -> handler."""

    handler: Callable[[Spt, int, int], None]
    priv: Spt
    tracked: bool = False


@dataclass(slots=True, eq=False)
class _Mm:
    """A shadowed PPGTT (``struct intel_vgpu_mm``, L4 root): its guest root and spt."""

    ppgtt: int
    root_gfn: int
    root: Spt | None  #: None when the root gfn held another level's table (a conflict)
    refs: int = 1


@dataclass(slots=True)
class VgpuStats:
    """Counters since attach."""

    writes: int = 0  #: track_write calls for gfns in the protect table
    foreign_writes: int = 0  #: events for gfns this vGPU does not protect (R4.6)
    full_writes: int = 0  #: 8-byte writes, re-shadowed at once (R8.6)
    partial_writes: int = 0  #: 4-byte writes (R8.7)
    completed_partials: int = 0  #: entries re-shadowed because both halves were written
    ignored_writes: int = 0  #: writes of other sizes, dropped (R8.5)
    misaligned_writes: int = 0  #: 4/8-byte writes not aligned to their size (handled as GVT does)
    dma_events: int = 0  #: DMA events followed (dma_policy=notify)
    flushed_entries: int = 0  #: pending entries re-shadowed by flush (intel_vgpu_flush_post_shadow)
    violations: int = 0  #: entries naming gfns outside every memslot (R8.9)
    type_conflicts: int = 0  #: entries naming a table already shadowed at another level
    handler_errors: int = 0  #: -ENXIO and failed tracking calls, logged and swallowed (R8.4)
    submissions: int = 0
    scratch_batches: int = 0  #: submissions whose batch va translated to the scratch page
    spts_created: int = 0
    spts_freed: int = 0
    regions_removed: int = 0


class Vgpu:
    """The vGPU plugin (one per VM, R8.1). See the module docstring for the model."""

    name = "vgpu"
    external = True  #: KVMGT is an external page-track user

    def __init__(self) -> None:
        self.vm: Vm | None = None
        #: the VM's memslot table (the same object for the VM's life; replaced on close)
        self._slots = MemslotTable()
        self._node: NotifierNode | None = None
        self.partial = PARTIAL_MODES[0]
        self.missing_table = MISSING_TABLE_MODES[0]
        self._reset()

    def _reset(self) -> None:
        self.stats = VgpuStats()
        #: gfns this vGPU holds one tracking reference on (kvmgt.c protect table, R8.2)
        self._protect: set[int] = set()
        #: GVT page-track layer: gfn -> handler (gvt/page_track.c radix tree, R8.3)
        self._tracks: dict[int, _PageTrack] = {}
        self._spt_by_mfn: dict[int, Spt] = {}
        #: DMA cache: guest gfn -> [host frame, references]; and frame -> gfn
        self._dma: dict[int, list[int]] = {}
        self._frame_gfn: dict[int, int] = {}
        #: spts with pending entries, in the order they became pending (post_shadow_list)
        self._post_list: dict[int, Spt] = {}
        self._mms: dict[int, _Mm] = {}
        self._next_ppgtt = 0
        self._next_frame = FIRST_FRAME
        #: the memslots last found on the write path for a table and for a mapped page,
        #: as (first gfn, end gfn, slot). A slot's range changes or goes only by a DELETE
        #: or MOVE, which reach track_remove_region first, and that forgets both (a new
        #: slot never covers a gfn that is already in one).
        self._hot_table: tuple[int, int, Slot | None] = (0, 0, None)
        self._hot_data: tuple[int, int, Slot | None] = (0, 0, None)
        #: scratch frame used by the entries of a level-L spt (gtt->scratch_pt[type])
        self.scratch: dict[int, int] = {}
        for level in range(1, LEVELS + 1):
            self.scratch[level] = self._alloc_frame()

    def _alloc_frame(self) -> int:
        frame = self._next_frame
        self._next_frame += 1
        return frame

    # ------------------------------------------------------------------ lifecycle

    def attach(self, vm: Vm, **options: Any) -> None:
        """Register on ``vm`` (``intel_vgpu_open_device``). Options: ``partial``
        ("flush", the default, or "halves"), ``missing_table`` ("fail", the default, or
        "scratch"), ``root_gpa`` (adopt a PPGTT at once, via ``build_ppgtt``).

        Raises AlreadyExists if the VM already has a vGPU (KVMGT: -EEXIST, R8.1).
        """
        unknown = set(options) - {"partial", "missing_table", "root_gpa"}
        if unknown:
            raise InvalidArgument(
                f"unknown vgpu options {sorted(unknown)};"
                " known: partial, missing_table, root_gpa"
            )
        partial = options.get("partial", PARTIAL_MODES[0])
        if partial not in PARTIAL_MODES:
            raise InvalidArgument(f"partial must be one of {PARTIAL_MODES}, got {partial!r}")
        missing = options.get("missing_table", MISSING_TABLE_MODES[0])
        if missing not in MISSING_TABLE_MODES:
            raise InvalidArgument(
                f"missing_table must be one of {MISSING_TABLE_MODES}, got {missing!r}"
            )
        if self.vm is not None:
            raise AlreadyExists(f"this vgpu is already attached to VM {self.vm.name!r}")
        if vm.closed:
            raise FailedPrecondition(f"VM {vm.name!r} is closed")
        for node in vm.notifiers.nodes():
            if isinstance(node.notifier, Vgpu):
                raise AlreadyExists(
                    f"VM {vm.name!r} already has a vGPU; KVMGT allows one per VM (-EEXIST)"
                )
        self._reset()
        self.partial = partial
        self.missing_table = missing
        self.vm = vm
        self._slots = vm.slots
        self._node = vm.register_notifier(self)
        log.info("vgpu.attached", vm=vm.name, partial=partial, missing_table=missing)
        if options.get("root_gpa") is not None:
            self.call("build_ppgtt", root_gpa=options["root_gpa"])

    def attach_options(self) -> dict[str, Any]:
        """The options that re-create this attachment (used by the recorder)."""
        return {"partial": self.partial, "missing_table": self.missing_table}

    def detach(self) -> None:
        """Unregister (no callback runs after), then drop every tracking reference and
        all shadow state (``intel_vgpu_close_device``, R8.1). Idempotent."""
        vm = self.vm
        if vm is None:
            return
        if self._node is not None:
            vm.unregister_notifier(self._node)
        if not vm.closed:
            vm.release_owner(OWNER)
        log.info("vgpu.detached", vm=vm.name, submissions=self.stats.submissions)
        self.vm = None
        self._slots = MemslotTable()
        self._node = None
        self._reset()

    def vm_closed(self, vm: Vm) -> None:
        """The VM is being deleted: its counters go with it, so just drop state."""
        self.vm = None
        self._slots = MemslotTable()
        self._node = None
        self._reset()

    def _vm(self) -> Vm:
        if self.vm is None:
            raise FailedPrecondition("the vgpu is not attached to a VM")
        return self.vm

    # ------------------------------------------------------------------ protect table (R8.2)

    def _protect_add(self, gfn: int) -> None:
        """``intel_gvt_page_track_add``: one reference per gfn; errors leave the table as is."""
        if gfn in self._protect:
            return
        self._vm().track_add([gfn], owner=OWNER)
        self._protect.add(gfn)

    def _protect_remove(self, gfn: int) -> None:
        """``intel_gvt_page_track_remove``: a gfn not in the table is a no-op (R8.10)."""
        if gfn not in self._protect:
            return
        self._protect.discard(gfn)
        try:
            self._vm().track_remove([gfn], owner=OWNER)
        except PageTrackError:
            self.stats.handler_errors += 1
            log.warning("vgpu.untrack_failed", gfn=gfn)

    # ------------------------------------------------------------------ GVT page-track layer (R8.3)

    def _register_page_track(self, gfn: int, spt: Spt) -> None:
        if gfn in self._tracks:
            raise AlreadyExists(f"gfn {gfn:#x} already has a page-track handler")
        self._tracks[gfn] = _PageTrack(self._ppgtt_write_protection_handler, spt)

    def _enable_page_track(self, gfn: int) -> None:
        track = self._tracks.get(gfn)
        if track is None:
            raise NotFound(f"gfn {gfn:#x} has no page-track handler (-ENXIO)")
        if track.tracked:
            return
        self._protect_add(gfn)
        track.tracked = True

    def _unregister_page_track(self, gfn: int) -> None:
        track = self._tracks.pop(gfn, None)
        if track is not None and track.tracked:
            self._protect_remove(gfn)

    @property
    def protect_table(self) -> frozenset[int]:
        """The gfns this vGPU holds a tracking reference on."""
        return frozenset(self._protect)

    # ------------------------------------------------------------------ guest memory

    def _find_hot(self, gfn: int, table: bool) -> Slot | None:
        """``gfn``'s memslot, remembered as the hot table or data slot if there is one."""
        slot = self._slots.find(gfn)
        if slot is not None:
            hot = (slot.info.base_gfn, slot.info.end_gfn, slot)
            if table:
                self._hot_table = hot
            else:
                self._hot_data = hot
        return slot

    def _valid_gfn(self, gfn: int) -> bool:
        return self._slots.find(gfn) is not None

    def _read_entry(self, gfn: int, index: int) -> int:
        """Re-read one guest entry (``ppgtt_get_guest_entry``); 0 if the page is gone."""
        slot = self._slots.find(gfn)
        if slot is None:
            return 0
        return slot.memory.read_u64(gfn - slot.info.base_gfn, index * ENTRY_SIZE)

    def _read_table(self, gfn: int) -> list[int] | None:
        """All 512 guest entries of a table page; None if the page is in no memslot."""
        slot = self._slots.find(gfn)
        if slot is None:
            return None
        raw = slot.memory.read(gfn - slot.base_gfn, 0, PAGE_SIZE)
        out: list[int] = np.frombuffer(raw, dtype="<u8").tolist()
        return out

    # ------------------------------------------------------------------ shadowing (gtt.c)

    def _scratch_entry(self, level: int) -> int:
        return self.scratch[level] << PAGE_SHIFT

    def _populate_spt(self, gfn: int, level: int) -> Spt | None:
        """``ppgtt_populate_spt_by_guest_entry``: find the spt for ``gfn`` (and take a
        reference) or create, track and fill it. None if it cannot be shadowed."""
        track = self._tracks.get(gfn)
        if track is not None:
            spt = track.priv
            if spt.level != level:
                self.stats.type_conflicts += 1
                return None
            spt.refcount += 1
            return spt
        if not self._valid_gfn(gfn):
            self.stats.violations += 1
            if self.missing_table == "fail":
                raise _ShadowFailed(gfn)
            return None
        spt = Spt(gfn, level, self._alloc_frame(), [self._scratch_entry(level)] * ENTRIES)
        self._spt_by_mfn[spt.mfn] = spt
        self._register_page_track(gfn, spt)
        try:
            self._enable_page_track(gfn)
        except PageTrackError:
            # e.g. a counter at 65535: the spt is not created (gtt.c err_free_spt).
            self.stats.handler_errors += 1
            log.warning("vgpu.track_failed", gfn=gfn)
            spt.live = False
            del self._spt_by_mfn[spt.mfn]
            del self._tracks[gfn]
            return None
        self.stats.spts_created += 1
        table = self._read_table(gfn)
        assert table is not None  # checked by _valid_gfn
        try:
            for index, ge in enumerate(table):
                if ge & PTE_PRESENT:
                    self._add_entry(spt, index, ge)
        except _ShadowFailed:
            # gtt.c err_free_spt: this table fails with its child; release what it
            # shadowed so far and untrack it.
            for se in spt.entries:
                if se & PTE_PRESENT:
                    self._remove_shadow_entry(spt, se)
            self._free_spt(spt)
            raise
        return spt

    def _add_entry(self, spt: Spt, index: int, ge: int) -> None:
        """``ppgtt_handle_guest_entry_add``: shadow one present guest entry."""
        gfn = (ge & ADDR_MASK) >> PAGE_SHIFT
        flags = ge & FLAGS_MASK
        if spt.level > 1:
            child = self._populate_spt(gfn, spt.level - 1)
            frame = self.scratch[spt.level] if child is None else child.mfn
        elif self._slots.find(gfn) is None:
            self.stats.violations += 1
            frame = self.scratch[1]
        else:
            frame = self._dma_map(gfn)
        spt.entries[index] = (frame << PAGE_SHIFT) | flags

    def _remove_shadow_entry(self, spt: Spt, se: int) -> None:
        """``ppgtt_handle_guest_entry_removal``: drop what an old shadow entry held."""
        if not se & PTE_PRESENT:
            return
        frame = (se & ADDR_MASK) >> PAGE_SHIFT
        if frame == self.scratch[spt.level]:
            return
        if spt.level > 1:
            child = self._spt_by_mfn.get(frame)
            if child is None:
                self.stats.handler_errors += 1  # gvt: "fail to find guest page", -ENXIO
                return
            self._invalidate_spt(child)
        else:
            self._dma_unmap(frame)

    def _invalidate_spt(self, spt: Spt) -> None:
        """``ppgtt_invalidate_spt``: drop a reference; at zero, release its entries and free it."""
        spt.refcount -= 1
        if spt.refcount > 0:
            return
        for se in spt.entries:
            if se & PTE_PRESENT:  # _remove_shadow_entry ignores the others
                self._remove_shadow_entry(spt, se)
        self._free_spt(spt)

    def _free_spt(self, spt: Spt) -> None:
        """``ppgtt_free_spt``: untrack the guest page and forget the spt."""
        spt.live = False
        self._spt_by_mfn.pop(spt.mfn, None)
        self._post_list.pop(spt.mfn, None)
        spt.post.clear()
        self._unregister_page_track(spt.gfn)
        self.stats.spts_freed += 1

    def _dma_map(self, gfn: int) -> int:
        entry = self._dma.get(gfn)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        frame = self._alloc_frame()
        self._dma[gfn] = [frame, 1]
        self._frame_gfn[frame] = gfn
        return frame

    def _dma_unmap(self, frame: int) -> None:
        gfn = self._frame_gfn.get(frame)
        if gfn is None:
            self.stats.handler_errors += 1
            return
        entry = self._dma[gfn]
        entry[1] -= 1
        if entry[1] == 0:
            del self._dma[gfn]
            del self._frame_gfn[frame]

    def _handle_guest_write(self, spt: Spt, index: int, ge: int) -> None:
        """``ppgtt_handle_guest_write_page_table``: add the new entry first, then
        remove the old one, so a table stays valid in between (and an unchanged child
        keeps its spt)."""
        entries = spt.entries
        old = entries[index]
        present = ge & PTE_PRESENT
        if present:
            try:
                self._add_entry(spt, index, ge)
            except _ShadowFailed:
                return  # gtt.c "goto fail": the old shadow entry stays, the error is logged
        self._remove_shadow_entry(spt, old)
        if not present:
            entries[index] = self._scratch_entry(spt.level)

    def _set_post_shadow(self, spt: Spt, index: int, half: int) -> None:
        """``ppgtt_set_post_shadow``: mark an index pending; the first time, drop the
        old shadow entry and point it at the scratch page (R8.7)."""
        mask = spt.post.get(index)
        if mask is None:
            old = spt.entries[index]
            self._remove_shadow_entry(spt, old)
            spt.entries[index] = (old & FLAGS_MASK) | self._scratch_entry(spt.level)
            mask = 0
            self._post_list.setdefault(spt.mfn, spt)
        spt.post[index] = mask | half

    def _clear_pending(self, spt: Spt, index: int) -> None:
        del spt.post[index]
        if not spt.post:
            self._post_list.pop(spt.mfn, None)

    def _ppgtt_write_protection_handler(self, spt: Spt, gpa: int, nbytes: int) -> None:
        """``ppgtt_write_protection_handler`` + ``..._write_page_table_bytes`` (R8.5-R8.7)."""
        stats = self.stats
        if nbytes != 4 and nbytes != 8:
            stats.ignored_writes += 1
            return
        off = gpa & (PAGE_SIZE - 1)
        if off & (nbytes - 1):
            stats.misaligned_writes += 1
        index = off >> 3
        # Re-read the entry (_read_entry, inlined)
        gfn = spt.gfn
        lo, hi, slot = self._hot_table
        if not lo <= gfn < hi:
            slot = self._find_hot(gfn, True)
            lo = 0 if slot is None else slot.info.base_gfn
        ge = 0 if slot is None else slot.memory.read_u64(gfn - lo, index << 3)
        if nbytes == ENTRY_SIZE:
            stats.full_writes += 1
            if spt.post and index in spt.post:
                # The entry is whole again. [Q] gtt.c leaves the post-shadow bit set here,
                # so a later 4-byte write to it skips the scratch step and the shadow keeps
                # the old full value until the flush; clearing the bit avoids that window.
                self._clear_pending(spt, index)
            self._handle_guest_write(spt, index, ge)
            return
        stats.partial_writes += 1
        self._set_post_shadow(spt, index, 2 if off & 4 else 1)
        if self.partial == "halves" and spt.post[index] == 3:
            # Both halves written: the entry is whole again (the GGTT's partial_pte_list
            # logic in gtt.c emulate_ggtt_mmio_write, applied to the PPGTT; DESIGN §2).
            self._clear_pending(spt, index)
            stats.completed_partials += 1
            self._handle_guest_write(spt, index, ge)

    def _follow_dma(self, spt: Spt, gpa: int, nbytes: int) -> None:
        """A notified DMA write: re-shadow every entry it touched (pagetrack extension)."""
        self.stats.dma_events += 1
        off = gpa & (PAGE_SIZE - 1)
        for index in range(off >> 3, ((off + nbytes - 1) >> 3) + 1):
            if index in spt.post:
                self._clear_pending(spt, index)
            self._handle_guest_write(spt, index, self._read_entry(spt.gfn, index))
            if not spt.live:
                return

    def flush(self) -> int:
        """``intel_vgpu_flush_post_shadow``: re-read and re-shadow every pending entry
        (run before each submission). Returns how many entries were flushed."""
        flushed = 0
        for spt in list(self._post_list.values()):
            if not spt.live:
                continue
            for index in sorted(spt.post):
                if not spt.live:
                    break
                self._handle_guest_write(spt, index, self._read_entry(spt.gfn, index))
                spt.post.pop(index, None)
                flushed += 1
            self._post_list.pop(spt.mfn, None)
        self.stats.flushed_entries += flushed
        return flushed

    # ------------------------------------------------------------------ notifier hooks

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        """``kvmgt_page_track_write``: handle the write if this vGPU protects the gfn."""
        if event.source is _DMA:
            gfn = event.gpa >> PAGE_SHIFT
            if gfn not in self._protect:
                self.stats.foreign_writes += 1
                return
            self.stats.writes += 1
            track = self._tracks.get(gfn)
            if track is None:
                self.stats.handler_errors += 1  # intel_vgpu_page_track_handler: -ENXIO
                return
            self._follow_dma(track.priv, event.gpa, len(event.data))
            return
        self.track_guest_write(vm, event.seq, event.vcpu, event.gpa, event.data)

    def track_guest_write(self, vm: Vm, seq: int, vcpu: int, gpa: int, data: bytes) -> None:
        """:meth:`track_write` for a guest write, without an event object."""
        gfn = gpa >> PAGE_SHIFT
        stats = self.stats
        if gfn not in self._protect:
            stats.foreign_writes += 1
            return
        stats.writes += 1
        track = self._tracks.get(gfn)
        if track is None:
            stats.handler_errors += 1  # intel_vgpu_page_track_handler: -ENXIO
            return
        spt = track.priv
        nbytes = len(data)
        if nbytes != ENTRY_SIZE or gpa & 7 or spt.level != 1 or spt.post:
            track.handler(spt, gpa, nbytes)
            return
        # The handler's most common case, inlined: a whole, aligned PTE write with
        # nothing pending in the table. Every track.handler is
        # _ppgtt_write_protection_handler; this is its full-write branch, with
        # _read_entry and, for a level-1 table, _handle_guest_write (_add_entry,
        # _dma_map, _remove_shadow_entry, _dma_unmap): the same steps in the same order.
        lo, hi, slot = self._hot_table
        if not lo <= gfn < hi:
            slot = self._find_hot(gfn, True)
            lo = 0 if slot is None else slot.info.base_gfn
        index = (gpa & (PAGE_SIZE - 1)) >> 3
        ge = 0 if slot is None else slot.memory.read_u64(gfn - lo, index << 3)
        stats.full_writes += 1
        entries = spt.entries
        old = entries[index]
        scratch = self.scratch[1]
        if ge & PTE_PRESENT:
            page = (ge & ADDR_MASK) >> PAGE_SHIFT
            lo, hi, _ = self._hot_data
            if not lo <= page < hi and self._find_hot(page, False) is None:
                stats.violations += 1
                frame = scratch
            else:
                dma = self._dma.get(page)
                if dma is not None:
                    dma[1] += 1
                    frame = dma[0]
                else:
                    frame = self._next_frame
                    self._next_frame = frame + 1
                    self._dma[page] = [frame, 1]
                    self._frame_gfn[frame] = page
            entries[index] = (frame << PAGE_SHIFT) | (ge & FLAGS_MASK)
        else:
            entries[index] = scratch << PAGE_SHIFT
        if old & PTE_PRESENT:
            frame = (old & ADDR_MASK) >> PAGE_SHIFT
            if frame != scratch:
                page = self._frame_gfn.get(frame, -1)
                if page < 0:
                    self._dma_unmap(frame)  # counts the error
                    return
                dma = self._dma[page]
                dma[1] -= 1
                if dma[1] == 0:
                    del self._dma[page]
                    del self._frame_gfn[frame]

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        """``kvmgt_page_track_remove_region``: forget the range from the protect table,
        without removing tracking (R8.10). Shadow tables stay (as in GVT)."""
        self.stats.regions_removed += 1
        self._hot_table = self._hot_data = (0, 0, None)
        if npages > len(self._protect):
            gone = [g for g in self._protect if base_gfn <= g < base_gfn + npages]
        else:
            gone = [g for g in range(base_gfn, base_gfn + npages) if g in self._protect]
        self._protect.difference_update(gone)

    # ------------------------------------------------------------------ PPGTT roots

    def _find_mm(self, args: dict[str, Any]) -> _Mm:
        if "ppgtt" in args and args["ppgtt"] is not None:
            mm = self._mms.get(_int_arg(args, "ppgtt"))
            if mm is None:
                raise NotFound(
                    f"no PPGTT {args['ppgtt']}; known: {sorted(self._mms)}",
                    name=str(args["ppgtt"]),
                )
            return mm
        if args.get("root_gpa") is not None:
            root_gfn = _root_gfn(args)
            for mm in self._mms.values():
                if mm.root_gfn == root_gfn:
                    return mm
            raise NotFound(
                f"no PPGTT with root gpa {root_gfn << PAGE_SHIFT:#x}",
                name=f"{root_gfn << PAGE_SHIFT:#x}",
            )
        if len(self._mms) == 1:
            return next(iter(self._mms.values()))
        raise InvalidArgument("name the PPGTT: give ppgtt=<id> or root_gpa=<gpa>")

    def _create_mm(self, root_gfn: int) -> _Mm:
        """``intel_vgpu_create_ppgtt_mm`` + ``shadow_ppgtt_mm`` for an L4 root."""
        if not self._valid_gfn(root_gfn):
            raise GfnNotInSlot(
                f"PPGTT root gpa {root_gfn << PAGE_SHIFT:#x} is not in any memslot"
            )
        try:
            root = self._populate_spt(root_gfn, LEVELS)
        except _ShadowFailed as e:
            raise FailedPrecondition(
                f"shadowing the PPGTT at {root_gfn << PAGE_SHIFT:#x} failed: it links a table"
                f" at gfn {e.args[0]:#x}, which is in no memslot (as gtt.c; attach with"
                " missing_table=scratch to map the scratch table instead)"
            ) from None
        mm = _Mm(self._next_ppgtt, root_gfn, root)
        self._next_ppgtt += 1
        self._mms[mm.ppgtt] = mm
        return mm

    def _free_root_gfn(self) -> int:
        """An all-zero guest page that is not a shadowed table, from the top of memory."""
        vm = self._vm()
        for slot in reversed(vm.slots.slots()):
            if slot.readonly:
                continue
            for gfn in range(slot.info.end_gfn - 1, slot.base_gfn - 1, -1):
                if gfn in self._tracks or any(m.root_gfn == gfn for m in self._mms.values()):
                    continue
                if not any(slot.memory.read(gfn - slot.base_gfn, 0, PAGE_SIZE)):
                    return gfn
        raise FailedPrecondition("no free (all-zero) guest page for a PPGTT root")

    def _mm_result(self, mm: _Mm, created: bool) -> dict[str, Any]:
        return {
            "ppgtt": mm.ppgtt,
            "root_gpa": mm.root_gfn << PAGE_SHIFT,
            "created": created,
            "root_mfn": -1 if mm.root is None else mm.root.mfn,
            "tables": len(self._spt_by_mfn),
        }

    # ------------------------------------------------------------------ translation

    def _translate(self, mm: _Mm, va: int) -> dict[str, Any]:
        spt = mm.root
        level = LEVELS
        se = 0
        while spt is not None:
            se = spt.entries[va_index(va, level)]
            frame = (se & ADDR_MASK) >> PAGE_SHIFT
            if not se & PTE_PRESENT or frame == self.scratch[level]:
                break
            if level == 1:
                return {
                    "host_frame": frame,
                    "hpa": (frame << PAGE_SHIFT) | (va & (PAGE_SIZE - 1)),
                    "scratch": False,
                    "present": True,
                    "level": 1,
                    "guest_gfn": self._frame_gfn.get(frame, -1),
                    "entry": se,
                }
            spt = self._spt_by_mfn.get(frame)
            level -= 1
        # Walks that stop early land, through the scratch tree, on the scratch page.
        return {
            "host_frame": self.scratch[1],
            "hpa": self.scratch[1] << PAGE_SHIFT,
            "scratch": True,
            "present": bool(se & PTE_PRESENT),
            "level": level,
            "guest_gfn": -1,
            "entry": se,
        }

    # ------------------------------------------------------------------ plugin protocol

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Plugin operations (all raise InvalidArgument on bad or unknown arguments):

        * ``build_ppgtt(root_gpa=None)`` -- shadow the PPGTT whose PML4 is at ``root_gpa``
          (find-or-create, as ``intel_vgpu_get_ppgtt_mm``); without ``root_gpa``, pick an
          unused all-zero page at the top of guest memory as a fresh, empty root.
          -> ``{ppgtt, root_gpa, created, root_mfn, tables}``
        * ``destroy_ppgtt(ppgtt= | root_gpa=)`` -- drop a reference to a PPGTT; at zero
          its tables are unshadowed and untracked. -> ``{ppgtt, destroyed, tables}``
        * ``submit(ppgtt= | root_gpa=, batch_va=None)`` -- a workload submission: flush
          pending entries (R8.7), shadow the root if unknown, count it; ``batch_va`` is
          translated like the command parser would. -> ``{submission, flushed, ppgtt,
          batch_scratch}``
        * ``flush()`` -> ``{flushed}``
        * ``translate(va, ppgtt= | root_gpa=)`` -- GPU va -> host frame through the shadow.
          -> ``{host_frame, hpa, scratch, present, level, guest_gfn, entry}``
        * ``protect_table()`` -> ``{gfns}`` (sorted)
        * ``ppgtts()`` -> ``{ppgtts: [{ppgtt, root_gpa, refs}]}``
        """
        self._vm()
        if op == "build_ppgtt":
            _only(op, args, {"root_gpa"})
            if args.get("root_gpa") is None:
                return self._mm_result(self._create_mm(self._free_root_gfn()), True)
            root_gfn = _root_gfn(args)
            for mm in self._mms.values():
                if mm.root_gfn == root_gfn:
                    mm.refs += 1
                    return self._mm_result(mm, False)
            return self._mm_result(self._create_mm(root_gfn), True)
        if op == "destroy_ppgtt":
            _only(op, args, {"ppgtt", "root_gpa"})
            mm = self._find_mm(args)
            mm.refs -= 1
            destroyed = mm.refs == 0
            if destroyed:
                del self._mms[mm.ppgtt]
                if mm.root is not None:
                    self._invalidate_spt(mm.root)
            return {"ppgtt": mm.ppgtt, "destroyed": destroyed, "tables": len(self._spt_by_mfn)}
        if op == "submit":
            _only(op, args, {"ppgtt", "root_gpa", "batch_va"})
            batch_va = args.get("batch_va")
            if batch_va is not None:
                batch_va = _va_arg(args, "batch_va")
            flushed = self.flush()
            if args.get("ppgtt") is None and args.get("root_gpa") is not None:
                root_gfn = _root_gfn(args)
                found = [m for m in self._mms.values() if m.root_gfn == root_gfn]
                mm = found[0] if found else self._create_mm(root_gfn)
            else:
                mm = self._find_mm(args)
            self.stats.submissions += 1
            scratch = False
            if batch_va is not None:
                scratch = bool(self._translate(mm, batch_va)["scratch"])
                self.stats.scratch_batches += scratch
            return {
                "submission": self.stats.submissions,
                "flushed": flushed,
                "ppgtt": mm.ppgtt,
                "batch_scratch": scratch,
            }
        if op == "flush":
            _only(op, args, set())
            return {"flushed": self.flush()}
        if op == "translate":
            _only(op, args, {"va", "ppgtt", "root_gpa"})
            va = _va_arg(args, "va")
            return self._translate(self._find_mm(args), va)
        if op == "protect_table":
            _only(op, args, set())
            return {"gfns": sorted(self._protect)}
        if op == "ppgtts":
            _only(op, args, set())
            return {
                "ppgtts": [
                    {"ppgtt": m.ppgtt, "root_gpa": m.root_gfn << PAGE_SHIFT, "refs": m.refs}
                    for m in self._mms.values()
                ]
            }
        raise InvalidArgument(
            f"unknown vgpu op {op!r}; known: build_ppgtt, destroy_ppgtt, submit, flush,"
            " translate, protect_table, ppgtts"
        )

    def status(self) -> dict[str, int | str]:
        """Counters and sizes of the shadow, flat. The names the API documents:
        ``shadow_tables`` (guest tables shadowed, each write-tracked), ``pending_partial``
        (entries whose 4-byte write waits for the flush, R8.7), ``scratch_entries``
        (present shadow entries pointing at a scratch page: pending partials and entries
        naming gfns outside the memslots) and ``violations``."""
        s = self.stats
        entries = 0
        pending = 0
        on_scratch = 0
        for spt in self._spt_by_mfn.values():
            scratch = self.scratch[spt.level]
            for se in spt.entries:
                if se & PTE_PRESENT:
                    if (se & ADDR_MASK) >> PAGE_SHIFT != scratch:
                        entries += 1
                    else:
                        on_scratch += 1
            on_scratch += sum(
                1 for i in spt.post if not spt.entries[i] & PTE_PRESENT
            )  # a pending entry whose guest flags are not present still sits on scratch
            pending += len(spt.post)
        return {
            "vm": "" if self.vm is None else self.vm.name,
            "attached": int(self.vm is not None),
            "partial_mode": self.partial,
            "missing_table": self.missing_table,
            "ppgtts": len(self._mms),
            "shadow_tables": len(self._spt_by_mfn),
            "shadowed_tables": len(self._spt_by_mfn),
            "shadow_entries": entries,
            "scratch_entries": on_scratch,
            "dma_mapped_pages": len(self._dma),
            "protected_gfns": len(self._protect),
            "pending_partial": pending,
            "pending": pending,
            "writes": s.writes,
            "foreign_writes": s.foreign_writes,
            "full_writes": s.full_writes,
            "partial_writes": s.partial_writes,
            "completed_partials": s.completed_partials,
            "flushed_entries": s.flushed_entries,
            "ignored_writes": s.ignored_writes,
            "misaligned_writes": s.misaligned_writes,
            "dma_events": s.dma_events,
            "violations": s.violations,
            "type_conflicts": s.type_conflicts,
            "handler_errors": s.handler_errors,
            "submissions": s.submissions,
            "scratch_batches": s.scratch_batches,
            "spts_created": s.spts_created,
            "spts_freed": s.spts_freed,
            "regions_removed": s.regions_removed,
        }

    def audit(self) -> AuditReport:
        """Compare every shadow entry with what guest memory says now.

        The walk starts at each PPGTT root and follows the shadow (what the GPU would
        use); every shadow table reached is compared entry by entry with a fresh read
        of the guest table it shadows, so a stale entry is reported once, with the GPU
        va it translates, and its subtree is still checked. Pending entries (R8.7) must
        point at the scratch page and are otherwise skipped. Shadow tables that no
        root reaches are reported as orphans."""
        if self.vm is None:
            return AuditReport(0)
        mismatches: list[Mismatch] = []
        seen: set[int] = set()
        checked = 0
        for mm in self._mms.values():
            if mm.root is None:
                continue
            stack: list[tuple[Spt, int]] = [(mm.root, 0)]
            while stack:
                spt, base_va = stack.pop()
                if spt.mfn in seen:
                    continue
                seen.add(spt.mfn)
                guest = self._read_table(spt.gfn)
                shift = level_shift(spt.level)
                if guest is None:
                    mismatches.append(
                        Mismatch(base_va, spt.level, spt.mfn << PAGE_SHIFT, 0,
                                 f"guest table gfn {spt.gfn:#x} is in no memslot",
                                 table="ppgtt", table_gfn=spt.gfn)
                    )
                    continue
                scratch = self.scratch[spt.level]
                for index in range(ENTRIES):
                    se = spt.entries[index]
                    ge = guest[index]
                    va = base_va | (index << shift)
                    checked += 1
                    if index in spt.post:
                        if (se & ADDR_MASK) >> PAGE_SHIFT != scratch:
                            mismatches.append(
                                Mismatch(va, spt.level, se, ge, "pending entry not at scratch",
                                         table="ppgtt", table_gfn=spt.gfn, index=index,
                                         expected=(se & FLAGS_MASK) | (scratch << PAGE_SHIFT))
                            )
                        continue
                    expected = self._expected(spt.level, ge)
                    if expected != se:
                        reason = "stale shadow entry"
                        if (
                            spt.level > 1 and ge & PTE_PRESENT and self.missing_table == "fail"
                            and not self._valid_gfn((ge & ADDR_MASK) >> PAGE_SHIFT)
                        ):
                            reason = ("shadowing failed: the guest entry names a table in no"
                                      " memslot, the shadow keeps its old entry (gtt.c)")
                        mismatches.append(
                            Mismatch(va, spt.level, se, ge, reason, table="ppgtt",
                                     table_gfn=spt.gfn, index=index, expected=expected)
                        )
                    # Descend along the shadow (what the GPU walks), stale or not: each spt
                    # is compared with the guest table it shadows.
                    frame = (se & ADDR_MASK) >> PAGE_SHIFT
                    if spt.level > 1 and se & PTE_PRESENT and frame != scratch:
                        child = self._spt_by_mfn.get(frame)
                        if child is None:
                            mismatches.append(
                                Mismatch(va, spt.level, se, ge, "shadow points at a freed table",
                                         table="ppgtt", table_gfn=spt.gfn, index=index,
                                         expected=expected)
                            )
                        else:
                            stack.append((child, va))
        for spt in self._spt_by_mfn.values():
            if spt.mfn not in seen:
                mismatches.append(
                    Mismatch(spt.gfn << PAGE_SHIFT, spt.level, spt.mfn << PAGE_SHIFT, 0,
                             "orphan shadow table: no PPGTT root reaches it",
                             table="ppgtt", table_gfn=spt.gfn)
                )
        mismatches.sort(key=lambda m: (m.address, -m.level))
        return AuditReport(checked, tuple(mismatches))

    def _expected(self, level: int, ge: int) -> int | None:
        """The shadow entry a fresh shadowing of guest entry ``ge`` would give, using
        the spts and DMA mappings that exist now; None if none exists (stale)."""
        if not ge & PTE_PRESENT:
            return self._scratch_entry(level)
        gfn = (ge & ADDR_MASK) >> PAGE_SHIFT
        flags = ge & FLAGS_MASK
        scratch = (self._scratch_entry(level)) | flags
        if not self._valid_gfn(gfn):
            return scratch
        if level > 1:
            track = self._tracks.get(gfn)
            if track is None:
                return None
            if track.priv.level != level - 1:
                return scratch
            return (track.priv.mfn << PAGE_SHIFT) | flags
        dma = self._dma.get(gfn)
        return None if dma is None else (dma[0] << PAGE_SHIFT) | flags


def find_vgpu(vm: Vm) -> Vgpu | None:
    """The vGPU attached to ``vm``, if any."""
    for node in vm.notifiers.nodes():
        if isinstance(node.notifier, Vgpu):
            return node.notifier
    return None


def _only(op: str, args: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(args) - allowed
    if unknown:
        raise InvalidArgument(
            f"vgpu {op}: unknown arguments {sorted(unknown)}; allowed: {sorted(allowed)}"
        )


def _int_arg(args: dict[str, Any], key: str) -> int:
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _va_arg(args: dict[str, Any], key: str) -> int:
    va = _int_arg(args, key)
    if va >= 1 << VA_BITS:
        raise InvalidArgument(f"{key} {va:#x} is outside the {VA_BITS}-bit GPU address space")
    return va


def _root_gfn(args: dict[str, Any]) -> int:
    gpa = _int_arg(args, "root_gpa")
    if gpa & (PAGE_SIZE - 1):
        raise InvalidArgument(f"root_gpa {gpa:#x} must be page aligned (a PML4 page)")
    return gpa >> PAGE_SHIFT
