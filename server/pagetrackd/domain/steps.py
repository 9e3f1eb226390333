"""Big operations in slices: a batched write or a tracking change checked whole, then
applied a slice at a time, so that the caller can let other work run in between.

Each stays all or nothing, as its one-shot form is: the whole request is checked before
the first slice lands, and a slice cannot fail once it has been. Slices go through the
VM's own methods (``vm.write_batch``, ``vm.track_add``, ``vm.track_remove``), so whatever
wraps those on the instance (the recorder, the quota guard) sees each slice as an
ordinary call. Memory, tracking, events, seqs and counters end up as the one-shot
call leaves them, provided nothing else changes the VM between two slices: that is the
caller's part (the daemon serves one request of a VM at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.arrays import distinct
from pagetrackd.domain.batch import BatchResult, check_batch
from pagetrackd.domain.errors import CounterOverflow, GfnNotInSlot, InvalidArgument, NotTracked
from pagetrackd.domain.track import COUNTER_MAX
from pagetrackd.domain.types import TENANT_OWNER

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm

__all__ = ["BatchSteps", "GfnSet", "TrackSteps", "gfn_set"]

I64 = npt.NDArray[np.int64]


class BatchSteps:
    """A batched write (as ``vm.write_batch``), checked whole, then written a slice of
    writes at a time by :meth:`step`; :meth:`result` is what the one-shot call returns."""

    def __init__(
        self, vm: Vm, gpa: npt.ArrayLike, vcpu: npt.ArrayLike, length: npt.ArrayLike,
        data: bytes,
    ) -> None:
        self.vm = vm
        self.gpa, self.vcpu, self.length = check_batch(vm, gpa, vcpu, length, data)
        self.data = memoryview(data)
        self._ends = np.cumsum(self.length)
        self.done = 0  #: writes written so far
        self._parts: list[tuple[int, BatchResult]] = []

    @property
    def total(self) -> int:
        """Writes in the batch."""
        return int(self.gpa.size)

    @property
    def finished(self) -> bool:
        """Whether every write has been written."""
        return self.done >= self.total

    def step(self, writes: int) -> int:
        """Write the next ``writes`` writes (at least one); returns how many were."""
        a = self.done
        b = min(self.total, a + max(1, writes))
        if a >= b:
            return 0
        start = int(self._ends[a - 1]) if a else 0
        part = self.vm.write_batch(
            self.gpa[a:b], self.vcpu[a:b], self.length[a:b],
            bytes(self.data[start : int(self._ends[b - 1])]),
        )
        self._parts.append((a, part))
        self.done = b
        return b - a

    def result(self) -> BatchResult:
        """The outcome of the whole batch, as ``vm.write_batch`` reports it."""
        if not self._parts:
            empty = np.zeros(0, dtype=np.int64)
            return BatchResult(empty, empty, empty, np.zeros(0, dtype=np.int8), empty)
        parts = [p for _, p in self._parts]
        seqs = [(p.first_seq, p.last_seq) for p in parts if p.first_seq]
        return BatchResult(
            np.concatenate([p.write_index + a for a, p in self._parts]),
            np.concatenate([p.gpa for p in parts]),
            np.concatenate([p.length for p in parts]),
            np.concatenate([p.path for p in parts]),
            np.concatenate([p.seq for p in parts]),
            (
                sum(p.counts[0] for p in parts), sum(p.counts[1] for p in parts),
                sum(p.counts[2] for p in parts),
            ),
            seqs[0][0] if seqs else 0,
            seqs[-1][1] if seqs else 0,
        )


@dataclass(frozen=True, slots=True)
class GfnSet:
    """The gfns of a tracking request: distinct, ascending, and how many times each is
    listed (None when each is listed once). Made by :func:`gfn_set`."""

    gfns: I64
    counts: I64 | None
    #: gfns listed, counting repeats (the references the request adds or drops)
    references: int


def gfn_set(gfns: I64) -> GfnSet:
    """Sort and count the gfns of a tracking request. Pure numpy, no VM: the daemon may
    run it in a worker thread (numpy's sort lets other threads run meanwhile)."""
    arr = np.asarray(gfns, dtype=np.int64).ravel()
    if arr.size and int(arr.min()) < 0:
        raise InvalidArgument("gfns must be >= 0")
    if arr.size < 2 or bool((arr[1:] > arr[:-1]).all()):
        return GfnSet(arr, None, int(arr.size))  # a range or a sorted list: no sort
    distinct, counts = np.unique(arr, return_counts=True)
    once = bool((counts == 1).all())
    return GfnSet(distinct, None if once else counts.astype(np.int64), int(arr.size))


class TrackSteps:
    """Add (``add``) or drop one of ``owner``'s references per listed gfn, as
    ``vm.track_add`` / ``vm.track_remove`` do: :meth:`check` the request a slice of
    gfns at a time (raises, with nothing changed, where the one-shot call would), then
    :meth:`apply` it a slice at a time. ``transitions`` is what the one-shot call
    returns; ``newly_tracked`` (known once checked) how many gfns an add takes from
    0 to 1, for the tracked_gfns quota. Raises GfnNotInSlot at once if a gfn is
    outside every memslot."""

    def __init__(self, vm: Vm, gfns: GfnSet, owner: str = TENANT_OWNER, *, add: bool) -> None:
        vm.check_owner(owner)
        self.vm = vm
        self.set = gfns
        self.owner = owner
        self.add = add
        self.checked = 0  #: distinct gfns checked so far
        self.applied = 0  #: distinct gfns applied so far
        self.transitions = 0
        self.newly_tracked = 0
        self._check_in_slots()

    def _check_in_slots(self) -> None:
        """Raise GfnNotInSlot if any gfn is outside every memslot, as the one-shot call
        does before anything else. The gfns are ascending, so the gfns inside each slot
        are one run found by two binary searches: no pass over the gfns."""
        gfns = self.set.gfns
        inside = 0
        for slot in self.vm.slots.slots():
            lo, hi = np.searchsorted(gfns, [slot.base_gfn, slot.info.end_gfn])
            inside += int(hi - lo)
        if inside < gfns.size:
            pos = self.vm.slots.find_many(gfns)
            outside = np.flatnonzero(pos < 0)
            raise GfnNotInSlot(
                f"gfn {int(gfns[outside[0]]):#x} is not in any memslot ({outside.size} of the"
                " distinct gfns are outside)"
            )

    @property
    def size(self) -> int:
        """Distinct gfns in the request."""
        return int(self.set.gfns.size)

    @property
    def checking(self) -> bool:
        """Whether some gfns are still to be checked."""
        return self.checked < self.size

    @property
    def finished(self) -> bool:
        """Whether every gfn has been checked and applied."""
        return self.applied >= self.size

    def _slice(self, a: int, n: int) -> tuple[int, I64, I64 | int]:
        b = min(self.size, a + max(1, n))
        counts = self.set.counts
        return b, self.set.gfns[a:b], 1 if counts is None else counts[a:b]

    def check(self, n: int) -> None:
        """Check the next ``n`` distinct gfns: each in a memslot, and its counter kept
        within bounds (add) or enough references held by the owner (remove)."""
        b, gfns, cnt = self._slice(self.checked, n)
        vm = self.vm
        pos = vm.slots.find_many(gfns)  # every one is in a slot (checked at the start)
        slots = vm.slots.slots()
        for p in distinct(pos).tolist():
            slot = slots[p]
            mask = pos == p
            idx = gfns[mask] - slot.base_gfn
            want = cnt if isinstance(cnt, int) else cnt[mask]
            if self.add:
                have = slot.tracking.counts(idx).astype(np.int64)
                over = np.flatnonzero(have + want > COUNTER_MAX)
                if over.size:
                    raise CounterOverflow(
                        f"gfn {slot.base_gfn + int(idx[over[0]]):#x}: track counter would"
                        f" pass {COUNTER_MAX} (KVM would WARN and skip; pagetrack refuses)"
                    )
                self.newly_tracked += int(np.count_nonzero(have == 0))
            else:
                held = slot.tracking.held(idx, self.owner)
                short = np.flatnonzero(held < want)
                if short.size:
                    i = int(short[0])
                    asked = want if isinstance(want, int) else int(want[i])
                    raise NotTracked(
                        f"gfn {slot.base_gfn + int(idx[i]):#x}: owner {self.owner!r} holds"
                        f" {int(held[i])} reference(s), cannot remove {asked}"
                    )
        self.checked = b

    def apply(self, n: int) -> None:
        """Apply the next ``n`` distinct gfns; only once every gfn has been checked."""
        if self.checking:
            raise RuntimeError("TrackSteps.apply before the whole request was checked")
        b, gfns, cnt = self._slice(self.applied, n)
        if not isinstance(cnt, int):
            gfns = np.repeat(gfns, cnt)
        change = self.vm.track_add if self.add else self.vm.track_remove
        self.transitions += change(gfns, self.owner)
        self.applied = b
