"""SlotMemory against a plain model: a dict of 4 KiB bytearrays.

Whatever mix of single writes, batched writes (aligned words, fixed and mixed lengths,
overlapping pieces, pieces that widen or create extents, whole pages), the store must
read back exactly what the model holds, and hold no more than the model's pages.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.domain.memory import PROMOTE_BYTES, SlotMemory

PAGE = 4096
PAGES = 2000  # spans many directory chunks


class Model:
    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def write(self, index: int, offset: int, data: bytes) -> None:
        page = self.pages.setdefault(index, bytearray(PAGE))
        page[offset : offset + len(data)] = data


def _check(mem: SlotMemory, model: Model) -> None:
    assert mem.written_pages() == sorted(model.pages)
    for index, held in model.pages.items():
        assert mem.read(index, 0, PAGE) == bytes(held), index
        assert mem.read_u64(index, 8) == int.from_bytes(held[8:16], "little")
    assert mem.read(PAGES + 5, 100, 16) == bytes(16)
    assert mem.nbytes <= PAGE * len(model.pages)
    for page, lo, data in mem.extents():
        assert bytes(model.pages[page][lo : lo + len(data)]) == data


piece = st.tuples(
    st.integers(0, PAGES - 1),  # page
    st.integers(0, PAGE - 1),  # offset
    st.sampled_from([1, 2, 4, 8, 8, 8, 3, 16, 64, 200, PAGE]),  # length
)


@st.composite
def batches(draw: st.DrawFn) -> tuple[str, list[tuple[int, int, int]]]:
    kind = draw(st.sampled_from(["single", "words", "mixed"]))
    if kind == "words":
        n = draw(st.sampled_from([1, 2, 4, 8]))
        pages = draw(st.lists(st.integers(0, 63), min_size=1, max_size=40))
        offs = draw(st.lists(st.integers(0, PAGE // n - 1), min_size=len(pages),
                             max_size=len(pages)))
        return kind, [(p * 31, o * n, n) for p, o in zip(pages, offs, strict=True)]
    pieces = draw(st.lists(piece, min_size=1, max_size=40))
    return kind, [(p, min(o, PAGE - n), n) for p, o, n in pieces]


@settings(max_examples=150, deadline=None)
@given(st.lists(batches(), min_size=1, max_size=12))
def test_store_matches_a_plain_model(
    steps: list[tuple[str, list[tuple[int, int, int]]]],
) -> None:
    mem, model = SlotMemory(), Model()
    counter = 0
    for kind, pieces in steps:
        datas = []
        for _, _, n in pieces:
            counter += 1
            datas.append(bytes((counter + i) & 0xFF or 1 for i in range(n)))
        if kind == "single":
            for (p, o, _), d in zip(pieces, datas, strict=True):
                mem.write(p, o, d)
                model.write(p, o, d)
            continue
        data = b"".join(datas)
        length = np.array([n for _, _, n in pieces], dtype=np.int64)
        start = np.cumsum(length) - length
        mem.write_many(
            np.array([p for p, _, _ in pieces], dtype=np.int64),
            np.array([o for _, o, _ in pieces], dtype=np.int64),
            data, start, length,
        )
        for (p, o, _), d in zip(pieces, datas, strict=True):
            model.write(p, o, d)
    _check(mem, model)


def test_batch_pieces_may_skip_bytes_of_the_data() -> None:
    """The write path passes only the pieces that reach memory: starts need not be
    contiguous."""
    mem = SlotMemory()
    data = bytes(range(32))
    mem.write_many(np.array([3, 3]), np.array([0, 8]), data, np.array([8, 24]), np.array([8, 8]))
    assert mem.read(3, 0, 16) == data[8:16] + data[24:32]


def test_overlapping_pieces_in_one_batch_leave_the_last() -> None:
    """SlotMemory._store relies on numpy assigning a repeated fancy index in order, the
    last value winning; this pins that behaviour for each store path."""
    for n in (8, 3, 200):
        mem = SlotMemory()
        pieces = 50
        data = b"".join(bytes([k + 1]) * n for k in range(pieces))
        mem.write_many(
            np.zeros(pieces, dtype=np.int64), np.zeros(pieces, dtype=np.int64), data,
            np.arange(pieces, dtype=np.int64) * n, np.full(pieces, n, dtype=np.int64),
        )
        assert mem.read(0, 0, n) == bytes([pieces]) * n
    target = np.zeros(8, dtype=np.uint8)
    target[np.array([1, 1, 1, 2])] = np.array([7, 8, 9, 4], dtype=np.uint8)
    assert target[1] == 9


def test_extents_widen_then_promote_to_whole_pages() -> None:
    mem = SlotMemory()
    mem.write(7, 100, b"ab")
    assert mem.nbytes == 8  # one aligned word
    mem.write(7, 200, b"cd")
    assert mem.nbytes == 208 - 96
    mem.write(7, 100 + PROMOTE_BYTES, b"x")
    assert mem.nbytes == PAGE
    assert mem.read(7, 100, 2) == b"ab" and mem.read(7, 200, 2) == b"cd"


def test_stale_extents_are_compacted() -> None:
    """Extents that grew leave stale bytes behind; the slab is compacted instead of
    growing without bound."""
    mem = SlotMemory()
    for round_ in range(30):
        for page in range(64):
            mem.write(page, 8 * round_, round_.to_bytes(8, "little"))
    assert mem.nbytes == 64 * 30 * 8
    assert mem._slab.size <= 4 * mem.nbytes
    assert all(mem.read_u64(p, 8 * 29) == 29 for p in range(64))
