"""Sparse guest memory of one memslot: storage grows with the bytes written.

A page that was never written costs nothing and reads as zeros. A written page keeps
only the extent ``[lo, lo + len(buf))`` that writes have covered so far; once that
extent passes :data:`PROMOTE_BYTES` the page is stored whole. So a VM whose guest
writes a few PTEs into each of many pages costs bytes, not 4 KiB, per page (KVM backs
whole pages; this is a deliberate saving of the simulator).
"""

from __future__ import annotations

import struct

from pagetrackd.domain.types import PAGE_SIZE

#: An extent wider than this is widened to the whole page.
PROMOTE_BYTES = 1024
_unpack_u64 = struct.Struct("<Q").unpack_from


class _Page:
    __slots__ = ("lo", "buf")

    def __init__(self, lo: int, buf: bytearray) -> None:
        self.lo = lo
        self.buf = buf


class SlotMemory:
    """The guest memory behind one memslot, indexed by page number within the slot."""

    __slots__ = ("_pages", "nbytes")

    def __init__(self) -> None:
        self._pages: dict[int, _Page] = {}
        self.nbytes = 0  #: bytes of page data held

    @property
    def pages(self) -> int:
        """Number of pages that were ever written."""
        return len(self._pages)

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Store ``data`` at ``offset`` of page ``index``; it must fit in the page."""
        n = len(data)
        page = self._pages.get(index)
        if page is None:
            self._pages[index] = _Page(offset, bytearray(data))
            self.nbytes += n
            return
        lo = page.lo
        buf = page.buf
        if lo <= offset and offset + n <= lo + len(buf):
            buf[offset - lo : offset - lo + n] = data
            return
        hi = lo + len(buf)
        new_lo = min(lo, offset)
        new_hi = max(hi, offset + n)
        if new_hi - new_lo > PROMOTE_BYTES:
            new_lo, new_hi = 0, PAGE_SIZE
        grown = bytearray(new_hi - new_lo)
        grown[lo - new_lo : hi - new_lo] = buf
        grown[offset - new_lo : offset - new_lo + n] = data
        page.lo = new_lo
        page.buf = grown
        self.nbytes += len(grown) - len(buf)

    def write_many(
        self,
        index: list[int],
        offset: list[int],
        data: memoryview,
        start: list[int],
        length: list[int],
    ) -> None:
        """Store, in order, ``length[k]`` bytes of ``data`` from ``start[k]`` at
        ``offset[k]`` of page ``index[k]``: the same as calling :meth:`write` for each,
        with the common case (the piece lies inside the page's extent) inlined."""
        get = self._pages.get
        for i, off, o, n in zip(index, offset, start, length, strict=True):
            page = get(i)
            if page is not None:
                a = off - page.lo
                buf = page.buf
                if 0 <= a and a + n <= len(buf):
                    buf[a : a + n] = data[o : o + n]
                    continue
            self.write(i, off, data[o : o + n])

    def read(self, index: int, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of page ``index`` (zeros where unwritten)."""
        page = self._pages.get(index)
        if page is None:
            return bytes(length)
        lo = page.lo
        hi = lo + len(page.buf)
        if lo <= offset and offset + length <= hi:
            return bytes(page.buf[offset - lo : offset - lo + length])
        out = bytearray(length)
        a = max(lo, offset)
        b = min(hi, offset + length)
        if a < b:
            out[a - offset : b - offset] = page.buf[a - lo : b - lo]
        return bytes(out)

    def read_u64(self, index: int, offset: int) -> int:
        """The little-endian 8-byte value at ``offset`` of page ``index``: the same as
        ``int.from_bytes(self.read(index, offset, 8), "little")``, faster."""
        page = self._pages.get(index)
        if page is None:
            return 0
        a = offset - page.lo
        buf = page.buf
        if 0 <= a and a + 8 <= len(buf):
            value: int = _unpack_u64(buf, a)[0]
            return value
        return int.from_bytes(self.read(index, offset, 8), "little")

    def written_pages(self) -> list[int]:
        """Page numbers that hold data, ascending."""
        return sorted(self._pages)
