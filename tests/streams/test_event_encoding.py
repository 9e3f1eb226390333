"""The Watch stream's bulk event encoding (numpy varints parsed by upb) builds exactly the
message that extending each repeated field would."""

from __future__ import annotations

import numpy as np
from google.protobuf.internal.encoder import (  # type: ignore[attr-defined]
    _VarintBytes,  # protobuf's reference encoder
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.domain.events import EventBatch
from pagetrackd.transport import convert as cv

U64_EDGES = [0, 1, 127, 128, 16383, 16384, 2**21, 2**32 - 1, 2**35, 2**56 - 1, 2**56,
             2**63 - 1, 2**63, 2**64 - 1]


def _u64(bits: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([v for v in U64_EDGES if v < 1 << bits]),
                     st.integers(0, (1 << bits) - 1))


@st.composite
def batches(draw: st.DrawFn) -> EventBatch:
    n = draw(st.integers(1, 40))
    same = draw(st.booleans())  # columns of one value take the shortcut
    col = (lambda s: [draw(s)] * n) if same else (lambda s: draw(st.lists(s, min_size=n,
                                                                          max_size=n)))
    length = col(st.integers(1, 4096) if draw(st.booleans()) else st.integers(1, 9))
    return EventBatch(
        np.array(draw(st.lists(_u64(64), min_size=n, max_size=n)), dtype=np.uint64),
        np.array(col(_u64(52)), dtype=np.uint64),
        np.array(length, dtype=np.uint32),
        np.array(col(st.sampled_from([0, 1, 7, 127, 128, 4095, 2**32 - 1])), dtype=np.uint32),
        np.array(col(st.sampled_from([0, 1])), dtype=np.uint8),
        draw(st.binary(min_size=sum(length), max_size=sum(length))),
        np.array(col(st.sampled_from([0, 8])), dtype=np.uint8),
    )


def reference(parts: list[tuple[EventBatch, int]], head_seq: int, omit: bool) -> pb.EventBatch:
    """The plain way: extend every repeated field from Python ints."""
    msg = pb.EventBatch(head_seq=head_seq)
    base = pb.TRACK_MODE_WRITE << 8 | (pb.EVENT_FLAG_DATA_OMITTED if omit else 0)
    for b, ts in parts:
        msg.seq.extend(b.seq.tolist())
        msg.gpa.extend(b.gpa.tolist())
        msg.length.extend(b.length.tolist())
        msg.vcpu.extend(b.vcpu.tolist())
        msg.flags.extend(
            [base | s | f for s, f in zip(b.source.tolist(), b.flags.tolist(), strict=True)]
        )
        msg.timestamp_ns.extend([ts] * len(b))
        if not omit:
            msg.data += b.data
    return msg


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.tuples(batches(), _u64(64)), min_size=1, max_size=4),
    head_seq=_u64(64),
    omit=st.booleans(),
)
def test_bulk_encoding_equals_field_by_field(
    parts: list[tuple[EventBatch, int]], head_seq: int, omit: bool
) -> None:
    out = pb.WatchResponse()
    cv.fill_events(out.events, parts, head_seq, omit)
    assert out.WhichOneof("kind") == "events"
    want = reference(parts, head_seq, omit)
    assert out.events == want
    assert out.events.SerializeToString(deterministic=True) == want.SerializeToString(
        deterministic=True)


@given(st.lists(_u64(64), min_size=1, max_size=200))
def test_varints_match_protobuf(values: list[int]) -> None:
    """Mixed widths, equal widths and repeats all encode as protobuf's own encoder does."""
    payload = cv.varints(np.array(values, dtype=np.uint64))
    assert payload == b"".join(_VarintBytes(v) for v in values)


@settings(max_examples=50, deadline=None)
@given(parts=st.lists(st.tuples(batches(), _u64(64)), min_size=1, max_size=3),
       head_seq=_u64(64), omit=st.booleans())
def test_response_wire_is_a_watch_response_with_those_events(
    parts: list[tuple[EventBatch, int]], head_seq: int, omit: bool
) -> None:
    """What the stream sends as bytes parses as WatchResponse(events=...)."""
    got = pb.WatchResponse.FromString(cv.events_response_wire(parts, head_seq, omit))
    assert got == pb.WatchResponse(events=reference(parts, head_seq, omit))
