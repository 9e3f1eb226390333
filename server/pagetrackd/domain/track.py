"""The track pool of one memslot: a ``uint16`` track counter per page, with owners.

Counters live in chunks of :data:`CHUNK` pages allocated on first use, so a huge slot
with a few tracked pages costs a small directory and a few chunks (KVM allocates the
whole array when the slot is created; this is where the simulator saves memory).

Every reference has an owner. References held by leases and plugins are recorded per
owner; the rest belong to the tenant. So for every page:
``counter == attributed + tenant references`` and ``attributed == sum of owner counts``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.types import TENANT_OWNER

CHUNK_SHIFT = 5
CHUNK = 1 << CHUNK_SHIFT
COUNTER_MAX = 0xFFFF  #: USHRT_MAX, KVM's bound on a track counter

I64 = npt.NDArray[np.int64]


class ChunkedCounters:
    """``npages`` ``uint16`` counters, all zero until written, stored in chunks.

    Row 0 of the chunk pool is a permanent row of zeros that every missing chunk
    points at, so reads need no masking.
    """

    __slots__ = ("npages", "_dir", "_rows", "_nrows", "nonzero", "_dir_mv", "_rows_mv")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self._dir: npt.NDArray[np.unsignedinteger] | None = None
        self._rows = np.zeros((1, CHUNK), dtype=np.uint16)
        self._nrows = 1
        self.nonzero = 0  #: number of pages whose counter is > 0
        # Flat memoryviews of _dir and _rows for get1: indexing them yields Python ints
        # several times faster than numpy scalar indexing. Rebuilt whenever either array
        # is replaced (see _views).
        self._dir_mv: memoryview | None = None
        self._rows_mv = self._rows.reshape(-1).data

    def _views(self) -> None:
        assert self._dir is not None
        self._dir_mv = self._dir.data
        self._rows_mv = self._rows.reshape(-1).data

    @property
    def nbytes(self) -> int:
        """Bytes held by the directory and the chunks."""
        d = 0 if self._dir is None else self._dir.nbytes
        return d + self._rows.nbytes

    def get1(self, index: int) -> int:
        """The counter of one page."""
        d = self._dir_mv
        if d is None:
            return 0
        row: int = d[index >> CHUNK_SHIFT]
        value: int = self._rows_mv[(row << CHUNK_SHIFT) | (index & (CHUNK - 1))]
        return value

    def get(self, index: I64) -> npt.NDArray[np.uint16]:
        """The counters of many pages (any order, repeats allowed)."""
        if self._dir is None:
            return np.zeros(index.shape, dtype=np.uint16)
        # A flat take: several times faster than two-dimensional fancy indexing.
        rows = self._dir.take(index >> CHUNK_SHIFT).astype(np.int64)
        out: npt.NDArray[np.uint16] = self._rows.reshape(-1).take(
            (rows << CHUNK_SHIFT) | (index & (CHUNK - 1))
        )
        return out

    def _ensure_chunks(self, index: I64) -> None:
        if self._dir is None:
            self._dir = np.zeros((self.npages + CHUNK - 1) >> CHUNK_SHIFT, dtype=np.uint16)
        chunks = np.unique(index >> CHUNK_SHIFT)
        missing = chunks[self._dir[chunks] == 0]
        if missing.size == 0:
            return
        need = self._nrows + missing.size
        if need - 1 > np.iinfo(self._dir.dtype).max:
            self._dir = self._dir.astype(np.uint32)
        if need > self._rows.shape[0]:
            cap = max(need, self._rows.shape[0] + self._rows.shape[0] // 4 + 8)
            grown = np.zeros((cap, CHUNK), dtype=np.uint16)
            grown[: self._nrows] = self._rows[: self._nrows]
            self._rows = grown
        self._dir[missing] = np.arange(self._nrows, need, dtype=self._dir.dtype)
        self._nrows = need
        self._views()

    def set(self, index: I64, values: npt.NDArray[np.uint16]) -> None:
        """Set the counters of distinct pages ``index`` to ``values``."""
        if index.size == 0:
            return
        before = self.get(index)
        self._ensure_chunks(index)
        assert self._dir is not None
        self._rows[self._dir[index >> CHUNK_SHIFT], index & (CHUNK - 1)] = values
        self.nonzero += int(np.count_nonzero(values)) - int(np.count_nonzero(before))

    def set1(self, index: int, value: int) -> None:
        """:meth:`set` for one page, without arrays."""
        d = self._dir_mv
        row: int = 0 if d is None else d[index >> CHUNK_SHIFT]
        if row == 0:
            self._ensure_chunks(np.array([index], dtype=np.int64))
            assert self._dir_mv is not None
            row = self._dir_mv[index >> CHUNK_SHIFT]
        k = (row << CHUNK_SHIFT) | (index & (CHUNK - 1))
        before: int = self._rows_mv[k]
        self._rows_mv[k] = value
        self.nonzero += (value != 0) - (before != 0)

    def nonzero_indices(self) -> I64:
        """Pages whose counter is > 0, ascending."""
        if self._dir is None or self.nonzero == 0:
            return np.zeros(0, dtype=np.int64)
        chunks = np.flatnonzero(self._dir)
        rows = self._rows[self._dir[chunks]]
        r, c = np.nonzero(rows)
        out = (chunks[r].astype(np.int64) << CHUNK_SHIFT) + c
        return np.sort(out)


class SlotTracking:
    """Track counters, owner records and large-page disallow counts of one slot."""

    __slots__ = (
        "counters", "attributed", "owners", "lpage_2m", "lpage_1g", "base_gfn", "edges"
    )

    def __init__(self, npages: int, base_gfn: int) -> None:
        self.base_gfn = base_gfn
        self.counters = ChunkedCounters(npages)
        #: references held by owners other than the tenant, summed per page
        self.attributed = ChunkedCounters(npages)
        #: owner -> {page index -> references}; never holds the tenant or a zero
        self.owners: dict[str, dict[int, int]] = {}
        #: tracked gfns in each 2 MiB / 1 GiB region the slot overlaps, at
        #: ``(gfn >> 9) - (base_gfn >> 9)`` / ``(gfn >> 18) - (base_gfn >> 18)``; dense
        #: (a 4 GiB slot needs 4 KiB, far less than a dict of the regions in use) and
        #: allocated when the first gfn is tracked
        self.lpage_2m: npt.NDArray[np.uint16] | None = None
        self.lpage_1g: npt.NDArray[np.uint32] | None = None
        #: region indexes (2M, 1G) the slot covers only in part: never huge-mapped
        self.edges: tuple[frozenset[int], frozenset[int]] = _edges(base_gfn, npages)

    @property
    def nbytes(self) -> int:
        """Approximate bytes held by the counters."""
        return self.counters.nbytes + self.attributed.nbytes

    def held(self, index: I64, owner: str) -> npt.NDArray[np.int64]:
        """References ``owner`` holds on each of the distinct pages ``index``."""
        if owner == TENANT_OWNER:
            return self.counters.get(index).astype(np.int64) - self.attributed.get(index)
        refs = self.owners.get(owner)
        if not refs:
            return np.zeros(index.shape, dtype=np.int64)
        return np.fromiter((refs.get(i, 0) for i in index.tolist()), np.int64, index.size)

    def apply(self, index: I64, delta: I64, owner: str) -> tuple[I64, I64]:
        """Add ``delta`` references for ``owner`` to the distinct pages ``index``.

        The caller has checked the bounds. Returns the pages that became tracked and
        the pages that became untracked.
        """
        before = self.counters.get(index).astype(np.int64)
        after = before + delta
        self.counters.set(index, after.astype(np.uint16))
        if owner != TENANT_OWNER:
            attributed = self.attributed.get(index).astype(np.int64) + delta
            self.attributed.set(index, attributed.astype(np.uint16))
            refs = self.owners.setdefault(owner, {})
            for i, d in zip(index.tolist(), delta.tolist(), strict=True):
                n = refs.get(i, 0) + d
                if n:
                    refs[i] = n
                else:
                    del refs[i]
            if not refs:
                del self.owners[owner]
        started = index[(before == 0) & (after > 0)]
        stopped = index[(before > 0) & (after == 0)]
        self._count_lpages(started, +1)
        self._count_lpages(stopped, -1)
        return started, stopped

    def apply1(self, index: int, delta: int, owner: str) -> tuple[bool, bool]:
        """:meth:`apply` for one page: whether it became tracked, or untracked."""
        before = self.counters.get1(index)
        after = before + delta
        self.counters.set1(index, after)
        if owner != TENANT_OWNER:
            self.attributed.set1(index, self.attributed.get1(index) + delta)
            refs = self.owners.setdefault(owner, {})
            n = refs.get(index, 0) + delta
            if n:
                refs[index] = n
            else:
                del refs[index]
            if not refs:
                del self.owners[owner]
        started = before == 0 and after > 0
        stopped = before > 0 and after == 0
        if started or stopped:
            self._alloc_lpages()
            assert self.lpage_2m is not None and self.lpage_1g is not None
            base = self.base_gfn
            gfn = index + base
            i2 = (gfn >> 9) - (base >> 9)
            i1 = (gfn >> 18) - (base >> 18)
            if started:
                self.lpage_2m[i2] += 1
                self.lpage_1g[i1] += 1
            else:
                self.lpage_2m[i2] -= 1
                self.lpage_1g[i1] -= 1
        return started, stopped

    def lpage_disallowed(self, gfn: int) -> tuple[bool, bool]:
        """Whether the 2 MiB and the 1 GiB mapping that hold ``gfn`` (a gfn of this slot)
        are disallowed: a tracked gfn in the region (R3.1), or the slot covers only part
        of the region (R3.5), which holds from creation whatever is tracked."""
        base = self.base_gfn
        i2, i1 = (gfn >> 9) - (base >> 9), (gfn >> 18) - (base >> 18)
        edge_2m, edge_1g = self.edges
        if self.lpage_2m is None or self.lpage_1g is None:
            return i2 in edge_2m, i1 in edge_1g
        return (
            bool(self.lpage_2m[i2]) or i2 in edge_2m,
            bool(self.lpage_1g[i1]) or i1 in edge_1g,
        )

    def _count_lpages(self, index: I64, step: int) -> None:
        if index.size == 0:
            return
        base = self.base_gfn
        self._alloc_lpages()
        assert self.lpage_2m is not None and self.lpage_1g is not None
        gfns = index + base
        r2, c2 = np.unique((gfns >> 9) - (base >> 9), return_counts=True)
        r1, c1 = np.unique((gfns >> 18) - (base >> 18), return_counts=True)
        if step > 0:
            self.lpage_2m[r2] += c2.astype(np.uint16)
            self.lpage_1g[r1] += c1.astype(np.uint32)
        else:
            self.lpage_2m[r2] -= c2.astype(np.uint16)
            self.lpage_1g[r1] -= c1.astype(np.uint32)

    def _alloc_lpages(self) -> None:
        """Allocate the region counts when the first gfn is tracked."""
        if self.lpage_2m is None or self.lpage_1g is None:
            base = self.base_gfn
            last = base + self.counters.npages - 1
            self.lpage_2m = np.zeros((last >> 9) - (base >> 9) + 1, dtype=np.uint16)
            self.lpage_1g = np.zeros((last >> 18) - (base >> 18) + 1, dtype=np.uint32)

    def rebase(self, base_gfn: int) -> None:
        """The slot moved: recompute the region counts for its new base."""
        self.base_gfn = base_gfn
        self.edges = _edges(base_gfn, self.counters.npages)
        self.lpage_2m = None
        self.lpage_1g = None
        self._count_lpages(self.counters.nonzero_indices(), +1)

    def owners_of(self, index: int) -> dict[str, int]:
        """Owner -> references for one page, the tenant's share included."""
        out = {o: refs[index] for o, refs in self.owners.items() if index in refs}
        tenant = self.counters.get1(index) - self.attributed.get1(index)
        if tenant:
            out[TENANT_OWNER] = tenant
        return out

    def owner_pages(self, owner: str) -> Iterable[tuple[int, int]]:
        """(page index, references) pairs held by a non-tenant owner."""
        return list(self.owners.get(owner, {}).items())


def _edges(base_gfn: int, npages: int) -> tuple[frozenset[int], frozenset[int]]:
    """R3.5, arch/x86/kvm/x86.c kvm_alloc_memslot_metadata: at each huge level the first
    region gets disallow_lpage = 1 when base_gfn is not aligned to it, the last when
    base_gfn + npages is not. The indexes are relative to the slot's first region."""
    out = []
    for shift in (9, 18):
        size = 1 << shift
        last = ((base_gfn + npages - 1) >> shift) - (base_gfn >> shift)
        edge = set()
        if base_gfn & (size - 1):
            edge.add(0)
        if (base_gfn + npages) & (size - 1):
            edge.add(last)
        out.append(frozenset(edge))
    return out[0], out[1]
