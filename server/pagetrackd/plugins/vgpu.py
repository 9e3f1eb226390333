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

from typing import Any

import structlog

from pagetrackd.domain import (
    PAGE_SHIFT,
    PAGE_SIZE,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Vm,
    WriteEvent,
)
from pagetrackd.domain.memslots import MemslotTable
from pagetrackd.plugins.vgpu_audit import VgpuAudit
from pagetrackd.plugins.vgpu_ppgtt import VgpuPpgtts
from pagetrackd.plugins.vgpu_shadow import DMA_BYTES
from pagetrackd.plugins.vgpu_tables import (
    ADDR_MASK,
    DMA,
    ENTRIES,
    ENTRY_SIZE,
    FLAGS_MASK,
    LEVELS,
    MISSING_TABLE_MODES,
    OWNER,
    PARTIAL_MODES,
    PTE_PRESENT,
    PTE_RW,
    level_shift,
    va_index,
)

__all__ = [
    "ADDR_MASK",
    "ENTRIES",
    "LEVELS",
    "OWNER",
    "PARTIAL_MODES",
    "PTE_PRESENT",
    "PTE_RW",
    "Vgpu",
    "find_vgpu",
    "level_shift",
    "va_index",
]

log = structlog.get_logger("pagetrackd.plugins.vgpu")


class Vgpu(VgpuPpgtts, VgpuAudit):
    """The vGPU plugin (one per VM, R8.1). See the module docstring for the model."""

    name = "vgpu"
    external = True  #: KVMGT is an external page-track user

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

    # ------------------------------------------------------------------ notifier hooks

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        """``kvmgt_page_track_write``: handle the write if this vGPU protects the gfn."""
        if event.source is DMA:
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
        index = (gpa & (PAGE_SIZE - 1)) >> 3
        if (
            nbytes != ENTRY_SIZE or gpa & 7 or spt.level != 1
            or (spt.post and index in spt.post)
        ):
            track.handler(spt, gpa, nbytes)
            return
        # The handler's most common case, inlined: a whole, aligned PTE write to an
        # entry with no partial write pending (other entries of the table may have
        # one: a full write does not look at them). Every track.handler is
        # _ppgtt_write_protection_handler; this is its full-write branch, with
        # _read_entry and, for a level-1 table, _handle_guest_write (_add_entry,
        # _dma_map, _remove_shadow_entry, _dma_unmap): the same steps in the same order.
        lo, hi, slot = self._hot_table
        if not lo <= gfn < hi:
            slot = self._find_hot(gfn, True)
            lo = 0 if slot is None else slot.info.base_gfn
        ge = 0 if slot is None else slot.memory.read_u64(gfn - lo, index << 3)
        stats.full_writes += 1
        entries = spt.entries
        old = entries[index]
        scratch = self.scratch[1]
        charge = 0  # plugin-state bytes this write takes (DMA_BYTES) or gives (minus)
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
                    # StateMeter.room's check, its usual case inlined: the calls
                    # were some 5% of the daemon's time in this workload
                    budget = self.state_meter.budget
                    if (
                        budget is not None and budget.used + DMA_BYTES > budget.quota_seen
                        and not self.state_meter.room(DMA_BYTES)
                    ):
                        # as _handle_guest_write: the old shadow entry stays
                        self.stats.quota_refusals += 1
                        return
                    # The bytes are taken at the end: when the old entry's mapping goes
                    # in this same write, its bytes pay for this one (the same totals as
                    # taking here and giving back below, with no await between).
                    charge = DMA_BYTES
                    frame = self._next_frame
                    self._next_frame = frame + 1
                    self._dma[page] = [frame, 1]
                    self._frame_gfn[frame] = page
            entries[index] = (frame << PAGE_SHIFT) | (ge & FLAGS_MASK)
            if frame == scratch:  # as _put: the new entry joins the counts
                self.scratch_entries += 1
            else:
                self.mapped_entries += 1
        else:
            entries[index] = scratch << PAGE_SHIFT
        if old & PTE_PRESENT:
            frame = (old & ADDR_MASK) >> PAGE_SHIFT
            if frame == scratch:  # and the old one leaves them
                self.scratch_entries -= 1
            else:
                self.mapped_entries -= 1
                page = self._frame_gfn.get(frame, -1)
                if page < 0:
                    self._dma_unmap(frame)  # counts the error
                else:
                    dma = self._dma[page]
                    dma[1] -= 1
                    if dma[1] == 0:
                        del self._dma[page]
                        del self._frame_gfn[frame]
                        charge -= DMA_BYTES
        if charge:  # StateMeter.take or give, inlined
            meter = self.state_meter
            meter.bytes += charge
            if meter.budget is not None:
                meter.budget.used += charge

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


def find_vgpu(vm: Vm) -> Vgpu | None:
    """The vGPU attached to ``vm``, if any."""
    for node in vm.notifiers.nodes():
        if isinstance(node.notifier, Vgpu):
            return node.notifier
    return None

