"""EventBatch's select and slice against a plain list of events (the reference)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.domain import WriteEvent
from pagetrackd.domain.events import EventBatch
from pagetrackd.domain.types import Source

_events = st.lists(
    st.tuples(st.integers(0, 1 << 40), st.binary(min_size=1, max_size=40), st.booleans()),
    max_size=40,
).map(
    lambda rows: [
        WriteEvent(seq=i + 1, vcpu=i % 3, gpa=gpa, data=data,
                   source=Source.DMA if dma else Source.GUEST, untracked=dma and i % 2 == 0)
        for i, (gpa, data, dma) in enumerate(rows)
    ]
)


def _same(batch: EventBatch, want: list[WriteEvent]) -> None:
    assert list(batch.events()) == want
    assert batch.data == b"".join(e.data for e in want)
    assert int(batch.length.sum()) == len(batch.data)


@settings(max_examples=200, deadline=None)
@given(events=_events, data=st.data())
def test_select_keeps_exactly_the_masked_events(
    events: list[WriteEvent], data: st.DataObject
) -> None:
    batch = EventBatch.from_events(events)
    n = len(events)
    shape = data.draw(st.sampled_from(["any", "run"]))
    if shape == "run":  # neighbours only: the slice path
        lo = data.draw(st.integers(0, n))
        hi = data.draw(st.integers(lo, n))
        mask = (np.arange(n) >= lo) & (np.arange(n) < hi)
    else:
        mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    _same(batch.select(mask), [e for e, k in zip(events, mask.tolist(), strict=True) if k])


@settings(max_examples=200, deadline=None)
@given(events=_events, data=st.data())
def test_slice_keeps_the_events_between(events: list[WriteEvent], data: st.DataObject) -> None:
    batch = EventBatch.from_events(events)
    lo = data.draw(st.integers(0, len(events)))
    hi = data.draw(st.integers(lo, len(events)))
    _same(batch.slice(lo, hi), events[lo:hi])
