"""Track counters of one memslot: a ``uint16`` per page, stored in chunks.

Counters live in chunks of :data:`CHUNK` pages allocated on first use, so a huge slot
with a few tracked pages costs a few chunks (KVM allocates the whole array when the
slot is created; this is where the simulator saves memory). A slot with few chunks
finds them through a dict; past :data:`SPARSE_MAX_FRACTION` of the slot, or as soon as
a dense directory costs no more than the dict (a small slot), it switches to a dense
directory.
"""

from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.arrays import distinct

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
DICT_BYTES = 256

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
            if self._goes_dense(need):
                grow += 4 * self.nchunks
            else:
                grow += _SPARSE_ENTRY_BYTES * missing + (0 if self._sparse else DICT_BYTES)
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
        if self._dir is None and self._goes_dense(need):
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

    def _goes_dense(self, need: int) -> bool:
        """Whether a sparse directory holding ``need`` - 1 chunks turns dense: once it
        passes its fraction of the slot, or as soon as the dense one costs no more (a
        small slot: reads then index an array instead of searching sorted keys)."""
        chunks = need - 1
        return chunks > max(self.nchunks * SPARSE_MAX_FRACTION, 64) or (
            2 * self.nchunks <= DICT_BYTES + _SPARSE_ENTRY_BYTES * chunks
        )

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
        self._ensure_chunks(distinct(chunks))
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


def distinct_ascending(values: I64) -> I64:
    """The distinct values of the ascending ``values`` (no sort)."""
    if values.size < 2:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    out: I64 = values[keep]
    return out
