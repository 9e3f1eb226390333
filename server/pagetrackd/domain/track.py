"""The track pool of one memslot: a ``uint16`` track counter per page, with owners.

Every reference has an owner. References held by leases and plugins are recorded per
owner as runs of pages with the same count (:class:`RunMap`), so a lease over a whole
guest costs a few bytes, not an entry per page; the rest belong to the tenant. So for
every page: ``counter == attributed + tenant references`` and ``attributed == sum of
owner counts``. The counters are :class:`ChunkedCounters` (domain/counters.py), the
large-page counts :class:`RegionCounts` (domain/regions.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.counters import (
    CHUNK,
    CHUNK_SHIFT,
    COUNTER_MAX,
    DICT_BYTES,
    ChunkedCounters,
    distinct_ascending,
    is_span,
)
from pagetrackd.domain.regions import REGION_ENTRY_BYTES, RegionCounts, edges, region_counts
from pagetrackd.domain.runs import RunMap
from pagetrackd.domain.types import TENANT_OWNER

__all__ = ["CHUNK", "COUNTER_MAX", "ChunkedCounters", "RegionCounts", "RunMap", "SlotTracking"]

I64 = npt.NDArray[np.int64]
U16 = npt.NDArray[np.uint16]


class SlotTracking:
    """Track counters, owner records and large-page disallow counts of one slot."""

    __slots__ = (
        "counters", "attributed", "owners", "lpage_2m", "lpage_1g", "base_gfn", "edges"
    )

    def __init__(self, npages: int, base_gfn: int) -> None:
        self.base_gfn = base_gfn
        self.counters = ChunkedCounters(npages)
        #: references held by owners other than the tenant, summed per page
        self.attributed = RunMap()
        #: owner -> its references per page; never holds the tenant or an empty map
        self.owners: dict[str, RunMap] = {}
        #: tracked gfns in each 2 MiB / 1 GiB region the slot overlaps, keyed by
        #: ``(gfn >> 9) - (base_gfn >> 9)`` / ``(gfn >> 18) - (base_gfn >> 18)``; only
        #: regions with tracked gfns
        self.lpage_2m, self.lpage_1g = region_counts(base_gfn, npages)
        #: region indexes (2M, 1G) the slot covers only in part: never huge-mapped
        self.edges: tuple[frozenset[int], frozenset[int]] = edges(base_gfn, npages)

    @property
    def nbytes(self) -> int:
        """Bytes held by the counters, the owner records and the region counts."""
        n = self.counters.nbytes + self.attributed.nbytes
        n += sum(r.nbytes for r in self.owners.values())
        return n + self.lpage_2m.nbytes + self.lpage_1g.nbytes

    @property
    def footprint(self) -> int:
        """Bytes really held (what :attr:`nbytes` counts)."""
        return self.nbytes

    def growth_bound(self, index: I64, owner: str) -> int:
        """At most how many bytes :attr:`footprint` grows by when ``owner`` adds a
        reference to each of the distinct, ascending pages ``index``: checked against a
        quota before anything changes."""
        if not index.size:
            return 0
        if is_span(index):
            # a range: its chunks and regions follow from its ends
            lo, hi = int(index[0]), int(index[-1])
            chunks = np.arange(lo >> CHUNK_SHIFT, (hi >> CHUNK_SHIFT) + 1, dtype=np.int64)
            g0, g1 = lo + self.base_gfn, hi + self.base_gfn
            regions = (g1 >> 9) - (g0 >> 9) + 1 + (g1 >> 18) - (g0 >> 18) + 1
        else:
            chunks = distinct_ascending(index >> CHUNK_SHIFT)
            gfns = index + self.base_gfn
            regions = distinct_ascending(gfns >> 9).size + distinct_ascending(gfns >> 18).size
        grow = self.counters.growth_bound(chunks)
        grow += 2 * REGION_ENTRY_BYTES * regions  # entries, and the tables' growth
        grow += DICT_BYTES * ((not self.lpage_2m) + (not self.lpage_1g))
        if owner != TENANT_OWNER:
            # Each break in the pages may split a run of the owner's and of the summed
            # map in two: three 8-byte arrays, two maps.
            runs = 1 if is_span(index) else 1 + int(np.count_nonzero(np.diff(index) != 1))
            grow += 2 * 3 * 8 * (2 * runs + 1)
        return grow

    def counts(self, index: I64) -> U16:
        """The counters of the distinct, ascending pages ``index``."""
        if is_span(index):
            return self.counters.get_span(int(index[0]), int(index[-1]) + 1)
        return self.counters.get(index)

    def _set_counts(self, index: I64, values: U16) -> None:
        if is_span(index):
            self.counters.set_span(int(index[0]), values)
        else:
            self.counters.set(index, values)

    def held(self, index: I64, owner: str) -> I64:
        """References ``owner`` holds on each of the distinct, ascending pages ``index``."""
        if owner == TENANT_OWNER:
            out: I64 = self.counts(index).astype(np.int64)
            if len(self.attributed):
                out -= self.attributed.counts_of(index)
            return out
        refs = self.owners.get(owner)
        if refs is None:
            return np.zeros(index.shape, dtype=np.int64)
        return refs.counts_of(index)

    def held1(self, index: int, owner: str) -> int:
        """References ``owner`` holds on one page."""
        if owner == TENANT_OWNER:
            return self.counters.get1(index) - self.attributed.get1(index)
        refs = self.owners.get(owner)
        return 0 if refs is None else refs.get1(index)

    def apply(self, index: I64, delta: I64 | int, owner: str) -> tuple[I64, I64]:
        """Add ``delta`` references (one count per page, or the same for all) for
        ``owner`` to the distinct, ascending pages ``index``.

        The caller has checked the bounds. Returns the pages that became tracked and
        the pages that became untracked.
        """
        empty = np.zeros(0, dtype=np.int64)
        if index.size == 0:
            return empty, empty
        before = self.counts(index)
        if isinstance(delta, int):
            # One delta for all: uint16 arithmetic (the caller kept it in bounds) and
            # one mask, so a 16M-page range makes few temporaries.
            if delta >= 0:
                after = before + np.uint16(delta)
                started = self._where(index, before == 0) if delta else empty
                stopped = empty
            else:
                after = before - np.uint16(-delta)
                started = empty
                stopped = self._where(index, before == -delta)
        else:
            # int32 holds every counter plus any delta the caller let through
            wide = before.astype(np.int32) + delta.astype(np.int32)
            after = wide.astype(np.uint16)
            started = index[(before == 0) & (wide > 0)]
            stopped = index[(before > 0) & (wide == 0)]
        self._set_counts(index, after)
        if owner != TENANT_OWNER:
            refs = self.owners.setdefault(owner, RunMap())
            refs.add(index, delta)
            self.attributed.add(index, delta)
            if not len(refs):
                del self.owners[owner]
        self._count_lpages(started, +1)
        self._count_lpages(stopped, -1)
        return started, stopped

    @staticmethod
    def _where(index: I64, mask: npt.NDArray[np.bool_]) -> I64:
        """The pages of ``index`` where ``mask`` holds."""
        if is_span(index):
            out: I64 = np.flatnonzero(mask) + index[0]
            return out
        return index[mask]

    def apply1(self, index: int, delta: int, owner: str) -> tuple[bool, bool]:
        """:meth:`apply` for one page: whether it became tracked, or untracked."""
        before = self.counters.get1(index)
        after = before + delta
        self.counters.set1(index, after)
        if owner != TENANT_OWNER:
            refs = self.owners.setdefault(owner, RunMap())
            refs.add1(index, delta)
            self.attributed.add1(index, delta)
            if not len(refs):
                del self.owners[owner]
        started = before == 0 and after > 0
        stopped = before > 0 and after == 0
        if started or stopped:
            base = self.base_gfn
            gfn = index + base
            step = 1 if started else -1
            for regions, key in (
                (self.lpage_2m, (gfn >> 9) - (base >> 9)),
                (self.lpage_1g, (gfn >> 18) - (base >> 18)),
            ):
                n = regions.get(key, 0) + step
                if n:
                    regions[key] = n
                else:
                    del regions[key]
        return started, stopped

    def lpage_disallowed(self, gfn: int) -> tuple[bool, bool]:
        """Whether the 2 MiB and the 1 GiB mapping that hold ``gfn`` (a gfn of this slot)
        are disallowed: a tracked gfn in the region (R3.1), or the slot covers only part
        of the region (R3.5), which holds from creation whatever is tracked."""
        base = self.base_gfn
        i2, i1 = (gfn >> 9) - (base >> 9), (gfn >> 18) - (base >> 18)
        edge_2m, edge_1g = self.edges
        return (
            i2 in self.lpage_2m or i2 in edge_2m,
            i1 in self.lpage_1g or i1 in edge_1g,
        )

    def _count_lpages(self, index: I64, step: int) -> None:
        """Count the distinct, ascending pages ``index`` in (or out of) their regions."""
        if index.size == 0:
            return
        for regions, shift in ((self.lpage_2m, 9), (self.lpage_1g, 18)):
            # The pages are ascending: each region's share is the distance between two
            # searchsorted edges, so the cost follows the regions touched, not the pages.
            first = (self.base_gfn >> shift) << shift
            r0 = (int(index[0]) + self.base_gfn - first) >> shift
            r1 = ((int(index[-1]) + self.base_gfn - first) >> shift) + 1
            edges = first - self.base_gfn + (np.arange(r0, r1 + 1, dtype=np.int64) << shift)
            per = np.diff(np.searchsorted(index, edges))
            touched = np.flatnonzero(per)
            regions.add_many(touched + r0, per[touched] * step)

    def rebase(self, base_gfn: int) -> None:
        """The slot moved: recompute the region counts for its new base."""
        self.base_gfn = base_gfn
        self.edges = edges(base_gfn, self.counters.npages)
        self.lpage_2m, self.lpage_1g = region_counts(base_gfn, self.counters.npages)
        self._count_lpages(self.counters.nonzero_indices(), +1)

    def owners_of(self, index: int) -> dict[str, int]:
        """Owner -> references for one page, the tenant's share included."""
        out = {}
        attributed = 0
        for o, refs in self.owners.items():
            n = refs.get1(index)
            if n:
                out[o] = n
                attributed += n
        tenant = self.counters.get1(index) - attributed
        if tenant:
            out[TENANT_OWNER] = tenant
        return out

    def owner_arrays(self, owner: str) -> tuple[I64, I64]:
        """(ascending page indexes, references) held by a non-tenant owner."""
        refs = self.owners.get(owner)
        if refs is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return refs.pages()

    def owner_pages(self, owner: str) -> Iterable[tuple[int, int]]:
        """(page index, references) pairs held by a non-tenant owner."""
        idx, cnt = self.owner_arrays(owner)
        return list(zip(idx.tolist(), cnt.tolist(), strict=True))
