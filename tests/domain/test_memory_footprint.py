"""What guest memory, track counters and the event history say they hold is what they
really hold (measured with tracemalloc), and a growth bound taken before a write is
never passed by the write: quotas are checked on it before anything changes."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.domain.events import EventBatch, WriteEvent
from pagetrackd.domain.hub import History, Stamped
from pagetrackd.domain.memory import CHUNK_SHIFT, SlotMemory
from pagetrackd.domain.track import SlotTracking
from pagetrackd.domain.types import TENANT_OWNER, Source


def _measured(fn: object) -> tuple[int, object]:
    tracemalloc.start()
    try:
        out = fn()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[0], out
    finally:
        tracemalloc.stop()


def test_footprint_of_scattered_single_writes_is_what_tracemalloc_sees() -> None:
    pages = np.random.default_rng(3).choice(1 << 26, 50_000, replace=False).tolist()

    def run() -> SlotMemory:
        m = SlotMemory()
        for p in pages:
            m.write(p, 8 * (p % 500), b"12345678")
        return m

    used, m = _measured(run)
    assert isinstance(m, SlotMemory)
    assert m.nbytes == 8 * len(pages)  # the bytes written ...
    assert 0.85 * used <= m.footprint <= 1.15 * used  # ... and what is really held


def test_footprint_of_scattered_batches_is_what_tracemalloc_sees() -> None:
    pages = np.random.default_rng(4).choice(1 << 26, 50_000, replace=False)

    def run() -> SlotMemory:
        m = SlotMemory()
        for i in range(0, pages.size, 5000):
            idx = pages[i : i + 5000].astype(np.int64)
            n = idx.size
            offsets = (idx % 500) * 8
            starts = np.arange(n, dtype=np.int64) * 8
            m.write_many(idx, offsets, b"x" * 8 * n, starts, np.full(n, 8, dtype=np.int64))
        return m

    used, m = _measured(run)
    assert isinstance(m, SlotMemory)
    # Node arrays double when full; their untouched tails are counted by tracemalloc
    # but never resident.
    assert 0.8 * used <= m.footprint <= 1.1 * used


writes = st.lists(
    st.tuples(st.integers(0, 4095), st.integers(0, 4095), st.integers(1, 4096)),
    min_size=1, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(first=writes, second=writes, batch=st.tuples(st.booleans(), st.booleans()),
       saved=st.booleans())
def test_memory_growth_bound_holds(
    first: list[tuple[int, int, int]], second: list[tuple[int, int, int]],
    batch: tuple[bool, bool], saved: bool,
) -> None:
    """Each group written one by one or as a batch: a small batch after single writes
    (memory without a directory) once grew by a directory the bound did not count."""
    m = SlotMemory()
    if saved:
        m.mark_saved()  # writes mark their chunks from the first save on
    for group, as_batch in ((first, batch[0]), (second, batch[1])):
        # Half the pieces on a few pages, so extents widen and pages repeat.
        page = np.array([p % 64 if i % 2 else p for i, (p, _, _) in enumerate(group)],
                        dtype=np.int64)
        off = np.array([o for _, o, _ in group], dtype=np.int64)
        want = np.array([n for _, _, n in group], dtype=np.int64)
        length = np.maximum(1, np.minimum(want, 4096 - off))  # each piece inside its page
        bound = m.growth_bound(page, off, off + length)
        before = m.footprint
        data = b"\x01" * int(length.sum())
        start = np.cumsum(length) - length
        if as_batch:
            m.write_many(page, off, data, start, length)
        else:
            for p, o, s, n in zip(page.tolist(), off.tolist(), start.tolist(), length.tolist(),
                                  strict=True):
                m.write(p, o, data[s : s + n])
        assert m.footprint - before <= bound


@settings(max_examples=100, deadline=None)
@given(group=writes, batch=st.booleans())
def test_memory_footprint_is_the_same_before_and_after_the_first_save(
    group: list[tuple[int, int, int]], batch: bool
) -> None:
    """Before its first save a memory keeps no chunk marks, but it holds (and counts)
    the same chunk map, so a quota sees the same bytes either way."""
    page = np.array([p * 97 for p, _, _ in group], dtype=np.int64)  # over many chunks
    off = np.array([o for _, o, _ in group], dtype=np.int64)
    length = np.maximum(1, np.minimum(np.array([n for _, _, n in group]), 4096 - off))
    data = b"\x02" * int(length.sum())
    start = np.cumsum(length) - length
    never, saved = SlotMemory(), SlotMemory()
    saved.mark_saved()
    for m in (never, saved):
        if batch:
            m.write_many(page, off, data, start, length)
        else:
            for p, o, s, n in zip(page.tolist(), off.tolist(), start.tolist(),
                                  length.tolist(), strict=True):
                m.write(p, o, data[s : s + n])
    assert never.footprint == saved.footprint
    assert never.dirty_chunks() == saved.dirty_chunks() == sorted(
        {p >> CHUNK_SHIFT for p in page.tolist()}
    )


@settings(max_examples=100, deadline=None)
@given(
    gfns=st.lists(st.integers(0, (1 << 20) - 1), min_size=1, max_size=200, unique=True),
    owner=st.sampled_from([TENANT_OWNER, "lease:x"]),
)
def test_tracking_growth_bound_holds(gfns: list[int], owner: str) -> None:
    t = SlotTracking(1 << 20, 0)
    index = np.sort(np.array(gfns, dtype=np.int64))
    for part in (index[::2], index[1::2]):
        if not part.size:
            continue
        bound = t.growth_bound(part, owner)
        before = t.footprint
        t.apply(part, 1, owner)
        assert t.footprint - before <= bound


def test_history_of_one_event_batches_holds_its_max_bytes() -> None:
    """Each stored batch costs its objects too (some 760 bytes for one event), so a
    history of 1 MiB holds 1 MiB, not 1 MiB of event data in 28x as many objects."""
    limit = 1 << 20

    def run() -> History:
        h = History(max_events=1 << 24, max_bytes=limit)
        for i in range(20_000):
            event = WriteEvent(i + 1, 0, i << 12, b"8bytes!!", Source.GUEST)
            batch = EventBatch.from_events([event])
            h._append(Stamped(batch, time.time_ns()))
        return h

    used, h = _measured(run)
    assert isinstance(h, History)
    assert h.nbytes <= limit
    assert used <= 1.25 * limit
