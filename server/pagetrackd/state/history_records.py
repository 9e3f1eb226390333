"""A VM's event history in a snapshot: the columns as arrays, the rest in the header."""

from __future__ import annotations

from typing import Any

import numpy as np

from pagetrackd.domain import InvalidArgument
from pagetrackd.domain.events import EventBatch
from pagetrackd.domain.findings import finding_from_record, finding_record
from pagetrackd.domain.hub import HistoryDump, RegionRemoved
from pagetrackd.domain.types import RegionChange, SlotChange
from pagetrackd.state.container import SnapshotError, header_field, int_vector

__all__ = ["history_arrays", "history_header", "read_history"]


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
