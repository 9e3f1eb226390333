"""The state every part of a VM works on, and its counters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.cost import CostModel
from pagetrackd.domain.errors import (
    InvalidArgument,
)
from pagetrackd.domain.memslots import MemslotTable
from pagetrackd.domain.notifiers import Notifier, NotifierList, NotifierNode
from pagetrackd.domain.types import (
    DmaPolicy,
    RegionChange,
    Semantics,
    VmLimits,
    WritePath,
)
from pagetrackd.limits import DEFAULT_VCPUS, MAX_VCPUS

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]


@dataclass(slots=True)
class VmStats:
    """Counters of one VM since it was created."""

    writes: int = 0  #: guest write calls (a batch counts each write)
    pieces: list[int] = field(default_factory=lambda: [0, 0, 0])  #: by WritePath
    bytes_written: int = 0  #: bytes that reached guest memory from the guest
    dma_writes: int = 0  #: DMA calls that wrote
    dma_applied: int = 0  #: DMA pieces written to untracked RAM
    dma_bypassed: int = 0  #: DMA pieces written to tracked gfns, nobody told (bypass)
    dma_notified: int = 0  #: DMA pieces written to tracked gfns and notified (notify)
    dma_rejected: int = 0  #: DMA calls refused by the reject policy
    notifications: int = 0  #: notifier calls, one per event per notifier
    notifier_errors: int = 0
    cycles: list[int] = field(default_factory=lambda: [0, 0, 0])  #: by WritePath
    dma_cycles: int = 0
    vcpu_cycles: dict[int, int] = field(default_factory=dict)

    @property
    def mmio_exits(self) -> int:
        """Pieces that exited to user space (not applied)."""
        return self.pieces[WritePath.MMIO_EXIT]

    @property
    def emulations(self) -> int:
        """Pieces that were trapped, emulated and notified."""
        return self.pieces[WritePath.EMULATED]

    @property
    def fast_writes(self) -> int:
        """Pieces applied natively."""
        return self.pieces[WritePath.FAST]


class VmState:
    """What a VM holds: its configuration, memslots (with their memory and track
    pools), notifiers, counters and seq. The VM's jobs are the subclasses
    (domain/memslot_ops.py, tracking.py, guest.py) and domain/batch.py."""

    # Slots, so the write path's attribute reads and writes (seq, notifiers, slots, ...)
    # stay fast on every VM: the daemon puts per-VM wrappers in the instance dict
    # (quota_guard.py, the recorder in replay.py), which in CPython 3.11 makes reads of
    # dict-held attributes take the slow, unspecialized path (some 2% of a tracked write).
    __slots__ = (
        "name", "vcpus", "dma_policy", "semantics", "cost", "limits", "slots", "notifiers",
        "stats", "seq", "_generation", "on_change", "closed", "region_change",
        "track_start_hooks", "__dict__", "__weakref__",
    )

    def __init__(
        self,
        name: str,
        *,
        vcpus: int = DEFAULT_VCPUS,
        dma_policy: DmaPolicy = DmaPolicy.BYPASS,
        semantics: Semantics = Semantics.V2016,
        cost: CostModel | None = None,
        limits: VmLimits | None = None,
    ) -> None:
        if not 1 <= vcpus <= MAX_VCPUS:
            raise InvalidArgument(f"vcpus must be between 1 and {MAX_VCPUS}, got {vcpus}")
        self.name = name
        self.vcpus = vcpus
        self.dma_policy = dma_policy
        self.semantics = semantics
        self.cost = cost or CostModel()
        self.limits = limits or VmLimits()
        self.slots = MemslotTable()
        self.notifiers = NotifierList()
        self.stats = VmStats()
        #: seq of the last event; the next event gets seq + 1 (gap-free, R-stream)
        self.seq = 0
        self._generation = 0
        #: called (with the VM) whenever :attr:`generation` moves and on every call that
        #: may write guest memory: the daemon keeps per-tenant totals (memslot pages,
        #: tracked gfns, bytes held) without scanning its VMs
        self.on_change: Callable[[Vm], None] | None = None
        self.closed = False
        #: set only while notifiers hear of a removed region: which slot and change
        self.region_change: RegionChange | None = None
        #: called with the gfns whose counter just went 0 -> 1, inside track_add: the
        #: shadow MMU write-protects every SPTE mapping them, as KVM's add does by a
        #: direct call (R3.1, arch/x86/kvm/mmu/page_track.c __kvm_write_track_add_gfn ->
        #: kvm_mmu_slot_gfn_write_protect)
        self.track_start_hooks: list[Callable[[list[int]], None]] = []

    @property
    def generation(self) -> int:
        """Bumped whenever tracking or memslots change, so a batch in progress knows its
        classification is stale."""
        return self._generation

    @generation.setter
    def generation(self, value: int) -> None:
        self._generation = value
        if self.on_change is not None:
            self.on_change(cast("Vm", self))

    # ------------------------------------------------------------------ notifiers

    def register_notifier(self, notifier: Notifier) -> NotifierNode:
        """``kvm_page_track_register_notifier``: insert at the head (called first)."""
        return self.notifiers.register(notifier)

    def unregister_notifier(self, node: NotifierNode) -> bool:
        """Unregister; after it returns the notifier is never called again (R5.2)."""
        return self.notifiers.unregister(node)

    @property
    def memory_bytes(self) -> int:
        """Bytes of guest memory held (written data only)."""
        return sum(s.memory.nbytes for s in self.slots.slots())

    @property
    def counter_bytes(self) -> int:
        """Bytes held by track counters."""
        return sum(s.tracking.nbytes for s in self.slots.slots())

    @property
    def memory_footprint(self) -> int:
        """Bytes guest memory really holds: written data and what indexes it."""
        return sum(s.memory.footprint for s in self.slots.slots())

    @property
    def tracking_footprint(self) -> int:
        """Bytes track counters, region counts and owner records really hold."""
        return sum(s.tracking.footprint for s in self.slots.slots())

    def set_policy(
        self,
        *,
        dma_policy: DmaPolicy | None = None,
        semantics: Semantics | None = None,
        cost: CostModel | None = None,
    ) -> None:
        """Change the VM's policies; unset arguments stay as they are."""
        if dma_policy is not None:
            self.dma_policy = dma_policy
        if semantics is not None:
            self.semantics = semantics
        if cost is not None:
            self.cost = cost
