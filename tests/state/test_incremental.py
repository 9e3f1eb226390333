"""Incremental saves: guest memory chunks (dirty set, copy on write), history segments
(cut and joined again) and the state directory's version 2 files, in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrack import snapshot_format as fmt
from pagetrackd.application import Engine
from pagetrackd.domain import SlotFlags, TenantId
from pagetrackd.domain.events import EventBatch
from pagetrackd.domain.history import History
from pagetrackd.domain.memory import CHUNK_PAGES, SlotMemory
from pagetrackd.domain.stream_records import RegionRemoved
from pagetrackd.state import StateDir, snapshot_entry
from pagetrackd.state.history_records import SavedItem, cut_history, merge_segments, segment_dump
from pagetrackd.state.incremental import files_dir

T = TenantId("acme")
PAGES = 4 * CHUNK_PAGES

# (page, offset, length, byte) writes; None marks where a save begins
writes = st.lists(
    st.one_of(
        st.tuples(
            # mostly within a few chunks; sometimes far out, so a batch spans more than
            # the 63 chunks SlotMemory._touch finds by bits
            st.one_of(st.integers(0, PAGES - 1), st.integers(0, 100 * CHUNK_PAGES)),
            st.integers(0, 4000), st.integers(1, 96), st.integers(1, 255),
        ),
        st.just(None),
    ),
    max_size=60,
)


def _model_write(model: dict[int, bytearray], page: int, off: int, n: int, b: int) -> None:
    n = min(n, 4096 - off)
    model.setdefault(page, bytearray(4096))[off : off + n] = bytes([b]) * n


def _chunk_bytes(model: dict[int, bytearray], chunk: int) -> dict[int, bytes]:
    return {p: bytes(v) for p, v in model.items() if p // CHUNK_PAGES == chunk}


def _copy_bytes(mem: SlotMemory, chunk: int) -> dict[int, bytes]:
    c = mem.take_chunk(chunk)
    out = {}
    at = 0
    for p, lo, n in zip(c.pages.tolist(), c.lo.tolist(), c.length.tolist(), strict=True):
        page = bytearray(4096)
        page[lo : lo + n] = c.data[at : at + n]
        at += n
        out[p] = bytes(page)
    return out


@settings(max_examples=150, deadline=None)
@given(before=writes, during=writes, mode=st.sampled_from(["write", "write_many", "batches"]),
       fail=st.booleans())
def test_a_save_gets_memory_as_it_was_when_it_began(
    before: list[tuple[int, int, int, int] | None],
    during: list[tuple[int, int, int, int] | None],
    mode: str, fail: bool,
) -> None:
    """The chunks a save takes hold the memory of the moment it began, whatever is
    written while it runs (copy on write); the dirty set then names exactly the chunks
    written since, plus the save's own if it failed. Writes go one by one, one per
    write_many, or as batches (the writes between two Nones in one write_many, which
    then spans one chunk, a few, or more than 63)."""
    mem = SlotMemory()
    model: dict[int, bytearray] = {}

    def store(ops: list[tuple[int, int, int]], data: bytes) -> None:
        length = np.array([n for _, _, n in ops], dtype=np.int64)
        mem.write_many(np.array([p for p, _, _ in ops], dtype=np.int64),
                       np.array([o for _, o, _ in ops], dtype=np.int64), data,
                       np.cumsum(length) - length, length)

    def apply(ops: list[tuple[int, int, int, int] | None]) -> set[int]:
        touched = set()
        group: list[tuple[int, int, int]] = []
        data = b""
        for op in [*ops, None]:
            if op is None:
                if group:
                    store(group, data)
                group, data = [], b""
                continue
            page, off, n, b = op
            n = min(n, 4096 - off)
            if mode == "batches":
                group.append((page, off, n))
                data += bytes([b]) * n
            elif mode == "write_many":
                store([(page, off, n)], bytes([b]) * n)
            else:
                mem.write(page, off, bytes([b]) * n)
            _model_write(model, page, off, n, b)
            touched.add(page // CHUNK_PAGES)
        return touched

    written = apply(before)
    assert mem.dirty_chunks() == sorted(written)
    chunks = mem.begin_save()
    assert chunks == sorted(written) and mem.dirty_chunks() == []
    at_begin = {c: _chunk_bytes(model, c) for c in chunks}
    half = len(chunks) // 2
    taken = {c: _copy_bytes(mem, c) for c in chunks[:half]}
    later = apply(during)  # writes while the save runs
    taken.update({c: _copy_bytes(mem, c) for c in chunks[half:]})
    assert taken == at_begin
    mem.end_save(chunks if fail else ())
    assert mem.dirty_chunks() == sorted(later | (set(chunks) if fail else set()))


def _batch(first: int, n: int) -> EventBatch:
    seq = np.arange(first, first + n, dtype=np.uint64)
    return EventBatch(seq, seq * 8, np.full(n, 8, np.uint32), np.zeros(n, np.uint32),
                      np.zeros(n, np.uint8), bytes(8 * n), np.zeros(n, np.uint8))


# ("e", n): a batch of n events; ("r",): a region record; ("s",): a save
steps = st.lists(
    st.one_of(st.tuples(st.just("e"), st.integers(1, 40)), st.just(("r",)), st.just(("s",))),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(steps=steps, max_events=st.integers(0, 120))
def test_history_segments_join_to_what_the_ring_holds(
    steps: list[tuple[str, int] | tuple[str]], max_events: int
) -> None:
    """Segments cut at each save, the ones the ring has let go dropped, joined and cut
    at the ring's oldest seq give what the ring holds (a plain model: its dump)."""
    h = History(max_events=max_events, max_bytes=1 << 30)
    seq = 0
    upto, last = 0, None
    segments: list[tuple[int, list[SavedItem]]] = []  # (last seq, items)

    def save() -> None:
        nonlocal upto, last, segments
        cut = cut_history(h, seq, upto, last)
        segments = [s for s in segments if s[0] >= cut.oldest_seq - 1]
        if cut.items:
            segments.append((cut.upto, cut.items))
        upto, last = cut.upto, cut.last

    for step in steps:
        if len(step) == 2:
            n = step[1]
            h.track_write_batch(None, _batch(seq + 1, n))  # type: ignore[arg-type]
            seq += n
        elif step[0] == "r":
            h._flush()
            h._append(RegionRemoved(0, 1, seq))
        else:
            save()
    save()
    joined = merge_segments([segment_dump(items, 0) for _, items in segments],
                            h.oldest_seq, [])
    want = h.dump()
    assert joined.events.seq.tolist() == want.events.seq.tolist()
    assert joined.batch_events.tolist() == want.batch_events.tolist()
    assert joined.is_region.tolist() == want.is_region.tolist()
    assert [r.at_seq for r in joined.regions] == [r.at_seq for r in want.regions]
    fresh = History(max_events=max_events, max_bytes=1 << 30)
    fresh.restore(joined, seq)  # it fits together
    assert fresh.dump().events.seq.tolist() == want.events.seq.tolist()


def _engine(npages: int = 8 * CHUNK_PAGES) -> Engine:
    e = Engine()
    vm = e.create_vm(T, "box", vcpus=2).vm
    vm.set_memslot(0, 0, npages, SlotFlags.NONE)
    vm.track_add([0, 1])
    for p in range(0, npages, 7):
        vm.write(0, p * 4096 + 16, p.to_bytes(8, "little"))
    return e


def _side_files(sd: StateDir) -> set[str]:
    return {p.name for p in files_dir(sd.vm_path(T, "box")).iterdir()}


async def test_a_save_writes_only_the_chunks_written_since(tmp_path: Path) -> None:
    """After one write, the next save writes one memory file (its chunk) and one history
    segment; the files no longer named are deleted; a load gives back every byte."""
    e = _engine()
    sd = StateDir(tmp_path)
    assert await sd.save(e) == 1
    first = _side_files(sd)
    assert sum(n.startswith("m") for n in first) == 1  # 8 chunks in one budget's file
    vm = e.vm(T, "box").vm
    vm.write(0, 5 * CHUNK_PAGES * 4096, b"changed!")  # chunk 5; untracked: no event
    vm.write(0, 0, b"tracked!")  # chunk 0 again, an event
    assert await sd.save(e) == 1
    second = _side_files(sd)
    new = second - first
    assert sorted(n[0] for n in new) == ["h", "m"]
    assert first & second  # the first memory file still holds the other chunks
    e2 = Engine()
    assert StateDir(tmp_path).load(e2) == 1
    vm2 = e2.vm(T, "box").vm
    for p in range(0, 8 * CHUNK_PAGES, 7):
        want = p.to_bytes(8, "little") if p else b"tracked!"
        assert vm2.read(p * 4096 + 16 if p else 0, 8) == want
    assert vm2.read(5 * CHUNK_PAGES * 4096, 8) == b"changed!"
    assert e2.vm(T, "box").hub.history.dump().events.seq.tolist() == [1, 2]


async def test_a_version_1_state_file_still_loads(tmp_path: Path) -> None:
    """A state directory written before incremental saves (one self-contained version 1
    file per VM) loads; the next save writes the VM in version 2."""
    e = _engine()
    entry = e.vm(T, "box")
    sd = StateDir(tmp_path)
    path = sd.vm_path(T, "box")
    path.parent.mkdir(parents=True)
    data = snapshot_entry(entry, include_memory=True, engine=e, include_history=True)
    assert fmt.header_length(data)[0] == 1
    path.write_bytes(data)
    e2 = Engine()
    assert sd.load(e2) == 1
    vm2 = e2.vm(T, "box").vm
    assert vm2.read(7 * 4096 + 16, 8) == (7).to_bytes(8, "little")
    vm2.write(0, 3 * 4096, b"x")
    assert await sd.save(e2) == 1
    assert fmt.header_length(path.read_bytes())[0] == 2
    e3 = Engine()
    assert StateDir(tmp_path).load(e3) == 1
    assert e3.vm(T, "box").vm.read(7 * 4096 + 16, 8) == (7).to_bytes(8, "little")
