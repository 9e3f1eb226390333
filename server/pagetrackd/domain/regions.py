"""Tracked gfns per large-page region (2 MiB, 1 GiB) of one memslot, and its edges."""

from __future__ import annotations

import sys
from collections.abc import Iterator, MutableMapping

import numpy as np
import numpy.typing as npt

#: a large-page region count's entry, bytes (as nbytes counts it)
REGION_ENTRY_BYTES = 64

I64 = npt.NDArray[np.int64]


def region_counts(base_gfn: int, npages: int) -> tuple[RegionCounts, RegionCounts]:
    """Empty 2 MiB and 1 GiB region counts for a slot."""
    last = base_gfn + npages - 1
    return (
        RegionCounts((last >> 9) - (base_gfn >> 9) + 1),
        RegionCounts((last >> 18) - (base_gfn >> 18) + 1),
    )


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
        return sys.getsizeof(self._sparse) + REGION_ENTRY_BYTES * len(self._sparse) if (
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


def edges(base_gfn: int, npages: int) -> tuple[frozenset[int], frozenset[int]]:
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
