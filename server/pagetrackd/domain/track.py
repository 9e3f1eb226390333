"""The track pool of one memslot: a ``uint16`` track counter per page, with owners.

Counters live in chunks of :data:`CHUNK` pages allocated on first use, so a huge slot
with a few tracked pages costs a few chunks (KVM allocates the whole array when the
slot is created; this is where the simulator saves memory). A slot with few chunks
finds them through a dict; past :data:`SPARSE_MAX_FRACTION` of the slot it switches to
a dense directory.

Every reference has an owner. References held by leases and plugins are recorded per
owner as runs of pages with the same count (:class:`RunMap`), so a lease over a whole
guest costs a few bytes, not an entry per page; the rest belong to the tenant. So for
every page: ``counter == attributed + tenant references`` and ``attributed == sum of
owner counts``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, MutableMapping

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.types import TENANT_OWNER

CHUNK_SHIFT = 5
CHUNK = 1 << CHUNK_SHIFT
COUNTER_MAX = 0xFFFF  #: USHRT_MAX, KVM's bound on a track counter
#: a dict directory entry costs about 100 bytes, a dense one 2-4: switch to the dense
#: directory once the chunks in use pass this fraction of the slot's chunks
SPARSE_MAX_FRACTION = 1 / 64

#: what a sparse directory entry and the dict's growth cost, bytes (nbytes counts 32 an
#: entry plus the dict's own size, which doubles as it grows)
_SPARSE_ENTRY_BYTES = 112
#: a dict's own size once it holds an entry (an empty table is counted as 0)
_DICT_BYTES = 256
#: a large-page region count's entry, bytes (as nbytes counts it)
_REGION_ENTRY_BYTES = 64

I64 = npt.NDArray[np.int64]
U16 = npt.NDArray[np.uint16]


def is_span(index: I64) -> bool:
    """Whether the distinct, ascending ``index`` is one contiguous run of pages."""
    return bool(index.size) and int(index[-1]) - int(index[0]) + 1 == index.size


class ChunkedCounters:
    """``npages`` ``uint16`` counters, all zero until written, stored in chunks.

    Row 0 of the chunk pool is a permanent row of zeros that every missing chunk
    points at, so reads need no masking.
    """

    __slots__ = (
        "npages", "_dir", "_sparse", "_skeys", "_srows", "_rows", "_nrows", "nonzero",
        "_dir_mv", "_rows_mv",
    )

    def __init__(self, npages: int) -> None:
        self.npages = npages
        #: dense directory: chunk -> row (0: no chunk); None while sparse
        self._dir: npt.NDArray[np.unsignedinteger] | None = None
        #: sparse directory: chunk -> row, for the chunks in use; None once dense
        self._sparse: dict[int, int] | None = {}
        #: the sparse directory as sorted arrays, for vectorised reads; built on demand
        self._skeys: I64 | None = None
        self._srows: I64 | None = None
        self._rows = np.zeros((1, CHUNK), dtype=np.uint16)
        self._nrows = 1
        self.nonzero = 0  #: number of pages whose counter is > 0
        # Flat memoryviews of _dir and _rows for get1: indexing them yields Python ints
        # several times faster than numpy scalar indexing. Rebuilt whenever either array
        # is replaced (see _views).
        self._dir_mv: memoryview | None = None
        self._rows_mv = self._rows.reshape(-1).data

    def _views(self) -> None:
        self._dir_mv = None if self._dir is None else self._dir.data
        self._rows_mv = self._rows.reshape(-1).data

    @property
    def nchunks(self) -> int:
        """Chunks the slot's pages span."""
        return (self.npages + CHUNK - 1) >> CHUNK_SHIFT

    @property
    def nbytes(self) -> int:
        """Bytes held by the directory and the chunks (the sparse directory's dict and
        its int objects counted as Python reports them)."""
        d = 0 if self._dir is None else self._dir.nbytes
        if self._sparse:
            d += sys.getsizeof(self._sparse) + 32 * len(self._sparse)
        if self._skeys is not None and self._srows is not None:
            d += self._skeys.nbytes + self._srows.nbytes
        return d + self._rows.nbytes

    def get1(self, index: int) -> int:
        """The counter of one page."""
        d = self._dir_mv
        if d is not None:
            row: int = d[index >> CHUNK_SHIFT]
        else:
            assert self._sparse is not None
            row = self._sparse.get(index >> CHUNK_SHIFT, 0)
            if not row:
                return 0
        value: int = self._rows_mv[(row << CHUNK_SHIFT) | (index & (CHUNK - 1))]
        return value

    def _rows_of(self, chunks: I64) -> I64:
        """The pool row of each chunk (0 where it has none)."""
        if self._dir is not None:
            return self._dir.take(chunks).astype(np.int64)
        assert self._sparse is not None
        if not self._sparse:
            return np.zeros(chunks.shape, dtype=np.int64)
        if self._skeys is None or self._srows is None:
            keys = np.fromiter(self._sparse.keys(), np.int64, len(self._sparse))
            rows = np.fromiter(self._sparse.values(), np.int64, len(self._sparse))
            order = np.argsort(keys)
            self._skeys, self._srows = keys[order], rows[order]
        pos = np.searchsorted(self._skeys, chunks)
        pos = np.minimum(pos, self._skeys.size - 1)
        out: I64 = np.where(self._skeys[pos] == chunks, self._srows[pos], 0)
        return out

    def get(self, index: I64) -> U16:
        """The counters of many pages (any order, repeats allowed)."""
        if self._nrows == 1:
            return np.zeros(index.shape, dtype=np.uint16)
        rows = self._rows_of(index >> CHUNK_SHIFT)
        # A flat take: several times faster than two-dimensional fancy indexing.
        out: U16 = self._rows.reshape(-1).take((rows << CHUNK_SHIFT) | (index & (CHUNK - 1)))
        return out

    def get_span(self, lo: int, hi: int) -> U16:
        """The counters of pages ``lo .. hi - 1``."""
        if self._nrows == 1 or hi <= lo:
            return np.zeros(max(hi - lo, 0), dtype=np.uint16)
        c0, c1 = lo >> CHUNK_SHIFT, ((hi - 1) >> CHUNK_SHIFT) + 1
        rows = self._rows_of(np.arange(c0, c1, dtype=np.int64))
        block = self._rows[rows].reshape(-1)
        off = lo - (c0 << CHUNK_SHIFT)
        out: U16 = block[off : off + hi - lo]
        return out

    def growth_bound(self, chunks: I64) -> int:
        """At most how many bytes :attr:`nbytes` grows by when the distinct ``chunks``
        get rows: the rows, a directory entry each, and the dense directory if they
        make the sparse one switch (or the dense one widen)."""
        missing = int(np.count_nonzero(self._rows_of(chunks) == 0))
        if not missing:
            return 0
        need = self._nrows + missing
        cap = self._rows.shape[0]
        grow = CHUNK * 2 * (max(need, cap + cap // 4 + 8) - cap) if need > cap else 0
        if self._dir is None:
            if need - 1 > max(self.nchunks * SPARSE_MAX_FRACTION, 64):
                grow += 4 * self.nchunks
            else:
                grow += _SPARSE_ENTRY_BYTES * missing + (0 if self._sparse else _DICT_BYTES)
        elif need - 1 > np.iinfo(self._dir.dtype).max:
            grow += 4 * self.nchunks
        return grow

    def _ensure_chunks(self, chunks: I64) -> None:
        """Give each of the distinct ``chunks`` a row of its own."""
        have = self._rows_of(chunks)
        missing = chunks[have == 0]
        if missing.size == 0:
            return
        need = self._nrows + missing.size
        if self._dir is None and (need - 1) > max(self.nchunks * SPARSE_MAX_FRACTION, 64):
            self._densify()
        if self._dir is not None and need - 1 > np.iinfo(self._dir.dtype).max:
            self._dir = self._dir.astype(np.uint32)
        if need > self._rows.shape[0]:
            cap = max(need, self._rows.shape[0] + self._rows.shape[0] // 4 + 8)
            if self._dir is not None and missing.size > self._rows.shape[0] // 4:
                cap = need  # a bulk fill: no slack on a huge pool
            grown = np.zeros((cap, CHUNK), dtype=np.uint16)
            grown[: self._nrows] = self._rows[: self._nrows]
            self._rows = grown
        new_rows = np.arange(self._nrows, need, dtype=np.int64)
        if self._dir is not None:
            self._dir[missing] = new_rows
        else:
            assert self._sparse is not None
            self._sparse.update(zip(missing.tolist(), new_rows.tolist(), strict=True))
            self._skeys = self._srows = None
        self._nrows = need
        self._views()

    def _densify(self) -> None:
        assert self._sparse is not None
        d: npt.NDArray[np.unsignedinteger] = np.zeros(
            self.nchunks, dtype=np.uint16 if self._rows.shape[0] <= 0xFFFF else np.uint32
        )
        if self._sparse:
            d[np.fromiter(self._sparse.keys(), np.int64, len(self._sparse))] = np.fromiter(
                self._sparse.values(), np.int64, len(self._sparse)
            )
        self._dir = d
        self._sparse = None
        self._skeys = self._srows = None

    def set(self, index: I64, values: U16) -> None:
        """Set the counters of distinct pages ``index`` to ``values``."""
        if index.size == 0:
            return
        before = self.get(index)
        chunks = index >> CHUNK_SHIFT
        self._ensure_chunks(np.unique(chunks))
        rows = self._rows_of(chunks)
        self._rows.reshape(-1)[(rows << CHUNK_SHIFT) | (index & (CHUNK - 1))] = values
        self.nonzero += int(np.count_nonzero(values)) - int(np.count_nonzero(before))

    def set_span(self, lo: int, values: U16) -> None:
        """Set the counters of pages ``lo .. lo + len(values) - 1``."""
        n = values.size
        if n == 0:
            return
        hi = lo + n
        c0, c1 = lo >> CHUNK_SHIFT, ((hi - 1) >> CHUNK_SHIFT) + 1
        chunks = np.arange(c0, c1, dtype=np.int64)
        self._ensure_chunks(chunks)
        rows = self._rows_of(chunks)
        off = lo - (c0 << CHUNK_SHIFT)
        if off == 0 and n == (c1 - c0) << CHUNK_SHIFT:
            before = int(np.count_nonzero(self._rows[rows]))
            self._rows[rows] = values.reshape(-1, CHUNK)
        else:
            block = self._rows[rows]
            flat = block.reshape(-1)
            before = int(np.count_nonzero(flat[off : off + n]))
            flat[off : off + n] = values
            self._rows[rows] = block
        self.nonzero += int(np.count_nonzero(values)) - before

    def set1(self, index: int, value: int) -> None:
        """:meth:`set` for one page, without arrays."""
        d = self._dir_mv
        if d is not None:
            row: int = d[index >> CHUNK_SHIFT]
        else:
            assert self._sparse is not None
            row = self._sparse.get(index >> CHUNK_SHIFT, 0)
        if row == 0:
            self._ensure_chunks(np.array([index >> CHUNK_SHIFT], dtype=np.int64))
            return self.set1(index, value)
        k = (row << CHUNK_SHIFT) | (index & (CHUNK - 1))
        before: int = self._rows_mv[k]
        self._rows_mv[k] = value
        self.nonzero += (value != 0) - (before != 0)

    def nonzero_indices(self) -> I64:
        """Pages whose counter is > 0, ascending."""
        if self.nonzero == 0:
            return np.zeros(0, dtype=np.int64)
        if self._dir is not None:
            chunks = np.flatnonzero(self._dir).astype(np.int64)
        else:
            assert self._sparse is not None
            chunks = np.sort(np.fromiter(self._sparse.keys(), np.int64, len(self._sparse)))
        rows = self._rows[self._rows_of(chunks)]
        r, c = np.nonzero(rows)
        out: I64 = (chunks[r] << CHUNK_SHIFT) + c  # row-major: already ascending
        return out


_NO_RUNS = np.zeros(0, dtype=np.int64)
_NO_RUNS.flags.writeable = False


class RunMap:
    """A count per page, held as runs of pages with the same non-zero count.

    ``starts``/``ends`` (exclusive) are ascending and disjoint, ``values`` > 0, and two
    touching runs never hold the same value, so the runs of a given map are unique. A
    range of pages costs one run whatever its length; a scattered set, a run a page.
    """

    __slots__ = ("starts", "ends", "values")

    def __init__(self) -> None:
        # the arrays are replaced, never written: an empty map shares one empty array
        self.starts = self.ends = self.values = _NO_RUNS

    def __len__(self) -> int:
        """Number of runs."""
        return int(self.starts.size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the run arrays."""
        return self.starts.nbytes + self.ends.nbytes + self.values.nbytes

    def total(self) -> int:
        """Sum of the counts over every page."""
        return int(((self.ends - self.starts) * self.values).sum())

    def npages(self) -> int:
        """Pages with a non-zero count."""
        return int((self.ends - self.starts).sum())

    def get1(self, index: int) -> int:
        """The count of one page."""
        i = int(np.searchsorted(self.starts, index, side="right")) - 1
        if i >= 0 and index < int(self.ends[i]):
            return int(self.values[i])
        return 0

    def get(self, index: I64) -> I64:
        """The counts of many pages (any order, repeats allowed)."""
        return _eval(self.starts, self.ends, self.values, index)

    def get_span(self, lo: int, hi: int) -> I64:
        """The counts of pages ``lo .. hi - 1``: one slice assignment per run inside."""
        out = np.zeros(hi - lo, dtype=np.int64)
        first = int(np.searchsorted(self.ends, lo, side="right"))
        last = int(np.searchsorted(self.starts, hi, side="left"))
        for s, e, v in zip(self.starts[first:last].tolist(), self.ends[first:last].tolist(),
                           self.values[first:last].tolist(), strict=True):
            out[max(s, lo) - lo : min(e, hi) - lo] = v
        return out

    def counts_of(self, index: I64) -> I64:
        """:meth:`get` for distinct, ascending pages, by span when they are one."""
        if is_span(index):
            return self.get_span(int(index[0]), int(index[-1]) + 1)
        return self.get(index)

    def pages(self) -> tuple[I64, I64]:
        """(ascending pages, their counts) of every page with a non-zero count."""
        lens = self.ends - self.starts
        n = int(lens.sum())
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        first = np.cumsum(lens) - lens
        idx = np.arange(n, dtype=np.int64) + np.repeat(self.starts - first, lens)
        return idx, np.repeat(self.values, lens)

    def add_span(self, lo: int, hi: int, delta: int) -> None:
        """Add ``delta`` to the count of pages ``lo .. hi - 1`` (no count goes below 0)."""
        pts = np.unique(np.concatenate([self.starts, self.ends, [lo, hi]]))
        seg = pts[:-1]
        val = _eval(self.starts, self.ends, self.values, seg)
        val = val + np.where((seg >= lo) & (seg < hi), delta, 0)
        self._assign(seg, pts[1:], val)

    def add(self, index: I64, delta: I64 | int) -> None:
        """Add ``delta`` to the count of each of the distinct, ascending pages ``index``."""
        if index.size == 0:
            return
        if isinstance(delta, int) and is_span(index):
            self.add_span(int(index[0]), int(index[-1]) + 1, delta)
            return
        new = self.counts_of(index) + delta
        # The updates as runs: a new run wherever the pages or the new count break.
        brk = np.flatnonzero((np.diff(index) != 1) | (np.diff(new) != 0)) + 1
        first = np.concatenate([[0], brk])
        last = np.concatenate([brk, [index.size]]) - 1
        us, ue, uv = index[first], index[last] + 1, new[first]
        pts = np.unique(np.concatenate([self.starts, self.ends, us, ue]))
        seg = pts[:-1]
        pos = np.searchsorted(us, seg, side="right") - 1
        safe = np.maximum(pos, 0)
        covered = (pos >= 0) & (seg < ue[safe])
        val = np.where(covered, uv[safe], _eval(self.starts, self.ends, self.values, seg))
        self._assign(seg, pts[1:], val)

    def _assign(self, s: I64, e: I64, v: I64) -> None:
        """Become the runs ``[s, e) -> v`` (ascending, touching or not), merged."""
        keep = v != 0
        s, e, v = s[keep], e[keep], v[keep]
        if s.size:
            joins = (s[1:] == e[:-1]) & (v[1:] == v[:-1])
            first = np.concatenate([[0], np.flatnonzero(~joins) + 1])
            last = np.concatenate([first[1:], [s.size]]) - 1
            s, e, v = s[first], e[last], v[first]
        self.starts, self.ends, self.values = s, e, v


def _region_counts(base_gfn: int, npages: int) -> tuple[RegionCounts, RegionCounts]:
    """Empty 2 MiB and 1 GiB region counts for a slot."""
    last = base_gfn + npages - 1
    return (
        RegionCounts((last >> 9) - (base_gfn >> 9) + 1),
        RegionCounts((last >> 18) - (base_gfn >> 18) + 1),
    )


def _distinct_ascending(values: I64) -> I64:
    """The distinct values of the ascending ``values`` (no sort)."""
    if values.size < 2:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    out: I64 = values[keep]
    return out


def _eval(starts: I64, ends: I64, values: I64, at: I64) -> I64:
    """The value of the runs at each page of ``at`` (0 outside every run)."""
    if starts.size == 0:
        return np.zeros(at.shape, dtype=np.int64)
    pos = np.searchsorted(starts, at, side="right") - 1
    safe = np.maximum(pos, 0)
    out: I64 = np.where((pos >= 0) & (at < ends[safe]), values[safe], 0)
    return out


class RegionCounts(MutableMapping[int, int]):
    """Tracked gfns per large-page region: region index -> count, only counts > 0.

    A dict while few regions are in use (a VM tracking 16 pages of a 4 GiB slot holds 16
    entries, not a 4 KiB array); past 1/16 of the regions a dense ``uint32`` array
    (scattered tracking over a whole slot, or a fully tracked guest: 4 bytes a region
    instead of some 70 for a dict entry and its ints)."""

    __slots__ = ("nregions", "_sparse", "_dense", "_mv", "_len")

    def __init__(self, nregions: int) -> None:
        self.nregions = nregions
        self._sparse: dict[int, int] | None = {}
        self._dense: npt.NDArray[np.uint32] | None = None
        self._mv: memoryview | None = None
        self._len = 0  #: regions with a count, once dense

    @property
    def nbytes(self) -> int:
        """Bytes held: the array, or the dict with an entry's key and count."""
        if self._dense is not None:
            return self._dense.nbytes
        assert self._sparse is not None
        return sys.getsizeof(self._sparse) + _REGION_ENTRY_BYTES * len(self._sparse) if (
            self._sparse) else 0

    def _densify(self) -> None:
        assert self._sparse is not None
        dense = np.zeros(self.nregions, dtype=np.uint32)
        if self._sparse:
            keys = np.fromiter(self._sparse.keys(), np.int64, len(self._sparse))
            dense[keys] = np.fromiter(self._sparse.values(), np.int64, len(self._sparse))
        self._len = len(self._sparse)
        self._dense, self._mv, self._sparse = dense, dense.data, None

    def __getitem__(self, region: int) -> int:
        if self._mv is not None:
            n: int = self._mv[region]
            if n:
                return n
            raise KeyError(region)
        assert self._sparse is not None
        return self._sparse[region]

    def __contains__(self, region: object) -> bool:
        if self._mv is not None:
            return isinstance(region, int) and 0 <= region < self.nregions and bool(
                self._mv[region])
        assert self._sparse is not None
        return region in self._sparse

    def __setitem__(self, region: int, count: int) -> None:
        if count == 0:
            self.pop(region, None)
            return
        if self._mv is not None:
            self._len += not self._mv[region]
            self._mv[region] = count
            return
        assert self._sparse is not None
        self._sparse[region] = count
        if len(self._sparse) > max(self.nregions // 16, 8):
            self._densify()

    def __delitem__(self, region: int) -> None:
        if self._mv is not None:
            if not self._mv[region]:
                raise KeyError(region)
            self._mv[region] = 0
            self._len -= 1
            return
        assert self._sparse is not None
        del self._sparse[region]

    def __iter__(self) -> Iterator[int]:
        if self._dense is not None:
            return iter(np.flatnonzero(self._dense).tolist())
        assert self._sparse is not None
        return iter(list(self._sparse))

    def __len__(self) -> int:
        if self._dense is not None:
            return self._len
        assert self._sparse is not None
        return len(self._sparse)

    def add_many(self, regions: I64, counts: I64) -> None:
        """Add ``counts[i]`` (may be negative; no count goes below 0) to the distinct
        ``regions[i]``."""
        if self._sparse is not None and len(self._sparse) + regions.size > max(
            self.nregions // 16, 8
        ):
            self._densify()
        if self._dense is not None:
            before = self._dense[regions]
            after = before.astype(np.int64) + counts
            self._dense[regions] = after.astype(np.uint32)
            self._len += int(np.count_nonzero(after)) - int(np.count_nonzero(before))
            return
        for r, c in zip(regions.tolist(), counts.tolist(), strict=True):
            self[r] = self.get(r, 0) + c


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
        self.lpage_2m, self.lpage_1g = _region_counts(base_gfn, npages)
        #: region indexes (2M, 1G) the slot covers only in part: never huge-mapped
        self.edges: tuple[frozenset[int], frozenset[int]] = _edges(base_gfn, npages)

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
            chunks = _distinct_ascending(index >> CHUNK_SHIFT)
            gfns = index + self.base_gfn
            regions = _distinct_ascending(gfns >> 9).size + _distinct_ascending(gfns >> 18).size
        grow = self.counters.growth_bound(chunks)
        grow += 2 * _REGION_ENTRY_BYTES * regions  # entries, and the tables' growth
        grow += _DICT_BYTES * ((not self.lpage_2m) + (not self.lpage_1g))
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
            one = np.array([index], dtype=np.int64)
            refs = self.owners.setdefault(owner, RunMap())
            refs.add(one, delta)
            self.attributed.add(one, delta)
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
        self.edges = _edges(base_gfn, self.counters.npages)
        self.lpage_2m, self.lpage_1g = _region_counts(base_gfn, self.counters.npages)
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
