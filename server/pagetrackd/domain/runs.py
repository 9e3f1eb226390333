"""Per-owner reference counts of one memslot, held as runs of pages with one count."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.arrays import distinct
from pagetrackd.domain.counters import is_span

I64 = npt.NDArray[np.int64]


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

    def add1(self, index: int, delta: int) -> None:
        """:meth:`add` for one page (the count may not go below 0): the run holding it
        is split around it and merged with its neighbours in plain Python, as a plugin
        tracks one table page at a time and the array path costs tens of microseconds."""
        starts, ends, values = self.starts, self.ends, self.values
        i = int(np.searchsorted(starts, index, side="right")) - 1
        inside = i >= 0 and index < int(ends[i])
        old = int(values[i]) if inside else 0
        # The runs around the page that may change: its own (split) and one each side,
        # or the one each side of where it goes.
        a, b = (max(i - 1, 0) if inside else max(i, 0)), i + 2
        local: list[list[int]] = []
        for s, e, v in zip(starts[a:b].tolist(), ends[a:b].tolist(), values[a:b].tolist(),
                           strict=True):
            if s <= index < e:
                local += [[s, index, v], [index, index + 1, old + delta], [index + 1, e, v]]
            else:
                local.append([s, e, v])
        if not inside:
            local.append([index, index + 1, delta])
            local.sort()
        merged: list[list[int]] = []
        for run in local:
            if not run[2] or run[0] == run[1]:
                continue
            if merged and merged[-1][1] == run[0] and merged[-1][2] == run[2]:
                merged[-1][1] = run[1]
            else:
                merged.append(run)
        cols = np.array(merged, dtype=np.int64).reshape(-1, 3)
        self.starts = np.concatenate([starts[:a], cols[:, 0], starts[b:]])
        self.ends = np.concatenate([ends[:a], cols[:, 1], ends[b:]])
        self.values = np.concatenate([values[:a], cols[:, 2], values[b:]])

    def add_span(self, lo: int, hi: int, delta: int) -> None:
        """Add ``delta`` to the count of pages ``lo .. hi - 1`` (no count goes below 0)."""
        pts = distinct(np.concatenate([self.starts, self.ends, [lo, hi]]))
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
        pts = distinct(np.concatenate([self.starts, self.ends, us, ue]))
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


def _eval(starts: I64, ends: I64, values: I64, at: I64) -> I64:
    """The value of the runs at each page of ``at`` (0 outside every run)."""
    if starts.size == 0:
        return np.zeros(at.shape, dtype=np.int64)
    pos = np.searchsorted(starts, at, side="right") - 1
    safe = np.maximum(pos, 0)
    out: I64 = np.where((pos >= 0) & (at < ends[safe]), values[safe], 0)
    return out
