"""One VM as a snapshot: capturing it from the live VM, and reading snapshot bytes back
into a checked :class:`Snapshot`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pagetrackd import __version__
from pagetrackd.application import Engine, VmEntry
from pagetrackd.domain import InvalidArgument, PageTrackError
from pagetrackd.domain.hub import HistoryDump
from pagetrackd.domain.snapshot import SlotState, VmState, check_state, export_vm, vm_options
from pagetrackd.state.container import (
    FORMAT_VERSION,
    SnapshotError,
    decode,
    encode,
    header_field,
    int_vector,
)
from pagetrackd.state.history_records import (
    history_arrays,
    history_header,
    read_history,
)
from pagetrackd.state.plugin_records import check_plugin_records, plugin_record

__all__ = ["Snapshot", "capture_entry", "read_snapshot", "snapshot_entry", "snapshot_from"]

@dataclass(slots=True)
class Snapshot:
    """A decoded, checked snapshot."""

    header: dict[str, Any]
    state: VmState
    raw_sha256: bytes = b""
    #: the event history, when it was saved (state-dir files)
    history: HistoryDump | None = None

    @property
    def tenant(self) -> str:
        """The tenant the VM belonged to."""
        return str(self.header.get("tenant", ""))

    @property
    def name(self) -> str:
        """The VM's saved name."""
        return self.state.name

    @property
    def plugins(self) -> list[dict[str, Any]]:
        """Saved plugin records, in attach order."""
        return list(self.header.get("plugins") or [])


def _vm_header(
    entry: VmEntry, state: VmState, engine: Engine | None
) -> dict[str, Any]:
    h = entry.hub.history
    lease_ids = sorted(
        {o[6:] for s in state.slots for o in s.owners if o.startswith("lease:")}
    )
    leases = []
    if engine is not None:
        for lease_id in lease_ids:
            try:
                lease = engine.leases.get(entry.tenant, lease_id)
            except PageTrackError:
                continue
            leases.append({"lease_id": lease_id, "ttl_ms": lease.ttl_ms, "label": lease.label})
    return {
        "format_version": FORMAT_VERSION,
        "kind": "pagetrack.vm",
        "daemon_version": __version__,
        "saved_at_ns": time.time_ns(),
        "tenant": entry.tenant,
        "name": state.name,
        "created_at_ns": entry.created_at_ns,
        "history": {"events": h.max_events, "bytes": h.max_bytes},
        "vm": {
            "vcpus": state.vcpus,
            "dma_policy": state.dma_policy,
            "semantics": state.semantics,
            "cost": state.cost,
            "limits": state.limits,
            "seq": state.seq,
            "stats": state.stats,
            "memory_included": state.memory_included,
        },
        "slots": [
            {
                "slot_id": s.slot_id,
                "base_gfn": s.base_gfn,
                "npages": s.npages,
                "flags": s.flags,
                "owners": list(s.owners),
                "dirty": s.dirty is not None,
                "memory_pages": int(s.mem_index.size),
            }
            for s in state.slots
        ],
        "plugins": [
            plugin_record(kind, plugin, entry.plugin_options.get(kind, {}))
            for kind, plugin in entry.plugins.items()
        ],
        "leases": leases,
        # the bytes of the VM's recording this state goes with (the file goes on after)
        "recording": _recording_bytes(entry),
    }


def _recording_bytes(entry: VmEntry) -> dict[str, Any] | None:
    if entry.recorder is None or entry.recording_file is None:
        return None
    entry.recorder.flush()
    return {"bytes": entry.recording_file.tell(), "overflowed": entry.recorder.overflowed}


def snapshot_entry(
    entry: VmEntry,
    *,
    include_memory: bool,
    engine: Engine | None = None,
    keep_owner: Callable[[str], bool] = lambda owner: True,
    include_history: bool = False,
) -> bytes:
    """One VM as snapshot bytes (``engine`` lets lease records be added). With
    ``include_history`` the event history goes too, so that streams can resume across a
    daemon restart (state-dir files)."""
    return encode(*capture_entry(
        entry, include_memory=include_memory, engine=engine, keep_owner=keep_owner,
        include_history=include_history,
    ))


def capture_entry(
    entry: VmEntry,
    *,
    include_memory: bool,
    engine: Engine | None = None,
    keep_owner: Callable[[str], bool] = lambda owner: True,
    include_history: bool = False,
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """One VM's snapshot header and arrays, copied out of the live VM (on the event
    loop); :func:`encode` makes the file of them anywhere (a thread)."""
    state = export_vm(entry.vm, include_memory=include_memory, keep_owner=keep_owner)
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for i, s in enumerate(state.slots):
        for j, (pages, counts) in enumerate(s.owners.values()):
            arrays[f"s{i}_o{j}_pages"] = pages
            arrays[f"s{i}_o{j}_counts"] = counts.astype(np.uint16)
        if s.dirty is not None:
            arrays[f"s{i}_dirty"] = s.dirty
        if s.mem_index.size:
            arrays[f"s{i}_mem_index"] = s.mem_index
            arrays[f"s{i}_mem_lo"] = s.mem_lo.astype(np.uint16)
            arrays[f"s{i}_mem_len"] = s.mem_len.astype(np.uint16)
            arrays[f"s{i}_mem_data"] = np.frombuffer(s.mem_data, dtype=np.uint8)
    header = _vm_header(entry, state, engine)
    if include_history:
        dump = entry.hub.history.dump()
        arrays.update(history_arrays(dump))
        header["history"].update(history_header(dump))
    return header, arrays


def read_snapshot(data: bytes) -> Snapshot:
    """Decode and check (self-contained) snapshot bytes. Raises SnapshotError naming the
    problem."""
    header, arrays = decode(data)
    return snapshot_from(header, arrays, hashlib.sha256(data).digest())


def snapshot_from(
    header: dict[str, Any], arrays: dict[str, np.ndarray[Any, Any]], digest: bytes = b""
) -> Snapshot:
    """Check a decoded snapshot (header and arrays, as a version 1 file holds them).
    Raises SnapshotError naming the problem."""
    if header.get("kind") != "pagetrack.vm":
        raise SnapshotError(f"snapshot holds {header.get('kind')!r}, not a pagetrack VM")
    vm = header_field(header, "vm", dict, "header")
    slots = []
    for i, sh in enumerate(header_field(header, "slots", list, "header")):
        where = f"slots[{i}]"
        s = SlotState(
            header_field(sh, "slot_id", int, where),
            header_field(sh, "base_gfn", int, where),
            header_field(sh, "npages", int, where),
            header_field(sh, "flags", int, where),
        )
        for j, owner in enumerate(header_field(sh, "owners", list, where)):
            if not isinstance(owner, str):
                raise SnapshotError(f"snapshot header: {where}.owners[{j}] is not a string")
            s.owners[owner] = (
                int_vector(arrays, f"s{i}_o{j}_pages").astype(np.int64),
                int_vector(arrays, f"s{i}_o{j}_counts").astype(np.int64),
            )
        if header_field(sh, "dirty", bool, where):
            s.dirty = int_vector(arrays, f"s{i}_dirty").astype(np.int64)
        if header_field(sh, "memory_pages", int, where):
            s.mem_index = int_vector(arrays, f"s{i}_mem_index").astype(np.int64)
            s.mem_lo = int_vector(arrays, f"s{i}_mem_lo").astype(np.int64)
            s.mem_len = int_vector(arrays, f"s{i}_mem_len").astype(np.int64)
            s.mem_data = int_vector(arrays, f"s{i}_mem_data").astype(np.uint8).tobytes()
        slots.append(s)
    state = VmState(
        name=header_field(header, "name", str, "header"),
        vcpus=header_field(vm, "vcpus", int, "vm"),
        dma_policy=header_field(vm, "dma_policy", str, "vm"),
        semantics=header_field(vm, "semantics", str, "vm"),
        cost=header_field(vm, "cost", dict, "vm"),
        limits=header_field(vm, "limits", dict, "vm"),
        seq=header_field(vm, "seq", int, "vm"),
        stats=header_field(vm, "stats", dict, "vm"),
        memory_included=header_field(vm, "memory_included", bool, "vm"),
        slots=slots,
    )
    try:
        check_state(state)
        vm_options(state)
    except InvalidArgument as exc:
        raise SnapshotError(str(exc)) from None
    check_plugin_records(header.get("plugins"))
    history = read_history(header.get("history"), arrays)
    return Snapshot(header, state, digest, history)

