"""Sparse guest memory of one memslot: storage grows with the bytes written.

A page that was never written costs nothing and reads as zeros. A written page keeps
only the extent ``[lo, hi)`` that writes have covered so far, on 8-byte boundaries; once
that extent passes :data:`PROMOTE_BYTES` the page is stored whole. So a VM whose guest
writes a few PTEs into each of many pages costs bytes, not 4 KiB, per page (KVM backs
whole pages; this is a deliberate saving of the simulator).

Layout, chosen so that a batch of writes is stored with a handful of numpy operations:

* the extents lie in one byte **slab**, allocated by bumping a pointer and compacted
  when more than half of it is stale (extents that grew moved away);
* a **page table** gives each written page a row: its extent ``lo``/``hi`` and ``base``,
  the slab position of page offset 0, so byte ``off`` of the page is at ``base + off``.
  Row 0 is an empty extent that every unwritten page maps to, so lookups need no masks;
* a three-level **directory** (32 pages a leaf, 32 leaves a middle node) maps a page to
  its row with three array lookups; it costs 128 bytes per 128 KiB of guest memory that
  holds a written page, 128 per 4 MiB, and 4 bytes per 4 MiB of the range the slot's
  written pages span. It is built on the first batched write, so memory only ever
  written one access at a time does not pay for it.

Single accesses find a page through a dict that holds each page's ``(lo, hi, base, row)``
as Python ints, and copy through a memoryview of the slab: numpy scalars would cost
several times more.

For incremental saves the memory is cut in **chunks** of :data:`CHUNK_PAGES` pages:
a byte map (one byte a chunk) marks the chunks written since the last
:meth:`SlotMemory.begin_save`. A save
copies its chunks one at a time, over many event-loop turns; a write into a chunk the
save has not copied yet copies that chunk first (copy on write), so what the save gets
is the memory as it was when the save began.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.arrays import distinct, uniform
from pagetrackd.domain.types import PAGE_SIZE

#: pages per chunk, the unit of incremental saves (1 MiB of guest memory)
CHUNK_SHIFT = 8
CHUNK_PAGES = 1 << CHUNK_SHIFT
#: An extent wider than this is widened to the whole page.
PROMOTE_BYTES = 1024
#: Python objects behind each written page: its dict entry, the ``(lo, hi, base, row)``
#: tuple and its ints (measured with tracemalloc; tests/domain/test_memory_footprint.py
#: checks :attr:`SlotMemory.footprint` against it).
PAGE_OBJECT_BYTES = 296
_ROW_BYTES = 24  #: ``_lo``, ``_hi`` and ``_base`` entries of one row
_NODE_BYTES = 4 * (1 << 5)  #: one directory node: 32 four-byte entries
ALIGN = 8  #: extents start and end on this boundary, so 8-byte stores can use a uint64 view
FAN_SHIFT = 5  #: each directory node has 32 entries
FAN = 1 << FAN_SHIFT
#: Average piece size above which a batch is stored piece by piece (byte indexes would
#: cost more than one memcpy per piece).
_BYTEWISE_MAX_AVG = 64
#: a batch of at most this many pieces into memory that has no directory yet is stored
#: piece by piece (and bounded so by growth_bound): only a larger one builds the directory
SMALL_BATCH = 64

_unpack_u64 = struct.Struct("<Q").unpack_from

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ChunkCopy:
    """The written pages of one chunk, copied out: page numbers (within the slot), each
    page's extent start and length, and the extents' bytes one after the other."""

    chunk: int
    pages: I64
    lo: I64
    length: I64
    data: bytes


class SlotMemory:
    """The guest memory behind one memslot, indexed by page number within the slot."""

    __slots__ = (
        "nbytes", "_extent", "_nrows", "_lo", "_hi", "_base", "_slab", "_slab_mv", "_used",
        "_top", "_mid", "_leaf", "_nmid", "_nleaf", "_indexed", "_dirty", "_marking", "_cow",
    )

    def __init__(self) -> None:
        self.nbytes = 0  #: bytes of page data held (the extents' sizes)
        # page -> (lo, hi, base, row), the same as the row's entries in _lo, _hi, _base;
        # _cover and _compact are the only writers of both.
        self._extent: dict[int, tuple[int, int, int, int]] = {}
        self._nrows = 1  # row 0: the empty extent of every unwritten page
        self._lo = np.zeros(8, dtype=np.int64)
        self._hi = np.zeros(8, dtype=np.int64)
        self._base = np.zeros(8, dtype=np.int64)
        self._slab = np.zeros(256, dtype=np.uint8)
        self._slab_mv = self._slab.data
        self._used = 0  # slab bytes handed out, live or stale
        # Directory: _top[page >> 10] -> middle node; _mid[node, page >> 5 & 31] -> leaf;
        # _leaf[leaf, page & 31] -> row. Node 0 of each level is all zeros (nothing below).
        self._top = np.zeros(0, dtype=np.uint32)
        self._mid = np.zeros((1, FAN), dtype=np.uint32)
        self._leaf = np.zeros((1, FAN), dtype=np.int32)
        self._nmid = self._nleaf = 1
        self._indexed = False  # the directory is built on the first batch
        # one byte a chunk: 1 = written since the last begin_save; grown to the highest
        # chunk written to (so the footprint is the same whether or not marks are kept)
        self._dirty = bytearray()
        #: whether writes mark their chunks: from the first save (or load) on. Until
        #: then the first save takes every chunk that holds a page anyway, so a memory
        #: that is never saved (a daemon without a state directory) pays no mark per write
        self._marking = False
        #: during a save: its chunks not yet taken -> their copy, None until a write
        #: into the chunk made one (copy on write); None when no save runs
        self._cow: dict[int, ChunkCopy | None] | None = None

    @property
    def pages(self) -> int:
        """Number of pages that were ever written."""
        return len(self._extent)

    @property
    def footprint(self) -> int:
        """Bytes this memory really holds: the slab, rows and directory as far as they
        are used, and the Python objects of each written page -- not just the bytes
        written (8 bytes written to a fresh page cost 330 to 500 bytes). Arrays are
        allocated zeroed and grown by copying what is used, so their unused tails are
        never touched and cost no resident memory."""
        return (
            self._used + _ROW_BYTES * self._nrows + self._top.nbytes
            + _NODE_BYTES * (self._nmid + self._nleaf) + PAGE_OBJECT_BYTES * len(self._extent)
            + len(self._dirty)
        )

    def growth_bound(self, index: I64, offset: I64, end: I64) -> int:
        """At most how many bytes :attr:`footprint` grows by when pieces ``[offset, end)``
        of pages ``index`` are written, found without writing anything, so a quota can
        be checked before a write changes anything."""
        if not index.size:
            return 0
        if self._indexed or index.size > SMALL_BATCH:
            if not self._indexed:
                self._build_index()  # what the batch would do first; holds no data
            self._grow_top(int(index.max()))
            rows = self._rows(index)
            lo, hi = self._lo[rows], self._hi[rows]
        else:
            held = [self._extent.get(i, (0, 0, 0, 0)) for i in index.tolist()]
            rows = np.array([h[3] for h in held], dtype=np.int64)
            lo = np.array([h[0] for h in held], dtype=np.int64)
            hi = np.array([h[1] for h in held], dtype=np.int64)
        # the dirty map grows to the highest chunk (one byte a chunk)
        need, have = (int(index.max()) >> CHUNK_SHIFT) + 1, len(self._dirty)
        dirty = max(need, have + have // 2) - have if need > have else 0
        outside = (offset < lo) | (end > hi)
        if not outside.any():
            return dirty
        index, rows = index[outside], rows[outside]
        new = rows == 0
        # Each page's extent once every piece is stored: the union of what it holds and
        # of its pieces. Every piece that is outside may cover anew, up to that width.
        a = offset[outside] & -ALIGN
        b = (end[outside] + ALIGN - 1) & -ALIGN
        a = np.where(new, a, np.minimum(a, lo[outside]))
        b = np.where(new, b, np.maximum(b, hi[outside]))
        pages, inverse = np.unique(index, return_inverse=True)
        page_lo = np.full(pages.size, PAGE_SIZE, dtype=np.int64)
        page_hi = np.zeros(pages.size, dtype=np.int64)
        np.minimum.at(page_lo, inverse, a)
        np.maximum.at(page_hi, inverse, b)
        width = page_hi - page_lo
        width[width > PROMOTE_BYTES] = PAGE_SIZE
        new_pages = int(distinct(index[new]).size)
        grow = int(width[inverse].sum())
        grow += new_pages * (PAGE_OBJECT_BYTES + _ROW_BYTES + 2 * _NODE_BYTES)
        need = (int(pages[-1]) >> (2 * FAN_SHIFT)) + 1
        if need > self._top.size:
            grow += 4 * max(need, self._top.size + self._top.size // 2) - self._top.nbytes
        return grow + dirty

    # ----------------------------------------------------------------- lookups

    def _rows(self, index: I64) -> I64:
        """Rows of many pages, each below the top level's reach (see _grow_top)."""
        # Flat takes: several times faster than two-dimensional fancy indexing.
        mid = self._top.take(index >> (2 * FAN_SHIFT)).astype(np.int64)
        low = FAN - 1
        leaf = self._mid.reshape(-1).take((mid << FAN_SHIFT) | ((index >> FAN_SHIFT) & low))
        rows = self._leaf.reshape(-1).take((leaf.astype(np.int64) << FAN_SHIFT) | (index & low))
        return rows.astype(np.int64)

    # ----------------------------------------------------------------- growth

    def _grow_top(self, index: int) -> None:
        need = (index >> (2 * FAN_SHIFT)) + 1
        if need > self._top.size:
            grown = np.zeros(max(need, self._top.size + self._top.size // 2), np.uint32)
            grown[: self._top.size] = self._top
            self._top = grown

    def _node(self, level: str, count: str) -> int:
        """A fresh all-zero node of ``level`` (``_mid`` or ``_leaf``)."""
        nodes = getattr(self, level)
        n: int = getattr(self, count)
        if n == nodes.shape[0]:
            grown = np.zeros((n * 2, FAN), dtype=nodes.dtype)
            grown[:n] = nodes
            setattr(self, level, grown)
        setattr(self, count, n + 1)
        return n

    def _new_row(self, index: int) -> int:
        row = self._nrows
        if row == self._lo.size:
            cap = row * 2
            for name in ("_lo", "_hi", "_base"):
                old = getattr(self, name)
                new = np.zeros(cap, dtype=np.int64)
                new[:row] = old
                setattr(self, name, new)
        self._nrows = row + 1
        if self._indexed:
            self._index(index, row)
        return row

    def _build_index(self) -> None:
        """Build the directory on the first batch: memory only ever written one access at
        a time (an idle VM's, a plugin's tables) never pays for one."""
        if self._extent:
            self._grow_top(max(self._extent))
        for page, ext in self._extent.items():
            self._index(page, ext[3])
        self._indexed = True

    def _index(self, index: int, row: int) -> None:
        self._grow_top(index)
        t = index >> (2 * FAN_SHIFT)
        m = (index >> FAN_SHIFT) & (FAN - 1)
        mid = int(self._top[t])
        if not mid:
            mid = self._node("_mid", "_nmid")
            self._top[t] = mid
        leaf = int(self._mid[mid, m])
        if not leaf:
            leaf = self._node("_leaf", "_nleaf")
            self._mid[mid, m] = leaf
        self._leaf[leaf, index & (FAN - 1)] = row

    def _alloc(self, size: int) -> int:
        """Slab position of ``size`` fresh zero bytes (may compact or grow the slab, which
        moves every extent: re-read bases after)."""
        if self._used + size > self._slab.size:
            if self._used - self.nbytes > self.nbytes:
                self._compact()
            if self._used + size > self._slab.size:
                cap = max(self._slab.size * 2, self._used + size)
                grown = np.zeros(cap, dtype=np.uint8)
                grown[: self._used] = self._slab[: self._used]
                self._slab = grown
                self._slab_mv = grown.data
        at = self._used
        self._used += size
        return at

    def _compact(self) -> None:
        """Move the live extents to the front of a fresh slab (stale ones are dropped)."""
        slab = np.zeros(self._slab.size, dtype=np.uint8)
        at = 0
        extent = self._extent
        for page, (lo, hi, base, row) in extent.items():
            slab[at : at + hi - lo] = self._slab[base + lo : base + hi]
            extent[page] = (lo, hi, at - lo, row)
            self._base[row] = at - lo
            at += hi - lo
        self._slab = slab
        self._slab_mv = slab.data
        self._used = at

    def _cover(self, index: int, lo: int, hi: int) -> tuple[int, int, int, int]:
        """Widen page ``index``'s extent (creating it if need be) to hold ``[lo, hi)``;
        returns the page's new ``(lo, hi, base, row)``."""
        lo &= -ALIGN
        hi = (hi + ALIGN - 1) & -ALIGN
        old = self._extent.get(index)
        if old is not None:
            old_lo, old_hi, _, row = old
            lo, hi = min(lo, old_lo), max(hi, old_hi)
        else:
            row = self._new_row(index)
            old_lo = old_hi = 0
            self._grow_dirty(index >> CHUNK_SHIFT)  # a page in a new chunk, marked or not
        if hi - lo > PROMOTE_BYTES:
            lo, hi = 0, PAGE_SIZE
        at = self._alloc(hi - lo)  # before reading the old base: it may compact
        if old is not None:
            src = self._extent[index][2] + old_lo
            dst = at + old_lo - lo
            self._slab[dst : dst + old_hi - old_lo] = self._slab[src : src + old_hi - old_lo]
        ext = (lo, hi, at - lo, row)
        self._extent[index] = ext
        self._lo[row] = lo
        self._hi[row] = hi
        self._base[row] = at - lo
        self.nbytes += (hi - lo) - (old_hi - old_lo)
        return ext

    # ----------------------------------------------------------------- writes

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Store ``data`` at ``offset`` of page ``index``; it must fit in the page."""
        end = offset + len(data)
        if self._marking:
            chunk = index >> CHUNK_SHIFT
            if self._cow is not None and chunk in self._cow and self._cow[chunk] is None:
                self._cow[chunk] = self.copy_chunk(chunk)
            try:
                self._dirty[chunk] = 1
            except IndexError:
                self._grow_dirty(chunk)
                self._dirty[chunk] = 1
        ext = self._extent.get(index)
        if ext is None or offset < ext[0] or end > ext[1]:
            ext = self._cover(index, offset, end)
        at = ext[2] + offset
        self._slab_mv[at : at + end - offset] = data

    def write_many(
        self, index: I64, offset: I64, data: bytes | memoryview, start: I64, length: I64
    ) -> None:
        """Store, in order, ``length[k]`` bytes of ``data`` from ``start[k]`` at
        ``offset[k]`` of page ``index[k]`` (each piece inside its page): the same as
        calling :meth:`write` for each, in a few array operations."""
        if not index.size:
            return
        if not self._indexed and index.size <= SMALL_BATCH:
            view = memoryview(data)
            for i, o, s, n in zip(
                index.tolist(), offset.tolist(), start.tolist(), length.tolist(), strict=True
            ):
                self.write(i, o, view[s : s + n])
            return
        top = int(index.max())
        self._touch(index, top)
        if not self._indexed:
            self._build_index()
        self._grow_top(top)
        rows = self._rows(index)
        end = offset + length
        outside = (offset < self._lo[rows]) | (end > self._hi[rows])
        if outside.any():
            # Widen extents first (memory grows, so this loop is paid once per new byte
            # range), then store everything in one pass, in order.
            for i, o, e in zip(
                index[outside].tolist(), offset[outside].tolist(), end[outside].tolist(),
                strict=True,
            ):
                self._cover(i, o, e)
            rows = self._rows(index)
        self._store(self._base[rows] + offset, data, start, length)

    def _store(self, dest: I64, data: bytes | memoryview, start: I64, length: I64) -> None:
        """Copy piece k (``length[k]`` bytes of ``data`` from ``start[k]``) to slab
        position ``dest[k]``, in order, so a later piece wins where pieces overlap.

        Relies on numpy assigning a 1-D fancy index in index order, so the last of
        repeated positions wins (tests/domain/test_memory.py checks this numpy behaviour).
        """
        same = uniform(length)
        src = np.frombuffer(data, dtype=np.uint8)
        if same is not None:
            n = same
            if n in (1, 2, 4, 8) and not ((dest | start) & (n - 1)).any():
                # Aligned words (PTEs, GTT entries): one word per piece.
                word = np.dtype(f"<u{n}")
                usable = src.size - src.size % n
                self._slab.view(word)[dest // n] = src[:usable].view(word)[start // n]
                return
            if n <= _BYTEWISE_MAX_AVG:
                col = np.arange(n, dtype=np.int64)
                self._slab[(dest[:, None] + col).ravel()] = src[(start[:, None] + col).ravel()]
                return
        elif int(length.sum()) <= _BYTEWISE_MAX_AVG * length.size:
            # Byte k of the concatenated pieces: its source and its destination.
            first = np.cumsum(length) - length
            pos = np.arange(int(first[-1] + length[-1]), dtype=np.int64)
            pos += np.repeat(start - first, length)
            self._slab[pos + np.repeat(dest - start, length)] = src[pos]
            return
        slab = self._slab_mv
        view = memoryview(data)
        for d, s, k in zip(dest.tolist(), start.tolist(), length.tolist(), strict=True):
            slab[d : d + k] = view[s : s + k]

    # ----------------------------------------------------------------- saves

    def _touch(self, index: I64, top: int) -> None:
        """Mark the chunks of pages ``index`` (``top`` the highest) dirty, copying first
        those a running save has not taken yet."""
        if not self._marking:
            self._grow_dirty(top >> CHUNK_SHIFT)
            return
        first, last = int(index.min()) >> CHUNK_SHIFT, top >> CHUNK_SHIFT
        chunks: range | list[int]
        if last - first <= 1:
            # A batch usually stays inside one chunk (1 MiB): mark it without index arrays.
            chunks = range(first, last + 1)
        elif last - first < 63:
            # Within 63 chunks: which ones, as the bits of one OR over the writes (a
            # fraction of the cost of storing a mark per write).
            bits = int(np.bitwise_or.reduce(np.left_shift(1, (index >> CHUNK_SHIFT) - first)))
            chunks = [first + b for b in range(last - first + 1) if bits >> b & 1]
        else:
            chunks = []  # spread wide: marked below with one store per write
        cow = self._cow
        if cow is not None:
            for c in chunks or np.unique(index >> CHUNK_SHIFT).tolist():
                if c in cow and cow[c] is None:
                    cow[c] = self.copy_chunk(c)
        self._grow_dirty(last)
        if chunks:
            for c in chunks:
                self._dirty[c] = 1
        else:
            np.frombuffer(self._dirty, dtype=np.uint8)[index >> CHUNK_SHIFT] = 1

    def _grow_dirty(self, chunk: int) -> None:
        if chunk >= len(self._dirty):
            n = len(self._dirty)
            self._dirty.extend(bytes(max(chunk + 1, n + n // 2) - n))

    def dirty_chunks(self) -> list[int]:
        """The chunks written since the last :meth:`begin_save` (before the first one:
        every chunk that holds a written page), ascending."""
        if not self._marking:
            return sorted({page >> CHUNK_SHIFT for page in self._extent})
        return np.flatnonzero(np.frombuffer(self._dirty, dtype=np.uint8)).tolist()

    def mark_saved(self) -> None:
        """Every chunk is saved as it is now (a VM just loaded from its files); from now
        on writes mark the chunks they change."""
        self._dirty[:] = bytes(len(self._dirty))
        self._marking = True

    def copy_chunk(self, chunk: int) -> ChunkCopy:
        """The written pages of ``chunk``, copied: their page numbers, extents and bytes."""
        pages: list[int] = []
        los: list[int] = []
        lens: list[int] = []
        parts: list[memoryview] = []
        extent = self._extent
        slab = self._slab_mv
        first = chunk << CHUNK_SHIFT
        if len(extent) < CHUNK_PAGES:
            candidates: list[int] | range = sorted(
                p for p in extent if p >> CHUNK_SHIFT == chunk
            )
        else:
            candidates = range(first, first + CHUNK_PAGES)
        for page in candidates:
            ext = extent.get(page)
            if ext is None:
                continue
            lo, hi, base, _ = ext
            pages.append(page)
            los.append(lo)
            lens.append(hi - lo)
            parts.append(slab[base + lo : base + hi])
        return ChunkCopy(
            chunk, np.array(pages, dtype=np.int64), np.array(los, dtype=np.int64),
            np.array(lens, dtype=np.int64), b"".join(parts),
        )

    def begin_save(self) -> list[int]:
        """Start a save: returns the chunks written since the last one, ascending, and
        from now on keeps their contents as they are now until :meth:`take_chunk`."""
        chunks = self.dirty_chunks()
        self.mark_saved()
        self._cow = dict.fromkeys(chunks)
        return chunks

    def take_chunk(self, chunk: int) -> ChunkCopy:
        """A chunk of the running save, as it was when the save began."""
        assert self._cow is not None, "no save is running"
        copy = self._cow.pop(chunk, None)
        return copy if copy is not None else self.copy_chunk(chunk)

    def end_save(self, unsaved: Iterable[int] = ()) -> None:
        """End the running save; ``unsaved`` chunks (a failed save's) and those not taken
        are dirty again, so the next save writes them."""
        again = list(unsaved)
        if self._cow is not None:
            again.extend(self._cow)
        for chunk in again:
            self._grow_dirty(chunk)
            self._dirty[chunk] = 1
        self._cow = None

    # ----------------------------------------------------------------- reads

    def read(self, index: int, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of page ``index`` (zeros where unwritten)."""
        ext = self._extent.get(index)
        if ext is None:
            return bytes(length)
        lo, hi, base, _ = ext
        end = offset + length
        if lo <= offset and end <= hi:
            return bytes(self._slab_mv[base + offset : base + end])
        out = bytearray(length)
        a = max(lo, offset)
        b = min(hi, end)
        if a < b:
            out[a - offset : b - offset] = self._slab_mv[base + a : base + b]
        return bytes(out)

    def holds(self, index: int, lo: int, hi: int) -> bool:
        """Whether page ``index`` holds bytes ``[lo, hi)`` already (a write into them
        grows nothing)."""
        ext = self._extent.get(index)
        return ext is not None and ext[0] <= lo and hi <= ext[1]

    def read_u64(self, index: int, offset: int) -> int:
        """The little-endian 8-byte value at ``offset`` of page ``index``: the same as
        ``int.from_bytes(self.read(index, offset, 8), "little")``, faster."""
        ext = self._extent.get(index)
        if ext is None:
            return 0
        if ext[0] <= offset and offset + 8 <= ext[1]:
            value: int = _unpack_u64(self._slab_mv, ext[2] + offset)[0]
            return value
        return int.from_bytes(self.read(index, offset, 8), "little")

    def written_pages(self) -> list[int]:
        """Page numbers that hold data, ascending."""
        return sorted(self._extent)

    def extents(self) -> Iterator[tuple[int, int, bytes]]:
        """``(page, lo, data)`` of every written page, by page: its extent as held."""
        for page in sorted(self._extent):
            lo, hi, base, _ = self._extent[page]
            yield page, lo, self._slab[base + lo : base + hi].tobytes()
