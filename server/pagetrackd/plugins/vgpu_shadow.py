"""The vGPU's shadow: the protect table, the GVT page-track layer, shadow page
tables, DMA mappings and the write-protection handler (``gtt.c``, ``page_track.c``,
``kvmgt.c`` in ``drivers/gpu/drm/i915/gvt/``). See :mod:`pagetrackd.plugins.vgpu`."""

from __future__ import annotations

import numpy as np
import structlog

from pagetrackd.domain import (
    PAGE_SHIFT,
    PAGE_SIZE,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PageTrackError,
    QuotaExceeded,
    Vm,
)
from pagetrackd.domain.memslots import MemslotTable, Slot
from pagetrackd.domain.notifiers import NotifierNode
from pagetrackd.plugins.base import Steps, run_all
from pagetrackd.plugins.budget import StateMeter
from pagetrackd.plugins.vgpu_tables import (
    ADDR_MASK,
    ENTRIES,
    ENTRY_SIZE,
    FIRST_FRAME,
    FLAGS_MASK,
    LEVELS,
    MISSING_TABLE_MODES,
    OWNER,
    PARTIAL_MODES,
    PTE_PRESENT,
    Mm,
    PageTrack,
    ShadowFailed,
    ShadowNoMemory,
    Spt,
    VgpuStats,
)

log = structlog.get_logger("pagetrackd.plugins.vgpu")

#: bytes one shadow page table holds (its 512 entries, the page-track entry, lookups)
#: and one DMA mapping (a guest page a leaf entry maps); see plugins/budget.py
SPT_BYTES = 5120
DMA_BYTES = 320


class VgpuShadow:
    """The shadow of one VM's PPGTTs and what keeps it current."""

    def __init__(self) -> None:
        self.vm: Vm | None = None
        #: the VM's memslot table (the same object for the VM's life; replaced on close)
        self._slots = MemslotTable()
        self._node: NotifierNode | None = None
        self.partial = PARTIAL_MODES[0]
        self.missing_table = MISSING_TABLE_MODES[0]
        #: bytes the shadow holds, against the tenant's plugin_state_bytes
        self.state_meter = StateMeter()
        self._reset()

    def _reset(self) -> None:
        self.state_meter.clear()
        self.stats = VgpuStats()
        #: gfns this vGPU holds one tracking reference on (kvmgt.c protect table, R8.2)
        self._protect: set[int] = set()
        #: GVT page-track layer: gfn -> handler (gvt/page_track.c radix tree, R8.3)
        self._tracks: dict[int, PageTrack] = {}
        self._spt_by_mfn: dict[int, Spt] = {}
        #: DMA cache: guest gfn -> [host frame, references]; and frame -> gfn
        self._dma: dict[int, list[int]] = {}
        self._frame_gfn: dict[int, int] = {}
        #: spts with pending entries, in the order they became pending (post_shadow_list)
        self._post_list: dict[int, Spt] = {}
        self._mms: dict[int, Mm] = {}
        #: present shadow entries of the live spts: mapping a page or table, and on a
        #: scratch page (kept as entries change, so status() need not scan the shadow)
        self.mapped_entries = 0
        self.scratch_entries = 0
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
        self._tracks[gfn] = PageTrack(self._ppgtt_write_protection_handler, spt)

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
        """:meth:`_populate_steps` in one go: the write path shadows a new subtree
        inside the write handler, as gtt.c does."""
        return run_all(self._populate_steps(gfn, level))

    def _populate_steps(self, gfn: int, level: int) -> Steps[Spt | None]:
        """``ppgtt_populate_spt_by_guest_entry``: find the spt for ``gfn`` (and take a
        reference) or create, track and fill it. None if it cannot be shadowed. One step
        per table filled, so the daemon can serve others while a big tree is shadowed."""
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
                raise ShadowFailed(gfn)
            return None
        self._reserve(SPT_BYTES, gfn)
        spt = Spt(gfn, level, self._alloc_frame(), [self._scratch_entry(level)] * ENTRIES)
        self.state_meter.take(SPT_BYTES)
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
            self.state_meter.give(SPT_BYTES)
            return None
        self.stats.spts_created += 1
        table = self._read_table(gfn)
        assert table is not None  # checked by _valid_gfn
        try:
            for index, ge in enumerate(table):
                if not ge & PTE_PRESENT:
                    continue
                if level == 1:
                    self._add_leaf(spt, index, ge)
                else:
                    child = yield from self._populate_steps(
                        (ge & ADDR_MASK) >> PAGE_SHIFT, level - 1)
                    self._link(spt, index, ge, child)
        except ShadowFailed:
            # gtt.c err_free_spt: this table fails with its child; release what it
            # shadowed so far and untrack it.
            for se in spt.entries:
                if se & PTE_PRESENT:
                    self._remove_shadow_entry(spt, se)
            self._free_spt(spt)
            raise
        yield
        return spt

    def _reserve(self, nbytes: int, gfn: int) -> None:
        """Fail the shadowing (ShadowNoMemory) if ``nbytes`` more would pass the
        tenant's plugin_state_bytes quota; nothing is changed then."""
        try:
            self.state_meter.reserve(
                nbytes, lambda: f"shadowing the GPU table at gfn {gfn:#x}")
        except QuotaExceeded as e:
            self.stats.quota_refusals += 1
            raise ShadowNoMemory(gfn, e) from None

    def _add_entry(self, spt: Spt, index: int, ge: int) -> None:
        """``ppgtt_handle_guest_entry_add``: shadow one present guest entry."""
        if spt.level == 1:
            self._add_leaf(spt, index, ge)
        else:
            child = self._populate_spt((ge & ADDR_MASK) >> PAGE_SHIFT, spt.level - 1)
            self._link(spt, index, ge, child)

    def _add_entry_steps(self, spt: Spt, index: int, ge: int) -> Steps[None]:
        """:meth:`_add_entry` a table at a time."""
        if spt.level == 1:
            self._add_leaf(spt, index, ge)
        else:
            child = yield from self._populate_steps(
                (ge & ADDR_MASK) >> PAGE_SHIFT, spt.level - 1)
            self._link(spt, index, ge, child)

    def _link(self, spt: Spt, index: int, ge: int, child: Spt | None) -> None:
        """Point a directory entry at its child's shadow (the scratch table if none)."""
        frame = self.scratch[spt.level] if child is None else child.mfn
        self._put(spt, index, (frame << PAGE_SHIFT) | (ge & FLAGS_MASK))

    def _put(self, spt: Spt, index: int, se: int) -> None:
        """Set a shadow entry, keeping the counts of present entries (as :meth:`_count`,
        inlined: this runs for most tracked writes)."""
        entries = spt.entries
        old = entries[index]
        scratch = self.scratch[spt.level]
        if old & PTE_PRESENT:
            if (old & ADDR_MASK) >> PAGE_SHIFT == scratch:
                self.scratch_entries -= 1
            else:
                self.mapped_entries -= 1
        if se & PTE_PRESENT:
            if (se & ADDR_MASK) >> PAGE_SHIFT == scratch:
                self.scratch_entries += 1
            else:
                self.mapped_entries += 1
        entries[index] = se

    def _count(self, level: int, se: int, sign: int) -> None:
        if se & PTE_PRESENT:
            if (se & ADDR_MASK) >> PAGE_SHIFT == self.scratch[level]:
                self.scratch_entries += sign
            else:
                self.mapped_entries += sign

    def _add_leaf(self, spt: Spt, index: int, ge: int) -> None:
        """Map the guest page a leaf entry names (the scratch page if it is in no slot)."""
        gfn = (ge & ADDR_MASK) >> PAGE_SHIFT
        if self._slots.find(gfn) is None:
            self.stats.violations += 1
            frame = self.scratch[1]
        else:
            frame = self._dma_map(gfn)
        self._put(spt, index, (frame << PAGE_SHIFT) | (ge & FLAGS_MASK))

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
        if self._spt_by_mfn.pop(spt.mfn, None) is not None:
            self.state_meter.give(SPT_BYTES)
            for se in spt.entries:
                if se & PTE_PRESENT:
                    self._count(spt.level, se, -1)
        self._post_list.pop(spt.mfn, None)
        spt.post.clear()
        self._unregister_page_track(spt.gfn)
        self.stats.spts_freed += 1

    def _dma_map(self, gfn: int) -> int:
        entry = self._dma.get(gfn)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        # StateMeter.reserve and take, inlined as in Vgpu.track_guest_write (this runs
        # for a good share of guest writes; the calls were 3% of the daemon's
        # instructions in the gpu-ppgtt workload). Only past the quota read last does
        # _reserve ask the quota again, and raise with its message if it does not fit.
        meter = self.state_meter
        budget = meter.budget
        if budget is not None and budget.used + DMA_BYTES > budget.quota_seen:
            self._reserve(DMA_BYTES, gfn)
        meter.bytes += DMA_BYTES
        if budget is not None:
            budget.used += DMA_BYTES
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
            meter = self.state_meter  # StateMeter.give, inlined (as in _dma_map)
            meter.bytes -= DMA_BYTES
            if meter.budget is not None:
                meter.budget.used -= DMA_BYTES

    def _handle_guest_write(self, spt: Spt, index: int, ge: int) -> None:
        """``ppgtt_handle_guest_write_page_table``: add the new entry first, then
        remove the old one, so a table stays valid in between (and an unchanged child
        keeps its spt)."""
        old = spt.entries[index]
        present = ge & PTE_PRESENT
        if present:
            try:
                self._add_entry(spt, index, ge)
            except ShadowFailed:
                return  # gtt.c "goto fail": the old shadow entry stays, the error is logged
        self._drop_old(spt, index, old, present)

    def _handle_guest_write_steps(self, spt: Spt, index: int, ge: int) -> Steps[None]:
        """:meth:`_handle_guest_write` a table at a time (for a flush); the write path
        keeps the plain version, which makes no generator per write."""
        old = spt.entries[index]
        present = ge & PTE_PRESENT
        if present:
            try:
                yield from self._add_entry_steps(spt, index, ge)
            except ShadowFailed:
                return
        self._drop_old(spt, index, old, present)

    def _drop_old(self, spt: Spt, index: int, old: int, present: int) -> None:
        self._remove_shadow_entry(spt, old)
        if not present:
            self._put(spt, index, self._scratch_entry(spt.level))

    def _set_post_shadow(self, spt: Spt, index: int, half: int) -> None:
        """``ppgtt_set_post_shadow``: mark an index pending; the first time, drop the
        old shadow entry and point it at the scratch page (R8.7)."""
        mask = spt.post.get(index)
        if mask is None:
            old = spt.entries[index]
            self._remove_shadow_entry(spt, old)
            self._put(spt, index, (old & FLAGS_MASK) | self._scratch_entry(spt.level))
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
        return run_all(self.flush_steps())

    def flush_steps(self) -> Steps[int]:
        """:meth:`flush` a table at a time: a table's pending leaf entries in one step
        (a leaf makes no table), a directory entry's new subtree a table at a time."""
        flushed = 0
        for spt in list(self._post_list.values()):
            if not spt.live:
                continue
            for index in sorted(spt.post):
                if not spt.live:
                    break
                ge = self._read_entry(spt.gfn, index)
                if spt.level == 1:
                    self._handle_guest_write(spt, index, ge)
                else:
                    yield from self._handle_guest_write_steps(spt, index, ge)
                spt.post.pop(index, None)
                flushed += 1
            if not spt.live or not spt.post:
                self._post_list.pop(spt.mfn, None)
            yield
        self.stats.flushed_entries += flushed
        return flushed


__all__ = ["DMA_BYTES", "SPT_BYTES", "VgpuShadow"]
