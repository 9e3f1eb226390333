"""A simulated VM: memslots, guest memory, the track pool, the write path and notifiers.

Every method either completes or raises a :class:`PageTrackError` having changed
nothing. The rules follow KVM x86; rule ids like R4.4 below are those of
docs/kvm-rules.md, which names the kernel source of each.

The VM's jobs live in their own modules; :class:`Vm` puts them together:

* domain/vmstate.py -- what a VM holds (configuration, memslots, notifiers, counters);
* domain/memslot_ops.py -- memslots and the dirty log;
* domain/tracking.py -- write tracking (add, remove, release, query);
* domain/guest.py -- single guest accesses: write, cmpxchg, read, DMA;
* domain/batch.py -- the batch write engine;
* domain/notifiers.py -- who is told of every write, and how.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pagetrackd.domain import batch
from pagetrackd.domain.batch import MAX_BATCH_WRITES, BatchResult
from pagetrackd.domain.guest import GuestAccess
from pagetrackd.domain.memslot_ops import MemslotOps
from pagetrackd.domain.memslots import MemslotTable
from pagetrackd.domain.tracking import MAX_GFNS_PER_CALL, TrackingOps, gfns_from
from pagetrackd.domain.types import SlotChange
from pagetrackd.domain.vmstate import VmStats

__all__ = ["MAX_BATCH_WRITES", "MAX_GFNS_PER_CALL", "BatchResult", "Vm", "VmStats", "gfns_from"]

I64 = npt.NDArray[np.int64]


class Vm(MemslotOps, TrackingOps, GuestAccess):
    """One simulated VM. Not thread-safe: the daemon drives it from one event loop."""

    def write_batch(
        self,
        gpa: npt.ArrayLike,
        vcpu: npt.ArrayLike,
        length: npt.ArrayLike,
        data: bytes,
    ) -> BatchResult:
        """Many guest writes in one call: write i is ``length[i]`` bytes of ``data``
        (concatenated in order) at ``gpa[i]`` from ``vcpu[i]``.

        The outcome, guest memory and events equal those of calling :meth:`write` for
        each in order (see :func:`pagetrackd.domain.batch.write_batch`).
        """
        return batch.write_batch(self, gpa, vcpu, length, data)

    def memory_growth_bound(self, gpa: I64, length: I64) -> int:
        """At most how many bytes :attr:`memory_footprint` grows by if the guest writes
        ``length[i]`` bytes at ``gpa[i]`` (any path): checked against a quota first."""
        return batch.memory_growth_bound(self, gpa, length)

    def close(self) -> None:
        """Delete the VM: every notifier hears that every region is gone, then is
        unregistered (plugins detach); then memory, counters and slots are freed."""
        if self.closed:
            return
        for slot in self.slots.slots():
            self._region_gone(slot.info, SlotChange.DELETE)
        self.notifiers.dispatch_vm_closed(self)
        self.stats.notifier_errors = self.notifiers.errors
        self.slots = MemslotTable()
        self.closed = True
        self.generation += 1
