"""The Watch stream's hand-built wire form against protobuf's own parser."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.domain.events import EventBatch
from pagetrackd.transport.convert import events_response_wire, varint

_U64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(_U64)
def test_varint_parses_back(value: int) -> None:
    # Progress.head_seq is field 1, a varint: tag byte 0x08
    assert pb.Progress.FromString(b"\x08" + varint(value)).head_seq == value


@given(st.lists(st.tuples(_U64, st.integers(1, 64), st.integers(0, 4095)), min_size=1,
                max_size=40),
       st.integers(0, 2**63))
def test_events_message_parses_back(events: list[tuple[int, int, int]], head: int) -> None:
    n = len(events)
    lengths = [length for _, length, _ in events]
    data = bytes(i % 251 for i in range(sum(lengths)))
    batch = EventBatch(
        np.arange(1, n + 1, dtype=np.uint64), np.array([g for g, _, _ in events], np.uint64),
        np.array(lengths, np.uint32), np.array([v for _, _, v in events], np.uint32),
        np.zeros(n, np.uint8), data, np.zeros(n, np.uint8),
    )
    msg = pb.WatchResponse.FromString(events_response_wire([(batch, 1234)], head, False))
    ev = msg.events
    assert list(ev.seq) == list(range(1, n + 1))
    assert list(ev.gpa) == [g for g, _, _ in events]
    assert list(ev.length) == lengths
    assert list(ev.vcpu) == [v for _, _, v in events]
    assert list(ev.timestamp_ns) == [1234] * n
    assert ev.data == data
    assert ev.head_seq == head
