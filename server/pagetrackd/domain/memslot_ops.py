"""Memslots of a VM: ``KVM_SET_USER_MEMORY_REGION`` (create, move, flags, delete) and
the dirty log, with the notifiers told of every region that goes (R5, R6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    MoveRefused,
    SlotNotFound,
    SlotOverlap,
)
from pagetrackd.domain.memslots import Slot
from pagetrackd.domain.types import (
    Memslot,
    RegionChange,
    Semantics,
    SlotChange,
    SlotFlags,
)
from pagetrackd.domain.vmstate import VmState

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]


class MemslotOps(VmState):
    """A VM's memslot operations."""

    def set_memslot(
        self, slot_id: int, base_gfn: int, npages: int, flags: SlotFlags = SlotFlags.NONE
    ) -> SlotChange:
        """``KVM_SET_USER_MEMORY_REGION``: create, move, change flags of or delete
        (``npages == 0``) a slot. Returns what it did; NONE if nothing changed."""
        lim = self.limits
        if not 0 <= slot_id < lim.max_slots:
            raise InvalidArgument(
                f"slot id {slot_id} out of range: must be 0..{lim.max_slots - 1}"
            )
        try:
            flags = SlotFlags(flags)
        except ValueError:
            raise InvalidArgument(
                f"unknown memslot flags {flags:#x}: only READONLY and LOG_DIRTY_PAGES exist"
            ) from None
        # int(): ~ on an IntFlag only spans the known bits, so it would let 4 through.
        if int(flags) & ~int(SlotFlags.READONLY | SlotFlags.LOG_DIRTY_PAGES):
            raise InvalidArgument(
                f"unknown memslot flags {int(flags):#x}: only READONLY and LOG_DIRTY_PAGES exist"
            )
        if npages < 0:
            raise InvalidArgument(f"npages must be >= 0, got {npages}")
        old = self.slots.by_id.get(slot_id)
        if npages == 0:
            if old is None:
                raise SlotNotFound(
                    f"slot {slot_id} does not exist; nothing to delete", name=str(slot_id)
                )
            self._delete_slot(old)
            return SlotChange.DELETE
        if not 0 <= base_gfn or base_gfn + npages > lim.gfn_limit:
            raise InvalidArgument(
                f"gfn range {base_gfn:#x}+{npages:#x} exceeds the {lim.gfn_bits}-bit gfn space"
                f" (last gfn {lim.gfn_limit - 1:#x})",
                field="base_gfn",
            )
        if old is not None:
            if npages != old.info.npages:
                raise InvalidArgument(
                    f"slot {slot_id} has {old.info.npages} pages; a live slot cannot change"
                    " size (delete it first)"
                )
            if (flags ^ old.info.flags) & SlotFlags.READONLY:
                raise InvalidArgument(
                    f"slot {slot_id}: READONLY cannot be toggled on a live slot (as in KVM)"
                )
        clash = self.slots.overlapping(base_gfn, npages, slot_id)
        if clash is not None:
            c = clash.info
            raise SlotOverlap(
                f"gfns {base_gfn:#x}..{base_gfn + npages - 1:#x} overlap slot {c.slot_id}"
                f" ({c.base_gfn:#x}..{c.end_gfn - 1:#x})"
            )
        new = Memslot(slot_id, base_gfn, npages, flags)
        if old is None:
            self.slots.by_id[slot_id] = Slot(new)
            self.slots.reindex()
            self.generation += 1
            return SlotChange.CREATE
        if base_gfn != old.info.base_gfn:
            self._move_slot(old, new)
            return SlotChange.MOVE
        if flags == old.info.flags:
            return SlotChange.NONE
        # FLAGS_ONLY keeps the counters (the arch data is shared, R6.2).
        old.info = new
        if flags & SlotFlags.LOG_DIRTY_PAGES:
            if old.dirty is None:
                old.dirty = set()
        else:
            old.dirty = None
        self.generation += 1
        return SlotChange.FLAGS_ONLY

    def _region_gone(
        self, slot: Memslot, change: SlotChange, new_base_gfn: int = 0,
        internal_only: bool = False,
    ) -> None:
        """Tell notifiers that ``slot``'s range is gone. While they are told,
        ``region_change`` says which slot, what change and (MOVE) the new base."""
        self.region_change = RegionChange(slot.slot_id, change, new_base_gfn)
        try:
            self.notifiers.dispatch_remove_region(
                cast("Vm", self), slot.base_gfn, slot.npages, internal_only=internal_only
            )
        finally:
            self.region_change = None

    def _delete_slot(self, slot: Slot) -> None:
        info = slot.info
        if self.semantics is Semantics.V2016:
            # track_flush_slot ran before the memslot update was committed (R5.5).
            self._region_gone(info, SlotChange.DELETE)
            del self.slots.by_id[info.slot_id]
            self.slots.reindex()
        else:
            # track_remove_region runs once the deletion is certain (R5.6).
            del self.slots.by_id[info.slot_id]
            self.slots.reindex()
            self._region_gone(info, SlotChange.DELETE)
        self.stats.notifier_errors = self.notifiers.errors
        self.generation += 1

    def _move_slot(self, slot: Slot, new: Memslot) -> None:
        old = slot.info
        if self.semantics is Semantics.LINUX_6_6:
            if self.notifiers.has_external:
                raise MoveRefused(
                    f"slot {old.slot_id} cannot move while an external notifier is registered"
                    " (linux-6.6 semantics; KVM returns -EINVAL)"
                )
            # The moved slot gets fresh, zeroed counters (R6.3); the shadow MMU is told
            # because KVM zaps the slot's shadow pages.
            self._region_gone(old, SlotChange.MOVE, new.base_gfn, internal_only=True)
            memory = slot.memory
            moved = Slot(new, memory)
            # As KVM: keep the old dirty bitmap if there is one, else start a new one
            # when the move also turns dirty logging on (Slot() made it already).
            if new.flags & SlotFlags.LOG_DIRTY_PAGES and slot.dirty is not None:
                moved.dirty = slot.dirty
            self.slots.by_id[old.slot_id] = moved
        else:
            # 2016: notifiers hear that the old range is gone; counters move with the
            # slot (the seed series' v2 fix).
            self._region_gone(old, SlotChange.MOVE, new.base_gfn)
            slot = self.slots.by_id[old.slot_id]
            # KVMGT's flush_slot removed its own tracking of the range; plugins forget
            # theirs in track_remove_region, so their references are dropped here. The
            # tenant's and leases' references stay with the moved slot.
            for owner in [o for o in slot.tracking.owners if o.startswith("plugin:")]:
                idx, cnt = slot.tracking.owner_arrays(owner)
                slot.tracking.apply(idx, -cnt, owner)
            slot.info = new
            slot.tracking.rebase(new.base_gfn)
            if new.flags & SlotFlags.LOG_DIRTY_PAGES:
                if slot.dirty is None:
                    slot.dirty = set()
            else:
                slot.dirty = None
        self.slots.reindex()
        self.stats.notifier_errors = self.notifiers.errors
        self.generation += 1

    def memslots(self) -> list[Memslot]:
        """Live memslots in gfn order."""
        return [s.info for s in self.slots.slots()]

    def get_dirty_log(self, slot_id: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: the slot's dirty bitmap (bit i = page i, little-endian
        bit order, padded to 64-bit words), then cleared."""
        slot = self.slots.by_id.get(slot_id)
        if slot is None:
            raise SlotNotFound(f"slot {slot_id} does not exist", name=str(slot_id))
        if slot.dirty is None:
            raise FailedPrecondition(
                f"slot {slot_id} does not have LOG_DIRTY_PAGES set; enable it first"
            )
        words = (slot.info.npages + 63) // 64
        bits = np.zeros(words * 64, dtype=np.uint8)
        if slot.dirty:
            bits[np.fromiter(slot.dirty, np.int64, len(slot.dirty))] = 1
        slot.dirty = set()
        return np.packbits(bits, bitorder="little").tobytes()
