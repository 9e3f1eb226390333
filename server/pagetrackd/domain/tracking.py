"""Write tracking of a VM: add and remove references per owner, all or none, and
what the track pool holds (R1-R3).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.arrays import distinct
from pagetrackd.domain.errors import (
    CounterOverflow,
    GfnNotInSlot,
    InvalidArgument,
    NotTracked,
)
from pagetrackd.domain.memslots import Slot
from pagetrackd.domain.track import COUNTER_MAX
from pagetrackd.domain.types import (
    TENANT_OWNER,
    TrackInfo,
)
from pagetrackd.domain.vmstate import VmState

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

_OWNER_RE = re.compile(r"^[a-z][a-z0-9_.:/-]{0,127}$")
#: gfns one tracking call may name, counting every gfn of every range
MAX_GFNS_PER_CALL = 1 << 25


def gfns_from(ranges: Iterable[tuple[int, int]] = (), gfns: Iterable[int] = ()) -> I64:
    """One array of gfns from ``(start, count)`` ranges and a list, in the given order.

    Raises InvalidArgument for negative values or more than MAX_GFNS_PER_CALL gfns.
    """
    parts: list[I64] = []
    total = 0
    for start, count in ranges:
        if start < 0 or count <= 0:
            raise InvalidArgument(
                f"gfn range start={start} count={count}: start must be >= 0 and count > 0",
                field="ranges",
            )
        total += count
        if total > MAX_GFNS_PER_CALL:
            raise InvalidArgument(f"a call may name at most {MAX_GFNS_PER_CALL} gfns")
        parts.append(np.arange(start, start + count, dtype=np.int64))
    listed = np.fromiter(gfns, dtype=np.int64) if not isinstance(gfns, np.ndarray) else gfns
    if listed.size:
        if (listed < 0).any():
            raise InvalidArgument("gfns must be >= 0")
        total += listed.size
        if total > MAX_GFNS_PER_CALL:
            raise InvalidArgument(f"a call may name at most {MAX_GFNS_PER_CALL} gfns")
        parts.append(listed.astype(np.int64, copy=False))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class TrackingOps(VmState):
    """A VM's tracking operations."""

    def check_owner(self, owner: str) -> None:
        """Raise InvalidArgument unless ``owner`` is a valid owner id."""
        if not _OWNER_RE.match(owner):
            raise InvalidArgument(
                f"owner {owner!r} is not valid: 1-128 chars, lowercase letters, digits and _.:/-"
                ", starting with a letter"
            )

    def _group(self, gfns: I64) -> list[tuple[Slot, I64, I64 | int]]:
        """Split gfns by slot: (slot, distinct ascending page indexes, occurrences of
        each, or 1 when every gfn is listed once)."""
        if gfns.size == 0:
            return []
        if int(gfns.min()) < 0:
            raise InvalidArgument("gfns must be >= 0")
        slot = self.slots.find(int(gfns[0]))
        if (
            slot is not None
            and int(gfns[-1]) < slot.info.end_gfn
            and (gfns.size == 1 or bool((gfns[1:] > gfns[:-1]).all()))
        ):
            # Ascending and distinct within one slot (a range, or a sorted list): no
            # sort, no per-gfn counts, however many gfns.
            return [(slot, gfns - slot.base_gfn if slot.base_gfn else gfns, 1)]
        pos = self.slots.find_many(gfns)
        outside = np.flatnonzero(pos < 0)
        if outside.size:
            g = int(gfns[outside[0]])
            raise GfnNotInSlot(
                f"gfn {g:#x} is not in any memslot ({outside.size} of the gfns are outside)"
            )
        slots = self.slots.slots()
        out: list[tuple[Slot, I64, I64 | int]] = []
        for p in distinct(pos).tolist():
            slot = slots[p]
            idx, counts = np.unique(gfns[pos == p] - slot.base_gfn, return_counts=True)
            out.append((slot, idx, counts.astype(np.int64)))
        return out

    def _single_gfn(self, gfns: I64 | Sequence[int]) -> tuple[Slot, int] | None:
        """For a list of exactly one int gfn: its slot and page index, checked as
        :meth:`_group` checks (same errors); None for anything else (the array path)."""
        if type(gfns) is not list or len(gfns) != 1 or type(gfns[0]) is not int:
            return None
        gfn = gfns[0]
        if gfn < 0:
            raise InvalidArgument("gfns must be >= 0")
        slot = self.slots.find(gfn)
        if slot is None:
            raise GfnNotInSlot(
                f"gfn {gfn:#x} is not in any memslot (1 of the gfns are outside)"
            )
        return slot, gfn - slot.base_gfn

    def track_add(self, gfns: I64 | Sequence[int], owner: str = TENANT_OWNER) -> int:
        """Add one reference per listed gfn (a gfn listed twice gets two), all or none.

        Returns how many gfns became tracked (0 -> 1). The first reference
        write-protects the gfn and disallows 2M/1G mappings over it (R3.1).
        Raises GfnNotInSlot (KVM: -EINVAL, R2.3) or CounterOverflow (KVM WARNs and
        skips, R1.3; we refuse and change nothing).
        """
        self.check_owner(owner)
        one = self._single_gfn(gfns)
        if one is not None:
            tracking, i1 = one[0].tracking, one[1]
            if tracking.counters.get1(i1) + 1 > COUNTER_MAX:
                raise CounterOverflow(
                    f"gfn {one[0].base_gfn + i1:#x}: track counter would pass {COUNTER_MAX}"
                    " (KVM would WARN and skip; pagetrack refuses)"
                )
            started1, _ = tracking.apply1(i1, 1, owner)
            self.generation += 1
            if started1 and self.track_start_hooks:
                self._tracking_started([one[0].base_gfn + i1])
            return int(started1)
        arr = np.asarray(gfns, dtype=np.int64)
        groups = self._group(arr)
        for slot, idx, cnt in groups:
            counts = slot.tracking.counts(idx)
            top = int(counts.max()) + (cnt if isinstance(cnt, int) else int(cnt.max()))
            if top <= COUNTER_MAX:
                continue
            over = np.flatnonzero(counts.astype(np.int64) + cnt > COUNTER_MAX)
            if over.size:
                g = slot.base_gfn + int(idx[over[0]])
                raise CounterOverflow(
                    f"gfn {g:#x}: track counter would pass {COUNTER_MAX}"
                    " (KVM would WARN and skip; pagetrack refuses)"
                )
        started = 0
        new: list[int] = []
        for slot, idx, cnt in groups:
            s, _ = slot.tracking.apply(idx, cnt, owner)
            started += int(s.size)
            if s.size and self.track_start_hooks:
                new += (s + slot.base_gfn).tolist()
        if groups:
            self.generation += 1
        if new:
            self._tracking_started(new)
        return started

    def _tracking_started(self, gfns: list[int]) -> None:
        for hook in list(self.track_start_hooks):
            hook(gfns)

    def track_remove(self, gfns: I64 | Sequence[int], owner: str = TENANT_OWNER) -> int:
        """Drop one of ``owner``'s references per listed gfn, all or none.

        Returns how many gfns became untracked (1 -> 0). Write access then comes back
        lazily and large pages are allowed again (R3.2). Raises NotTracked when the
        owner holds fewer references than asked (KVM WARNs on 0 and ignores, R2.4).
        """
        self.check_owner(owner)
        one = self._single_gfn(gfns)
        if one is not None:
            tracking, i1 = one[0].tracking, one[1]
            held1 = tracking.held1(i1, owner)
            if held1 < 1:
                raise NotTracked(
                    f"gfn {one[0].base_gfn + i1:#x}: owner {owner!r} holds {held1}"
                    " reference(s), cannot remove 1"
                )
            _, stopped1 = tracking.apply1(i1, -1, owner)
            self.generation += 1
            return int(stopped1)
        arr = np.asarray(gfns, dtype=np.int64)
        groups = self._group(arr)
        for slot, idx, cnt in groups:
            held = slot.tracking.held(idx, owner)
            short = np.flatnonzero(held < cnt)
            if short.size:
                i = int(short[0])
                g = slot.base_gfn + int(idx[i])
                want = cnt if isinstance(cnt, int) else int(cnt[i])
                raise NotTracked(
                    f"gfn {g:#x}: owner {owner!r} holds {int(held[i])} reference(s),"
                    f" cannot remove {want}"
                )
        stopped = 0
        for slot, idx, cnt in groups:
            _, s = slot.tracking.apply(idx, -cnt, owner)
            stopped += int(s.size)
        if groups:
            self.generation += 1
        return stopped

    def release_owner(self, owner: str) -> int:
        """Drop every reference ``owner`` holds (a lease ended). Returns gfns untracked."""
        if owner == TENANT_OWNER:
            raise InvalidArgument("the tenant's references are not released as a whole")
        stopped = 0
        for slot in self.slots.slots():
            if owner not in slot.tracking.owners:
                continue
            idx, cnt = slot.tracking.owner_arrays(owner)
            if not idx.size:
                continue
            _, s = slot.tracking.apply(idx, -cnt, owner)
            stopped += int(s.size)
            self.generation += 1
        return stopped

    def is_tracked(self, gfn: int) -> bool:
        """``kvm_gfn_is_write_tracked``: false outside memslots (R1.5)."""
        slot = self.slots.find(gfn)
        return slot is not None and slot.tracking.counters.get1(gfn - slot.base_gfn) > 0

    def track_query(self, gfns: Iterable[int]) -> list[TrackInfo]:
        """What the track pool knows of each gfn (a gfn outside memslots: all zero)."""
        out = []
        for gfn in gfns:
            slot = self.slots.find(gfn)
            if slot is None:
                out.append(TrackInfo(gfn, 0))
                continue
            t = slot.tracking
            i = gfn - slot.base_gfn
            count = t.counters.get1(i)
            lpage_2m, lpage_1g = t.lpage_disallowed(gfn)
            out.append(
                TrackInfo(
                    gfn,
                    count,
                    t.owners_of(i) if count else {},
                    write_protected=count > 0,
                    lpage_disallowed_2m=lpage_2m,
                    lpage_disallowed_1g=lpage_1g,
                )
            )
        return out

    def tracked_gfns(self, owner: str | None = None) -> I64:
        """Every tracked gfn ascending, or those ``owner`` holds a reference on."""
        parts = []
        for slot in self.slots.slots():
            t = slot.tracking
            if owner is None:
                idx = t.counters.nonzero_indices()
            elif owner == TENANT_OWNER:
                idx = t.counters.nonzero_indices()
                idx = idx[t.held(idx, owner) > 0]
            else:
                idx = t.owner_arrays(owner)[0]
            parts.append(idx + slot.base_gfn)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def owner_references(self, owner: str) -> int:
        """Tracking references a non-tenant owner (a lease or a plugin) holds in this VM."""
        return sum(
            refs.total()
            for s in self.slots.slots()
            if (refs := s.tracking.owners.get(owner)) is not None
        )

    @property
    def tracked_count(self) -> int:
        """Number of gfns whose counter is > 0."""
        return sum(s.tracking.counters.nonzero for s in self.slots.slots())

    def tracking_growth_bound(self, gfns: I64, owner: str = TENANT_OWNER) -> int:
        """At most how many bytes :attr:`tracking_footprint` grows by if ``owner`` tracks
        ``gfns``: checked against a quota first."""
        if gfns.size > 1 and not bool((gfns[1:] > gfns[:-1]).all()):
            gfns = distinct(gfns)  # a range or a sorted list needs no sort
        if not gfns.size:
            return 0
        one = self.slots.find(int(gfns[0]))
        if one is not None and int(gfns[-1]) < one.info.end_gfn:
            base = one.base_gfn
            return one.tracking.growth_bound(gfns - base if base else gfns, owner)
        pos = self.slots.find_many(gfns)
        slots = self.slots.slots()
        grow = 0
        for p in distinct(pos[pos >= 0]).tolist():
            slot = slots[p]
            grow += slot.tracking.growth_bound(gfns[pos == p] - slot.base_gfn, owner)
        return grow
