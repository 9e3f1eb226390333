"""Memslots of one VM: lookup by gfn, one at a time or in bulk."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.memory import SlotMemory
from pagetrackd.domain.track import SlotTracking
from pagetrackd.domain.types import Memslot, SlotFlags


@dataclass(slots=True, eq=False)
class Slot:
    """A live memslot with what hangs off it: memory, track pool and dirty log."""

    info: Memslot
    memory: SlotMemory = field(default_factory=SlotMemory)
    tracking: SlotTracking = field(init=False)
    #: page indexes written since the last dirty-log read (LOG_DIRTY_PAGES only)
    dirty: set[int] | None = None

    def __post_init__(self) -> None:
        self.tracking = SlotTracking(self.info.npages, self.info.base_gfn)
        if self.info.flags & SlotFlags.LOG_DIRTY_PAGES:
            self.dirty = set()

    @property
    def base_gfn(self) -> int:
        """First gfn of the slot."""
        return self.info.base_gfn

    @property
    def readonly(self) -> bool:
        """Whether guest writes to the slot exit as MMIO."""
        # int() first: IntFlag's own ``&`` costs about 10x more, and this is on the write path.
        return bool(int(self.info.flags) & _READONLY)


_READONLY = int(SlotFlags.READONLY)


class MemslotTable:
    """The slots of a VM, sorted by base gfn; never overlapping."""

    __slots__ = ("by_id", "_sorted", "_bases", "_ends", "_np_bases", "_np_ends")

    def __init__(self) -> None:
        self.by_id: dict[int, Slot] = {}
        self._sorted: list[Slot] = []
        self._bases: list[int] = []
        self._ends: list[int] = []
        self._np_bases = np.zeros(0, dtype=np.int64)
        self._np_ends = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.by_id)

    def slots(self) -> list[Slot]:
        """Slots in base-gfn order."""
        return list(self._sorted)

    def reindex(self) -> None:
        """Rebuild the lookup arrays after a slot was added, moved or removed."""
        self._sorted = sorted(self.by_id.values(), key=lambda s: s.info.base_gfn)
        self._bases = [s.info.base_gfn for s in self._sorted]
        self._ends = [s.info.end_gfn for s in self._sorted]
        self._np_bases = np.array(self._bases, dtype=np.int64)
        self._np_ends = np.array(self._ends, dtype=np.int64)

    def find(self, gfn: int) -> Slot | None:
        """The slot holding ``gfn``, if any."""
        i = bisect.bisect_right(self._bases, gfn) - 1
        if i >= 0 and gfn < self._ends[i]:
            return self._sorted[i]
        return None

    def holding(self, lo: int, hi: int) -> int:
        """The position (in :meth:`slots` order) of the slot holding every gfn from
        ``lo`` to ``hi``, or -1 if no one slot does."""
        i = bisect.bisect_right(self._bases, lo) - 1
        return i if i >= 0 and hi < self._ends[i] else -1

    def find_many(self, gfns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """For each gfn, the position of its slot in :meth:`slots` order, or -1."""
        if gfns.size:
            # All in one slot (the common case)? Slots are contiguous ranges, so it is
            # enough that the lowest and the highest gfn are in the same slot.
            i = self.holding(int(gfns.min()), int(gfns.max()))
            if i >= 0:
                return np.full(gfns.shape, i, dtype=np.int64)
        pos = np.searchsorted(self._np_bases, gfns, side="right").astype(np.int64) - 1
        if len(self._sorted) == 0:
            return pos
        safe = np.maximum(pos, 0)
        inside = (pos >= 0) & (gfns < self._np_ends[safe])
        return np.where(inside, pos, -1)

    def overlapping(self, base_gfn: int, npages: int, skip: int | None) -> Slot | None:
        """A slot other than ``skip`` that overlaps ``[base_gfn, base_gfn + npages)``."""
        for slot in self._sorted:
            if slot.info.slot_id == skip:
                continue
            if slot.info.base_gfn < base_gfn + npages and base_gfn < slot.info.end_gfn:
                return slot
        return None
