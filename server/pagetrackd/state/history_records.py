"""A VM's event history in a snapshot: the columns as arrays, the rest in the header."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pagetrackd.domain import InvalidArgument
from pagetrackd.domain.errors import Compacted
from pagetrackd.domain.events import EventBatch
from pagetrackd.domain.findings import Finding, finding_from_record, finding_record
from pagetrackd.domain.history import History, HistoryDump
from pagetrackd.domain.stream_records import RegionRemoved, Stamped
from pagetrackd.domain.types import RegionChange, SlotChange
from pagetrackd.state.container import SnapshotError, header_field, int_vector

__all__ = [
    "HistoryCut", "cut_history", "history_arrays", "history_header", "merge_segments",
    "read_history", "segment_dump",
]


def _history_record(region: RegionRemoved) -> dict[str, Any]:
    c = region.change
    return {
        "base_gfn": region.base_gfn, "npages": region.npages, "at_seq": region.at_seq,
        "change": None if c is None else {
            "slot_id": c.slot_id, "change": c.change.value, "new_base_gfn": c.new_base_gfn,
        },
    }


def history_arrays(dump: HistoryDump) -> dict[str, np.ndarray[Any, Any]]:
    e = dump.events
    return {
        "h_seq": e.seq, "h_gpa": e.gpa, "h_length": e.length, "h_vcpu": e.vcpu,
        "h_source": e.source, "h_flags": e.flags,
        "h_data": np.frombuffer(e.data, dtype=np.uint8),
        "h_batch_events": dump.batch_events, "h_batch_ts": dump.batch_ts_ns,
        "h_is_region": dump.is_region.astype(np.uint8),
    }


def read_history(hist: Any, arrays: dict[str, np.ndarray[Any, Any]]) -> HistoryDump | None:
    if not isinstance(hist, dict) or "oldest_seq" not in hist:
        return None  # saved without its history (SnapshotVm, older files)
    regions = []
    for i, r in enumerate(header_field(hist, "regions", list, "history")):
        where = f"history.regions[{i}]"
        change = r.get("change") if isinstance(r, dict) else None
        try:
            rc = None if change is None else RegionChange(
                int(change["slot_id"]), SlotChange(change["change"]),
                int(change.get("new_base_gfn", 0)),
            )
        except (KeyError, TypeError, ValueError):
            raise SnapshotError(f"snapshot header: {where}.change is malformed") from None
        regions.append(RegionRemoved(
            header_field(r, "base_gfn", int, where), header_field(r, "npages", int, where),
            header_field(r, "at_seq", int, where), rc,
        ))
    def col(key: str, dtype: type[np.generic]) -> np.ndarray[Any, Any]:
        return int_vector(arrays, key).astype(dtype)

    events = EventBatch(
        col("h_seq", np.uint64), col("h_gpa", np.uint64),
        col("h_length", np.uint32), col("h_vcpu", np.uint32),
        col("h_source", np.uint8),
        int_vector(arrays, "h_data").astype(np.uint8).tobytes(),
        # Saved before events had flags: none set.
        int_vector(arrays, "h_flags").astype(np.uint8) if "h_flags" in arrays
        else np.zeros(arrays["h_seq"].size, dtype=np.uint8),
    )
    n = len(events)
    if events.gpa.size != n or events.length.size != n or events.vcpu.size != n or (
        events.source.size != n or events.flags.size != n
        or int(events.length.sum(dtype=np.int64)) != len(events.data)
    ):
        raise SnapshotError("snapshot history columns differ in length")
    lost = hist.get("lost", [])
    if not isinstance(lost, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 1 << 64 for v in r
        ) and r[0] <= r[1] for r in lost
    ):
        raise SnapshotError("snapshot header: history.lost is malformed")
    try:
        findings = [finding_from_record(f) for f in hist.get("findings", [])]
    except (InvalidArgument, TypeError) as exc:
        raise SnapshotError(f"snapshot header: history.findings: {exc}") from None
    return HistoryDump(
        findings=findings,
        lost=[(a, b) for a, b in lost],
        events=events,
        batch_events=int_vector(arrays, "h_batch_events").astype(np.int64),
        batch_ts_ns=int_vector(arrays, "h_batch_ts").astype(np.int64),
        is_region=int_vector(arrays, "h_is_region").astype(bool),
        regions=regions,
        oldest_seq=header_field(hist, "oldest_seq", int, "history"),
    )



def history_header(dump: HistoryDump) -> dict[str, Any]:
    """What of ``dump`` goes in the header (the arrays hold the rest)."""
    return {
        "oldest_seq": dump.oldest_seq,
        "regions": [_history_record(r) for r in dump.regions],
        "lost": [[a, b] for a, b in dump.lost],
        "findings": [finding_record(f) for f in dump.findings],
    }



# ---------------------------------------------------------------------- segments
#
# A state-directory VM file keeps its history in segments: each save appends the items
# stored since the last one as a new segment file; the oldest segments go once the
# ring no longer holds anything of them. At load the segments are joined and cut at
# the ring's oldest seq again.

SavedItem = Stamped | RegionRemoved | Finding


@dataclass(frozen=True, slots=True)
class HistoryCut:
    """What a save takes of a history: the items stored since the last save (the ring's
    own immutable objects), the seq they reach, and the newest of them."""

    items: list[SavedItem]
    upto: int  #: every event and finding up to this seq is saved with this cut
    last: SavedItem | None  #: the newest item saved so far (this cut's or before)
    #: the first seq the ring still holds: older segments can go
    oldest_seq: int


def cut_history(history: History, head_seq: int, upto: int, last: SavedItem | None) -> HistoryCut:
    """The items of ``history`` after the save that reached ``upto`` with ``last`` as
    its newest item (0 and None for a first save), up to ``head_seq``."""
    oldest = history.oldest_seq
    start = max(upto + 1, oldest)
    try:
        items = history.since(start, head_seq)
    except Compacted:
        items = []  # a history that keeps nothing
    out: list[SavedItem] = [i for i in items if isinstance(i, Stamped | RegionRemoved | Finding)]
    # Region records at the boundary seq may have been saved already: the items after
    # the last saved one are new (it is the same object while the ring holds it).
    for k, item in enumerate(out):
        if item is last:
            out = out[k + 1 :]
            break
    return HistoryCut(out, head_seq, out[-1] if out else last, oldest)


def segment_dump(items: list[SavedItem], first_seq: int) -> HistoryDump:
    """Items as the columns a segment file holds."""
    batches = [i for i in items if isinstance(i, Stamped)]
    return HistoryDump(
        events=EventBatch.concat([b.batch for b in batches]),
        batch_events=np.array([len(b.batch) for b in batches], dtype=np.int64),
        batch_ts_ns=np.array([b.ts_ns for b in batches], dtype=np.int64),
        is_region=np.array(
            [isinstance(i, RegionRemoved) for i in items if not isinstance(i, Finding)],
            dtype=bool,
        ),
        regions=[i for i in items if isinstance(i, RegionRemoved)],
        oldest_seq=first_seq,
        findings=[i for i in items if isinstance(i, Finding)],
    )


def merge_segments(parts: list[HistoryDump], oldest_seq: int,
                   lost: list[tuple[int, int]]) -> HistoryDump:
    """Segments joined in order and cut at ``oldest_seq``: events and findings before
    it and region records before its previous seq are left out, as the ring had let
    them go."""
    events = EventBatch.concat([p.events for p in parts])
    counts = np.concatenate([p.batch_events for p in parts] or [np.zeros(0, np.int64)])
    stamps = np.concatenate([p.batch_ts_ns for p in parts] or [np.zeros(0, np.int64)])
    flags = np.concatenate([p.is_region for p in parts] or [np.zeros(0, bool)])
    regions = [r for p in parts for r in p.regions]
    findings = [f for p in parts for f in p.findings if f.seq >= oldest_seq]
    # First kept event, and the batch holding it (batches before it go whole).
    k = int(np.searchsorted(events.seq, oldest_seq))
    ends = np.cumsum(counts)
    b = int(np.searchsorted(ends, k, side="right"))
    if b < counts.size:
        counts = counts[b:].copy()
        counts[0] = int(ends[b]) - k
    else:
        counts = counts[:0]
    keep_flags: list[bool] = []
    keep_regions: list[RegionRemoved] = []
    batch = region = 0
    for is_region in flags.tolist():
        if is_region:
            r = regions[region]
            region += 1
            if r.at_seq >= oldest_seq - 1:
                keep_flags.append(True)
                keep_regions.append(r)
        else:
            if batch >= b:
                keep_flags.append(False)
            batch += 1
    return HistoryDump(
        events=events.slice(k, len(events)),
        batch_events=counts,
        batch_ts_ns=stamps[b:],
        is_region=np.array(keep_flags, dtype=bool),
        regions=keep_regions,
        oldest_seq=oldest_seq,
        lost=lost,
        findings=findings,
    )
