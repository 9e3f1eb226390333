"""The track pool's structures against plain dict models, driven by hypothesis.

``RunMap`` (owner references by runs), ``ChunkedCounters`` (sparse and dense directory,
span and scattered paths) and ``SlotTracking`` (counters + owners + large-page region
counts) must answer every read exactly as a ``{page: count}`` dict does, whatever mix of
ranges, scattered pages and deltas built them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pagetrackd.domain.track import CHUNK, ChunkedCounters, RegionCounts, RunMap, SlotTracking
from pagetrackd.domain.types import TENANT_OWNER

#: pages in the modelled slot: 160 chunks, so touching more than 64 of them switches
#: the counters to the dense directory
NPAGES = 160 * CHUNK
pages_st = st.integers(0, NPAGES - 1)


def _check_runs(rm: RunMap) -> None:
    s, e, v = rm.starts, rm.ends, rm.values
    assert (s < e).all() and (v > 0).all()
    assert (s[1:] >= e[:-1]).all()
    touching = s[1:] == e[:-1]
    assert not (touching & (v[1:] == v[:-1])).any(), "touching runs with one value"


@st.composite
def page_sets(draw: st.DrawFn) -> list[int]:
    """A set of pages: a range, scattered pages, or both."""
    out: set[int] = set()
    if draw(st.booleans()):
        start = draw(pages_st)
        out.update(range(start, min(NPAGES, start + draw(st.integers(1, 3 * CHUNK * 40)))))
    out.update(draw(st.lists(pages_st, max_size=12)))
    if not out:
        out.add(draw(pages_st))
    return sorted(out)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(page_sets(), st.integers(1, 3), st.sampled_from(["run", "array", "one"])),
                max_size=12))
def test_runmap_matches_a_dict(ops: list[tuple[list[int], int, str]]) -> None:
    """Adds as one delta, a delta per page, or page by page with add1 (the path a
    plugin tracking one table page takes) keep the runs a dict of counts holds."""
    rm = RunMap()
    model: Counter[int] = Counter()
    for pages, n, how in ops:
        idx = np.array(pages, dtype=np.int64)
        # remove what is there when it can, else add
        if all(model[p] >= n for p in pages):
            delta = -n
        else:
            delta = n
        if how == "array":
            rm.add(idx, np.full(idx.size, delta, dtype=np.int64))
        elif how == "one":
            for p in pages[:40]:  # a long range one page at a time is slow to check
                rm.add1(p, delta)
                _check_runs(rm)
            pages = pages[:40]
        else:
            rm.add(idx, delta)
        for p in pages:
            model[p] += delta
        model = Counter({p: c for p, c in model.items() if c})
        _check_runs(rm)
        got_idx, got_cnt = rm.pages()
        assert dict(zip(got_idx.tolist(), got_cnt.tolist(), strict=True)) == dict(model)
        assert got_idx.tolist() == sorted(model)
        assert rm.total() == sum(model.values())
        assert rm.npages() == len(model)
        probe = np.array(sorted(set(pages) | {0, NPAGES - 1}), dtype=np.int64)
        assert rm.get(probe).tolist() == [model[p] for p in probe.tolist()]
        assert rm.get1(pages[0]) == model[pages[0]]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(page_sets(), st.integers(0, 0xFFFF), st.sampled_from("sSo")), max_size=10)
)
def test_chunked_counters_match_a_dict(ops: list[tuple[list[int], int, str]]) -> None:
    c = ChunkedCounters(NPAGES)
    model: dict[int, int] = {}
    for pages, value, how in ops:
        idx = np.array(pages, dtype=np.int64)
        values = ((idx * 7 + value) % 5).astype(np.uint16)  # some zeros among them
        if how == "s":
            c.set(idx, values)
        elif how == "S":
            # one span: the pages from the first to the last
            lo, hi = pages[0], pages[-1] + 1
            idx = np.arange(lo, hi, dtype=np.int64)
            values = ((idx * 7 + value) % 5).astype(np.uint16)
            c.set_span(lo, values)
        else:
            for i, v in zip(pages[:20], values[:20].tolist(), strict=False):
                c.set1(i, v)
            idx, values = idx[:20], values[:20]
        model.update(zip(idx.tolist(), values.tolist(), strict=True))
        want_nz = sorted(p for p, v in model.items() if v)
        assert c.nonzero == len(want_nz)
        assert c.nonzero_indices().tolist() == want_nz
        probe = np.array(pages + [0, NPAGES - 1, pages[0]], dtype=np.int64)
        assert c.get(probe).tolist() == [model.get(p, 0) for p in probe.tolist()]
        lo, hi = pages[0], pages[-1] + 1
        assert c.get_span(lo, hi).tolist() == [model.get(p, 0) for p in range(lo, hi)]
        assert c.get1(pages[-1]) == model.get(pages[-1], 0)


class SlotTrackingMachine(RuleBasedStateMachine):
    """SlotTracking against {page: {owner: refs}}."""

    OWNERS = (TENANT_OWNER, "lease:a", "lease:b", "plugin:vgpu")

    def __init__(self) -> None:
        super().__init__()
        self.base = 3 * 512 + 17  # not aligned to a 2 MiB region
        self.t = SlotTracking(NPAGES, self.base)
        self.refs: dict[int, Counter[str]] = {}

    def _count(self, page: int) -> int:
        return sum(self.refs.get(page, Counter()).values())

    @rule(pages=page_sets(), owner=st.sampled_from(OWNERS), n=st.integers(1, 2),
          per_page=st.booleans(), remove=st.booleans())
    def apply(self, pages: list[int], owner: str, n: int, per_page: bool, remove: bool) -> None:
        idx = np.array(pages, dtype=np.int64)
        if remove:
            if any(self.refs.get(p, Counter())[owner] < n for p in pages):
                return
            d = -n
        else:
            d = n
        before = {p: self._count(p) for p in pages}
        delta = np.full(idx.size, d, dtype=np.int64) if per_page else d
        started, stopped = self.t.apply(idx, delta, owner)
        for p in pages:
            self.refs.setdefault(p, Counter())[owner] += d
            self.refs[p] = +self.refs[p]
        assert started.tolist() == [p for p in pages if before[p] == 0 and self._count(p)]
        assert stopped.tolist() == [p for p in pages if before[p] and not self._count(p)]

    @rule(page=pages_st, owner=st.sampled_from(OWNERS), remove=st.booleans())
    def apply1(self, page: int, owner: str, remove: bool) -> None:
        if remove and not self.refs.get(page, Counter())[owner]:
            return
        d = -1 if remove else 1
        before = self._count(page)
        started, stopped = self.t.apply1(page, d, owner)
        self.refs.setdefault(page, Counter())[owner] += d
        self.refs[page] = +self.refs[page]
        assert (started, stopped) == (before == 0 and d > 0, before == 1 and d < 0)

    @rule(page=pages_st)
    def query_one(self, page: int) -> None:
        assert self.t.owners_of(page) == dict(self.refs.get(page, Counter()))
        for owner in self.OWNERS:
            assert self.t.held1(page, owner) == self.refs.get(page, Counter())[owner]

    @invariant()
    def agrees(self) -> None:
        tracked = sorted(p for p in self.refs if self._count(p))
        assert self.t.counters.nonzero_indices().tolist() == tracked
        every = np.arange(NPAGES, dtype=np.int64)
        assert self.t.counts(every).tolist() == [self._count(p) for p in range(NPAGES)]
        for owner in self.OWNERS:
            want = {p: c[owner] for p, c in self.refs.items() if c[owner]}
            held = self.t.held(every, owner)
            assert {int(p): int(held[p]) for p in np.flatnonzero(held)} == want
            if owner != TENANT_OWNER:
                idx, cnt = self.t.owner_arrays(owner)
                assert dict(zip(idx.tolist(), cnt.tolist(), strict=True)) == want
                assert (owner in self.t.owners) == bool(want)
        for rm in [self.t.attributed, *self.t.owners.values()]:
            _check_runs(rm)
        # region counts: tracked gfns per 2 MiB / 1 GiB region, as KVM's lpage_info
        r2: Counter[int] = Counter((p + self.base) >> 9 for p in tracked)
        r1: Counter[int] = Counter((p + self.base) >> 18 for p in tracked)
        first2, first1 = self.base >> 9, self.base >> 18
        assert {i + first2: v for i, v in self.t.lpage_2m.items()} == dict(r2)
        assert {i + first1: v for i, v in self.t.lpage_1g.items()} == dict(r1)
        end = self.base + NPAGES

        def edge(g: int, shift: int) -> bool:
            """R3.5: a region the slot covers only in part is always disallowed."""
            lo, hi = (g >> shift) << shift, ((g >> shift) + 1) << shift
            return lo < self.base or hi > end

        for p in (0, NPAGES // 2, NPAGES - 1):
            g = p + self.base
            assert self.t.lpage_disallowed(g) == (
                g >> 9 in r2 or edge(g, 9), g >> 18 in r1 or edge(g, 18)
            )

SlotTrackingMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None
)
TestSlotTracking = SlotTrackingMachine.TestCase


def test_a_whole_slot_range_costs_under_three_bytes_a_page_and_one_run_per_owner() -> None:
    n = 1 << 16
    t = SlotTracking(n, 0)
    every = np.arange(n, dtype=np.int64)
    started, _ = t.apply(every, 1, "lease:a")
    assert started.size == n and t.counters.nonzero == n
    assert len(t.owners["lease:a"]) == 1 and len(t.attributed) == 1
    assert t.nbytes <= 2.5 * n
    _, stopped = t.apply(every, -1, "lease:a")
    assert stopped.size == n and t.counters.nonzero == 0 and not t.owners


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(page_sets(), st.integers(1, 3)), max_size=8), pages_st, pages_st)
def test_runmap_span_reads_match_page_reads(
    ops: list[tuple[list[int], int]], a: int, b: int
) -> None:
    rm = RunMap()
    for pages, n in ops:
        rm.add(np.array(pages, dtype=np.int64), n)
    lo, hi = min(a, b), max(a, b) + 1
    every = np.arange(lo, hi, dtype=np.int64)
    assert rm.get_span(lo, hi).tolist() == rm.get(every).tolist()
    assert rm.counts_of(every).tolist() == rm.get(every).tolist()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 63), min_size=1, max_size=20, unique=True),
                          st.integers(1, 3), st.booleans()), max_size=12))
def test_region_counts_match_a_dict(ops: list[tuple[list[int], int, bool]]) -> None:
    rc = RegionCounts(64)  # dense past 8 regions
    model: Counter[int] = Counter()
    for regions, n, one_by_one in ops:
        regions = sorted(regions)
        step = -n if all(model[r] >= n for r in regions) else n
        if one_by_one:
            for r in regions:
                rc[r] = rc.get(r, 0) + step
        else:
            rc.add_many(np.array(regions, dtype=np.int64), np.full(len(regions), step))
        for r in regions:
            model[r] += step
        model = +model
        assert rc == dict(model) and len(rc) == len(model)
        assert all((r in rc) == (r in model) for r in range(64))
        assert rc.nbytes > 0 or not model
