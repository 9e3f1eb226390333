"""VM snapshots: a versioned, self-checking file format, and the daemon's state directory.

One snapshot holds one VM. Its layout (all integers little-endian)::

    b"PTVMSNAP"                     8 bytes, magic
    format_version                  u32 (FORMAT_VERSION)
    header_len                      u32
    header                          header_len bytes of UTF-8 JSON (tenant, name, options,
                                    limits, seq, statistics, memslots, plugins, leases)
    payload_len                     u64
    payload                         an .npz archive (numpy, no pickles) of the sparse
                                    arrays: per slot and owner the (page, references)
                                    pairs, the dirty log, and the written memory extents
    sha256                          32 bytes, of everything before it

A file cut short, with a flipped bit, or of another version is refused with a message
that says which. The state directory (``--state-dir``) holds one snapshot per VM at
``vms/<tenant>/<vm>.ptvm`` and the TTL leases in ``leases.json``; every file is written
to a temporary name, fsynced, renamed over the old one, and the directory fsynced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import stat
import struct
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from pagetrackd import __version__
from pagetrackd.application import Engine, VmEntry
from pagetrackd.domain import InvalidArgument, PageTrackError, TenantId, Vm, VmAlreadyExists
from pagetrackd.domain.events import EventBatch
from pagetrackd.domain.findings import finding_from_record, finding_record
from pagetrackd.domain.hub import HistoryDump, RegionRemoved
from pagetrackd.domain.snapshot import (
    SlotState,
    VmState,
    check_state,
    export_vm,
    import_vm,
    vm_options,
)
from pagetrackd.domain.types import TENANT_OWNER, RegionChange, SlotChange
from pagetrackd.files import fsync_dir, tmp_name, write_atomic
from pagetrackd.journal import Journal, JournalRecorder, replay_journal
from pagetrackd.leases import LeaseKind
from pagetrackd.plugins import Plugin, ops
from pagetrackd.plugins.shadow_mmu import ShadowMmu
from pagetrackd.replay import _encode as _encode_value
from pagetrackd.seqs import SEQS_FILE, SeqReservations

log = structlog.get_logger("pagetrackd.state")

__all__ = [
    "FORMAT_VERSION",
    "SUFFIX",
    "Snapshot",
    "SnapshotError",
    "StateDir",
    "decode",
    "encode",
    "prepare_vm",
    "read_snapshot",
    "restore_snapshot",
    "snapshot_length",
    "snapshot_entry",
]

FORMAT_VERSION = 1
MAGIC = b"PTVMSNAP"
SUFFIX = ".ptvm"
LEASES_FILE = "leases.json"
_PREFIX = struct.Struct("<8sII")
_U64 = struct.Struct("<Q")
_DIGEST = 32
#: a header larger than this is not ours (a VM's header is a few KiB)
MAX_HEADER_BYTES = 64 << 20


class SnapshotError(InvalidArgument):
    """Raised for snapshot bytes that are cut short, corrupt or of an unknown version."""

    field = "data"  # the request field that carries the snapshot


# ---------------------------------------------------------------------- container


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray[Any, Any]]) -> bytes:
    """The snapshot file for ``header`` (JSON-able) and ``arrays`` (numeric)."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    out = io.BytesIO()
    np.savez(out, allow_pickle=False, **arrays)
    payload = out.getvalue()
    body = b"".join(
        (_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)), head, _U64.pack(len(payload)), payload)
    )
    return body + hashlib.sha256(body).digest()


def _header_length(buf: bytes) -> int:
    """The header length that a snapshot's fixed prefix declares (``buf`` holds at least
    the prefix). Raises SnapshotError for bytes that are not a snapshot of this version."""
    magic, version, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise SnapshotError("not a pagetrack VM snapshot (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot format_version {version} is not supported; this daemon reads"
            f" version {FORMAT_VERSION}"
        )
    if hlen > MAX_HEADER_BYTES:
        raise SnapshotError(f"snapshot header length {hlen} is implausible; the file is corrupt")
    return int(hlen)


def snapshot_length(prefix: bytes) -> int | None:
    """The whole file's length as its first bytes declare it, or None while fewer than
    ``prefix + header + 8`` bytes are there. Raises SnapshotError for bytes that are
    not a snapshot of this version, so an upload is refused on its first message."""
    if len(prefix) < _PREFIX.size:
        return None
    hlen = _header_length(prefix)
    at = _PREFIX.size + hlen
    if len(prefix) < at + _U64.size:
        return None
    (plen,) = _U64.unpack_from(prefix, at)
    return int(at + _U64.size + plen + _DIGEST)


def _check_members(payload: bytes) -> None:
    """The arrays' zip members must be stored as they are (the daemon writes them so):
    a compressed member could decode to far more than was uploaded."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            infos = z.infolist()
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SnapshotError(f"snapshot arrays cannot be read: {exc}") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise SnapshotError(
                f"snapshot array {info.filename!r} is compressed; snapshots store arrays"
                " uncompressed"
            )
    if sum(i.file_size for i in infos) > len(payload):
        raise SnapshotError("snapshot arrays declare more bytes than the file holds")


def decode(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """Header and arrays of a snapshot file. Raises SnapshotError saying what is wrong."""
    n = len(data)
    if n < _PREFIX.size:
        raise SnapshotError(f"snapshot truncated: {n} bytes, not even a header")
    hlen = _header_length(data)
    at = _PREFIX.size + hlen
    if n < at + _U64.size:
        raise SnapshotError(
            f"snapshot truncated: {n} bytes, the header alone needs {at + _U64.size}"
        )
    (plen,) = _U64.unpack_from(data, at)
    want = at + _U64.size + plen + _DIGEST
    if n < want:
        raise SnapshotError(f"snapshot truncated: {n} bytes of {want}")
    if n > want:
        raise SnapshotError(f"snapshot has {n - want} bytes of trailing garbage after {want}")
    if hashlib.sha256(memoryview(data)[: want - _DIGEST]).digest() != data[want - _DIGEST :]:
        raise SnapshotError("snapshot sha256 mismatch: the data is corrupt")
    try:
        header = json.loads(data[_PREFIX.size : at])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"snapshot header is not valid JSON: {exc}") from None
    except RecursionError:
        raise SnapshotError("snapshot header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise SnapshotError("snapshot header is not a JSON object")
    payload = data[at + _U64.size : want - _DIGEST]
    _check_members(payload)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SnapshotError(f"snapshot arrays cannot be read: {exc}") from None
    return header, arrays


# ---------------------------------------------------------------------- plugins


@dataclass(frozen=True, slots=True)
class _Rebuild:
    """How to bring a re-attached plugin back to its saved shape from guest memory,
    for plugins without ``export_state``/``import_state``: what to record, how to replay
    it, and which attach options the replay stands in for."""

    save: Callable[[Plugin], Any]
    replay: Callable[[Plugin, Any], None]
    replaces: frozenset[str]
    #: the plugin rebuilds the rest on demand (the shadow MMU refaults its pages, as
    #: KVM's does after a migration), so fewer tracked gfns after the replay is expected
    lazy: bool = False


def _vgpu_replay(plugin: Plugin, ppgtts: Any) -> None:
    for mm in sorted(ppgtts, key=lambda m: int(m["ppgtt"])):
        for _ in range(max(1, int(mm.get("refs", 1)))):
            ops.build_ppgtt(plugin, root_gpa=int(mm["root_gpa"]))


def _vgpu_ppgtts(plugin: Plugin) -> list[dict[str, int]]:
    return [dataclasses.asdict(p) for p in ops.ppgtts(plugin)]


def _shadow_roots(plugin: Plugin) -> list[dict[str, int]]:
    roots = plugin.roots() if isinstance(plugin, ShadowMmu) else []
    return [dataclasses.asdict(r) for r in roots]


def _shadow_replay(plugin: Plugin, roots: Any) -> None:
    for r in roots:
        ops.set_root(plugin, cr3=int(r["cr3"]), vcpu=int(r["vcpu"]))


_REBUILD: dict[str, _Rebuild] = {
    "vgpu": _Rebuild(_vgpu_ppgtts, _vgpu_replay, frozenset({"root_gpa"})),
    "shadow_mmu": _Rebuild(
        _shadow_roots, _shadow_replay, frozenset({"root", "cr3", "vcpu"}), lazy=True
    ),
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def _plugin_record(kind: str, plugin: Plugin, options: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "kind": kind,
        "options": _jsonable(options),
        "status": _jsonable(plugin.status()),
    }
    export = getattr(plugin, "export_state", None)
    if callable(export):
        rec["state"] = _jsonable(export())
    elif kind in _REBUILD:
        rec["rebuild"] = _jsonable(_REBUILD[kind].save(plugin))
    return rec


#: JSON nesting a plugin record may have (its options, state and rebuild records)
_MAX_RECORD_DEPTH = 32
#: how often one saved PPGTT may be built again at restore (its reference count)
_MAX_PPGTT_REFS = 4096


def _depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests, counting no further than ``limit`` + 1."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _int_field(rec: Any, key: str, where: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    value = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SnapshotError(f"snapshot header: {where}.{key} must be an integer {lo}..{hi}")
    return value


def _check_plugin_records(records: Any) -> None:
    """Raise SnapshotError for a plugin record the restore could not act on."""
    if records is None:
        return
    if not isinstance(records, list):
        raise SnapshotError("snapshot header: plugins is not a list")
    for i, rec in enumerate(records):
        where = f"plugins[{i}]"
        if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
            raise SnapshotError(f"snapshot header: {where} has no plugin kind")
        if not isinstance(rec.get("options", {}), dict):
            raise SnapshotError(f"snapshot header: {where}.options is not an object")
        if _depth(rec, _MAX_RECORD_DEPTH) > _MAX_RECORD_DEPTH:
            raise SnapshotError(f"snapshot header: {where} nests too deeply")
        if "state" in rec and not isinstance(rec["state"], dict):
            raise SnapshotError(f"snapshot header: {where}.state is not an object")
        rebuild = rec.get("rebuild")
        if rebuild is None or "state" in rec:
            continue
        if not isinstance(rebuild, list):
            raise SnapshotError(f"snapshot header: {where}.rebuild is not a list")
        for j, r in enumerate(rebuild):
            at = f"{where}.rebuild[{j}]"
            if rec["kind"] == "vgpu":
                _int_field(r, "root_gpa", at)
                _int_field(r, "ppgtt", at)
                if "refs" in r:
                    _int_field(r, "refs", at, 1, _MAX_PPGTT_REFS)
            elif rec["kind"] == "shadow_mmu":
                _int_field(r, "cr3", at)
                _int_field(r, "vcpu", at, 0, 4095)


def _reattach(engine: Engine, entry: VmEntry, rec: dict[str, Any]) -> None:
    """Attach a saved plugin again and let it rebuild its shadow from guest memory."""
    kind = str(rec.get("kind", ""))
    options = dict(rec.get("options") or {})
    rebuild = _REBUILD.get(kind) if "state" not in rec else None
    if rebuild is not None and "rebuild" in rec:
        attach_opts = {k: v for k, v in options.items() if k not in rebuild.replaces}
    else:
        attach_opts = options
    plugin = engine.attach_plugin(entry, kind, attach_opts)
    entry.plugin_options[kind] = options
    if "state" in rec:
        load = getattr(plugin, "import_state", None)
        if callable(load):
            load(rec["state"])
    elif rebuild is not None and "rebuild" in rec:
        rebuild.replay(plugin, rec["rebuild"])


# ---------------------------------------------------------------------- one VM


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
            _plugin_record(kind, plugin, entry.plugin_options.get(kind, {}))
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


def _history_record(region: RegionRemoved) -> dict[str, Any]:
    c = region.change
    return {
        "base_gfn": region.base_gfn, "npages": region.npages, "at_seq": region.at_seq,
        "change": None if c is None else {
            "slot_id": c.slot_id, "change": c.change.value, "new_base_gfn": c.new_base_gfn,
        },
    }


def _history_arrays(dump: HistoryDump) -> dict[str, np.ndarray[Any, Any]]:
    e = dump.events
    return {
        "h_seq": e.seq, "h_gpa": e.gpa, "h_length": e.length, "h_vcpu": e.vcpu,
        "h_source": e.source, "h_flags": e.flags,
        "h_data": np.frombuffer(e.data, dtype=np.uint8),
        "h_batch_events": dump.batch_events, "h_batch_ts": dump.batch_ts_ns,
        "h_is_region": dump.is_region.astype(np.uint8),
    }


def _read_history(hist: Any, arrays: dict[str, np.ndarray[Any, Any]]) -> HistoryDump | None:
    if not isinstance(hist, dict) or "oldest_seq" not in hist:
        return None  # saved without its history (SnapshotVm, older files)
    regions = []
    for i, r in enumerate(_get(hist, "regions", list, "history")):
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
            _get(r, "base_gfn", int, where), _get(r, "npages", int, where),
            _get(r, "at_seq", int, where), rc,
        ))
    events = EventBatch(
        _array(arrays, "h_seq").astype(np.uint64), _array(arrays, "h_gpa").astype(np.uint64),
        _array(arrays, "h_length").astype(np.uint32), _array(arrays, "h_vcpu").astype(np.uint32),
        _array(arrays, "h_source").astype(np.uint8),
        _array(arrays, "h_data").astype(np.uint8).tobytes(),
        # Saved before events had flags: none set.
        _array(arrays, "h_flags").astype(np.uint8) if "h_flags" in arrays
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
        batch_events=_array(arrays, "h_batch_events").astype(np.int64),
        batch_ts_ns=_array(arrays, "h_batch_ts").astype(np.int64),
        is_region=_array(arrays, "h_is_region").astype(bool),
        regions=regions,
        oldest_seq=_get(hist, "oldest_seq", int, "history"),
    )


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
        arrays.update(_history_arrays(dump))
        header["history"]["oldest_seq"] = dump.oldest_seq
        header["history"]["regions"] = [_history_record(r) for r in dump.regions]
        header["history"]["lost"] = [[a, b] for a, b in dump.lost]
        header["history"]["findings"] = [finding_record(f) for f in dump.findings]
    return header, arrays


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise SnapshotError(f"snapshot header: {where} has no {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SnapshotError(f"snapshot header: {where}.{key} has the wrong type")
    return value


def _array(arrays: dict[str, np.ndarray[Any, Any]], key: str) -> np.ndarray[Any, Any]:
    a = arrays.get(key)
    if a is None:
        raise SnapshotError(f"snapshot payload has no array {key!r}")
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise SnapshotError(f"snapshot array {key!r} is not a vector of integers")
    return a


def read_snapshot(data: bytes) -> Snapshot:
    """Decode and check snapshot bytes. Raises SnapshotError naming the problem."""
    header, arrays = decode(data)
    if header.get("kind") != "pagetrack.vm":
        raise SnapshotError(f"snapshot holds {header.get('kind')!r}, not a pagetrack VM")
    vm = _get(header, "vm", dict, "header")
    slots = []
    for i, sh in enumerate(_get(header, "slots", list, "header")):
        where = f"slots[{i}]"
        s = SlotState(
            _get(sh, "slot_id", int, where),
            _get(sh, "base_gfn", int, where),
            _get(sh, "npages", int, where),
            _get(sh, "flags", int, where),
        )
        for j, owner in enumerate(_get(sh, "owners", list, where)):
            if not isinstance(owner, str):
                raise SnapshotError(f"snapshot header: {where}.owners[{j}] is not a string")
            s.owners[owner] = (
                _array(arrays, f"s{i}_o{j}_pages").astype(np.int64),
                _array(arrays, f"s{i}_o{j}_counts").astype(np.int64),
            )
        if _get(sh, "dirty", bool, where):
            s.dirty = _array(arrays, f"s{i}_dirty").astype(np.int64)
        if _get(sh, "memory_pages", int, where):
            s.mem_index = _array(arrays, f"s{i}_mem_index").astype(np.int64)
            s.mem_lo = _array(arrays, f"s{i}_mem_lo").astype(np.int64)
            s.mem_len = _array(arrays, f"s{i}_mem_len").astype(np.int64)
            s.mem_data = _array(arrays, f"s{i}_mem_data").astype(np.uint8).tobytes()
        slots.append(s)
    state = VmState(
        name=_get(header, "name", str, "header"),
        vcpus=_get(vm, "vcpus", int, "vm"),
        dma_policy=_get(vm, "dma_policy", str, "vm"),
        semantics=_get(vm, "semantics", str, "vm"),
        cost=_get(vm, "cost", dict, "vm"),
        limits=_get(vm, "limits", dict, "vm"),
        seq=_get(vm, "seq", int, "vm"),
        stats=_get(vm, "stats", dict, "vm"),
        memory_included=_get(vm, "memory_included", bool, "vm"),
        slots=slots,
    )
    try:
        check_state(state)
        vm_options(state)
    except InvalidArgument as exc:
        raise SnapshotError(str(exc)) from None
    _check_plugin_records(header.get("plugins"))
    history = _read_history(header.get("history"), arrays)
    return Snapshot(header, state, hashlib.sha256(data).digest(), history)


def prepare_vm(snap: Snapshot, name: str, leases: Iterable[str] = ()) -> Vm:
    """A new VM outside any registry, named ``name``, loaded with ``snap``'s state:
    tenant references and those of the lease ids in ``leases`` (other leases and plugins
    take theirs anew). It touches nothing shared, so it may run in a worker thread.
    Raises InvalidArgument when the state cannot be loaded."""
    allowed = {f"lease:{lid}" for lid in leases}

    def keep(owner: str) -> bool:
        return owner == TENANT_OWNER or owner in allowed or not (
            owner.startswith(("lease:", "plugin:"))
        )

    vm = Vm(name, **vm_options(snap.state))
    try:
        import_vm(snap.state, vm, keep_owner=keep)
    except (ValueError, TypeError, OverflowError, KeyError) as exc:
        vm.close()
        raise SnapshotError(f"snapshot cannot be restored: {type(exc).__name__}: {exc}") from None
    except BaseException:
        vm.close()
        raise
    return vm


def restore_snapshot(
    engine: Engine,
    tenant: TenantId,
    snap: Snapshot,
    *,
    name: str = "",
    replace: bool = False,
    leases: Iterable[str] = (),
    prepared: Vm | None = None,
    saved: bool = False,
) -> VmEntry:
    """Create the VM of ``snap`` for ``tenant`` (as ``name`` if given): ``prepared``
    if given (from :func:`prepare_vm`, which a caller may run in a worker thread), else
    a VM loaded here.

    The seq continues from the snapshot's; the event history is the saved one when the
    snapshot holds it (state-dir files), else it starts empty, so a resume from before
    the snapshot gets Compacted. Tenant references are restored, and lease references
    of the lease ids in ``leases`` (others are dropped: leases belong to live clients).
    Plugins are attached again and rebuild their shadows from guest memory, taking
    their tracking references anew. Raises AlreadyExists if the VM exists and
    ``replace`` is false, InvalidArgument if the snapshot cannot be loaded; nothing is
    changed then. ``saved`` is for the daemon's own state files: a VM it accepted is
    not refused at load by a quota (those are checked when it grows, as before).
    """
    state = snap.state
    name = name or state.name
    opts = vm_options(state)
    existing = None
    with contextlib.suppress(PageTrackError):
        existing = engine.vm(tenant, name)
    if existing is not None and not replace:
        raise VmAlreadyExists(
            f"VM {name!r} already exists; restore with replace to overwrite it"
        )
    if prepared is None:
        # Loaded into a VM outside the registry: every check passes before anything
        # changes, and that VM is the one registered.
        prepared = prepare_vm(snap, name, leases)
    if not saved:
        old_pages = sum(s.npages for s in existing.vm.memslots()) if existing else 0
        old_tracked = existing.vm.tracked_count if existing else 0
        engine.check_guest_pages(tenant, sum(s.npages for s in state.slots) - old_pages)
        engine.check_tracked(
            tenant, sum(s.counters()[0].size for s in state.slots) - old_tracked
        )
        if existing is None:
            engine.check_vm_count(tenant)
    hist = snap.header.get("history") or {}
    h_events = hist.get("events", engine.config.history_events)
    h_bytes = hist.get("bytes", engine.config.history_bytes)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h_events, h_bytes)):
        raise SnapshotError("snapshot header: history.events and history.bytes must be integers")
    recording = _saved_recording(snap.header) if saved else None
    if existing is not None:
        engine.delete_vm(tenant, name)
    entry = engine.create_vm(
        tenant, name, **opts, history_events=h_events, history_bytes=h_bytes,
        vm=prepared, check_quota=not saved, record=recording is not None,
        record_from=recording,
    )
    if entry.quota is not None:
        entry.quota.exempt = saved  # a VM the daemon accepted is never refused at load
    if entry.recorder is not None:
        entry.recorder._depth += 1  # loading is not an operation of the recording
    try:
        _fill(engine, entry, snap)
    except BaseException as exc:
        engine.delete_vm(tenant, name)  # never a half-made VM
        if isinstance(exc, PageTrackError) or not isinstance(exc, Exception):
            raise
        raise SnapshotError(f"snapshot cannot be restored: {type(exc).__name__}: {exc}") from None
    finally:
        if entry.quota is not None:
            entry.quota.exempt = False
        if entry.recorder is not None:
            entry.recorder._depth -= 1
    return entry


def _saved_recording(header: dict[str, Any]) -> tuple[int, bool] | None:
    """(bytes, overflowed) of the recording a state file's VM had, if it had one."""
    rec = header.get("recording")
    if not isinstance(rec, dict):
        return None
    size, over = rec.get("bytes"), rec.get("overflowed")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    return size, bool(over)


def _fill(engine: Engine, entry: VmEntry, snap: Snapshot) -> None:
    """The rest of a restore once the loaded VM is registered: history, plugins."""
    state = snap.state
    name = entry.name
    # Without a saved history nothing before the restored seq can be replayed: resumes
    # from there are compacted.
    entry.hub.history.oldest_seq = state.seq + 1
    if snap.history is not None:
        try:
            entry.hub.history.restore(snap.history, state.seq)
        except InvalidArgument as exc:
            log.warning("state.history_not_restored", vm=name, reason=str(exc))
    created = snap.header.get("created_at_ns")
    if isinstance(created, int) and created > 0:
        entry.created_at_ns = created
    for rec in snap.plugins:
        kind = rec.get("kind")
        try:
            _reattach(engine, entry, rec)
        except PageTrackError as exc:
            log.warning("state.plugin_not_restored", vm=name, plugin=kind, reason=str(exc))
            continue
        _compare_plugin_refs(entry, state, str(kind))


def _compare_plugin_refs(entry: VmEntry, state: VmState, kind: str) -> None:
    owner = f"plugin:{kind}"
    saved = sum(int(s.owners[owner][0].size) for s in state.slots if owner in s.owners)
    now = int(entry.vm.tracked_gfns(owner).size)
    rebuild = _REBUILD.get(kind)
    if saved != now and rebuild is not None and rebuild.lazy:
        log.info(
            "state.plugin_reshadows_lazily", vm=entry.name, plugin=kind,
            saved_gfns=saved, rebuilt_gfns=now,
        )
    elif saved != now:
        log.warning(
            "state.plugin_rebuilt_differently", vm=entry.name, plugin=kind,
            saved_gfns=saved, rebuilt_gfns=now,
        )


# ---------------------------------------------------------------------- the directory


def _seal(body: dict[str, Any]) -> bytes:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canon.encode()).hexdigest()
    return json.dumps(
        {"format_version": FORMAT_VERSION, "sha256": digest, "body": body}, indent=1
    ).encode()


def _unseal(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"not valid JSON ({exc}); truncated or corrupt") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"format_version is not {FORMAT_VERSION}")
    body = doc.get("body")
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    if hashlib.sha256(canon.encode()).hexdigest() != doc.get("sha256"):
        raise SnapshotError("sha256 mismatch: the file is corrupt")
    if not isinstance(body, dict):
        raise SnapshotError("body is not an object")
    return body


def _regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; a FIFO, device or directory named
    like a state file is refused at once instead of blocking the start."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _vm_key(tenant: str, name: str) -> str:
    return f"{tenant}/{name}"


@dataclass
class StateDir:
    """The daemon's saved state: load at start, save on a timer and at shutdown.

    Each VM is saved on its own: a VM whose file cannot be made or written (a full
    disk, a bug) is reported (``failing``, the save-error metric, a log line) and the
    other VMs are still saved. Only VMs that changed since their last save are
    written; the copy of a VM is taken on the event loop, the file is encoded and
    written in a thread.
    """

    path: Path
    include_memory: bool = True
    saves: int = 0  #: completed saves (every VM and the leases written)
    files_written: int = 0  #: VM files written (unchanged VMs are not rewritten)
    last_save_ns: int = 0  #: wall time of the last completed save
    last_save_s: float = 0.0  #: how long it took
    save_errors: int = 0  #: saves that left something unsaved
    vm_save_errors: int = 0  #: VM files that could not be saved, over all saves
    #: VMs whose last save failed ("tenant/vm" -> why); empty when all are saved
    failing: dict[str, str] = field(default_factory=dict)
    #: whether the last save wrote everything it had to
    last_save_complete: bool = True
    refused: list[str] = field(default_factory=list)  #: files moved aside at load
    #: with durability = "journal": every change between saves (see journal.py)
    journal: Journal | None = None
    #: journal records applied again at start
    journal_replayed: int = 0
    seqs: SeqReservations = field(init=False)
    #: VM file -> the journal index it holds
    _journaled: dict[Path, int] = field(default_factory=dict)
    _sigs: dict[Path, str] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.seqs = SeqReservations(self.path / SEQS_FILE)

    def vm_path(self, tenant: str, name: str) -> Path:
        """Where a VM's snapshot lives."""
        return self.path / "vms" / urllib.parse.quote(tenant, safe="") / f"{name}{SUFFIX}"

    # ------------------------------------------------------------------ load

    def _refuse(self, path: Path, reason: str) -> None:
        bad = path.with_name(path.name + ".bad")
        try:
            os.replace(path, bad)
            moved = str(bad)
        except OSError as exc:
            moved = f"(could not move it aside: {exc})"
        self.refused.append(str(path))
        log.error("state.file_refused", path=str(path), reason=reason, moved_to=moved)

    def load(self, engine: Engine) -> int:
        """Load every saved VM (and TTL lease) into ``engine``; returns VMs loaded.

        A file that cannot be loaded is logged, renamed to ``<file>.bad`` and skipped;
        the rest still load. Each VM continues after the seqs the last run reserved
        (see :mod:`pagetrackd.seqs`). Raises InvalidArgument, naming the file, when the
        directory or its seq reservations cannot be used.
        """
        try:
            (self.path / "vms").mkdir(parents=True, exist_ok=True)
            self.seqs.load()
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"state directory {self.path}: {exc}") from None
        engine.on_vm_created.append(self.seqs.attach)
        engine.on_vm_deleted.append(self.seqs.forget)
        engine.recordings_dir = self.path / "recordings"
        journal = self.journal
        if journal is not None:
            engine.journal = journal
            engine.on_vm_created.append(self._journal_vm)
            engine.on_vm_deleted.append(self._journal_deleted)
            journal.paused = True  # loading is not a change
        saved: dict[tuple[str, str], int] = {}
        try:
            loaded = self._load_files(engine, saved)
            if journal is not None:
                self.journal_replayed = replay_journal(engine, journal, saved)
                log.info("state.journal_replayed", records=self.journal_replayed)
        finally:
            if journal is not None:
                journal.paused = False
        for entry in engine.list_vms(None):
            self._continue_seqs(entry)
        kept = {e.recording for e in engine.list_vms(None)}
        for path in engine.recordings_dir.glob("*/*.jsonl"):
            if path not in kept:
                path.unlink(missing_ok=True)  # of a VM that did not come back
        log.info("state.loaded", path=str(self.path), vms=loaded, refused=len(self.refused))
        return loaded

    def _journal_vm(self, entry: VmEntry) -> None:
        assert self.journal is not None
        JournalRecorder(self.journal, entry)
        h = entry.hub.history
        self.journal.append({
            "t": entry.tenant, "vm": entry.name, "op": "create",
            "options": _encode_value({
                "vcpus": entry.vm.vcpus, "dma_policy": entry.vm.dma_policy,
                "semantics": entry.vm.semantics, "cost": entry.vm.cost,
                "limits": dataclasses.asdict(entry.vm.limits),
                "history_events": h.max_events, "history_bytes": h.max_bytes,
                "record": entry.recorder is not None,
            }),
        })

    def _journal_deleted(self, tenant: TenantId, name: str) -> None:
        assert self.journal is not None
        self.journal.append({"t": tenant, "vm": name, "op": "delete"})

    def _load_files(self, engine: Engine, saved: dict[tuple[str, str], int]) -> int:
        leases = self._load_leases(engine)
        loaded = 0
        for tdir in sorted(p for p in (self.path / "vms").iterdir() if p.is_dir()):
            tenant = TenantId(urllib.parse.unquote(tdir.name))
            for stale in tdir.glob(f".*{SUFFIX}.tmp"):
                stale.unlink(missing_ok=True)  # a save interrupted by a crash
            for path in sorted(tdir.glob(f"*{SUFFIX}")):
                try:
                    snap = read_snapshot(_regular_file(path))
                    if snap.tenant != tenant or snap.name != path.name[: -len(SUFFIX)]:
                        raise SnapshotError(
                            f"the file holds VM {snap.name!r} of tenant {snap.tenant!r};"
                            " its place says otherwise"
                        )
                    entry = restore_snapshot(
                        engine, tenant, snap, leases=leases.get(tenant, ()), saved=True
                    )
                except (OSError, PageTrackError) as exc:
                    self._refuse(path, str(exc))
                    continue
                self._sigs[path] = _signature(entry, leases.get(tenant, set()))
                index = snap.header.get("journal_index", 0)
                if isinstance(index, int) and not isinstance(index, bool):
                    saved[(tenant, entry.name)] = self._journaled[path] = index
                loaded += 1
                log.info(
                    "state.vm_loaded", tenant=tenant, vm=entry.name, seq=entry.vm.seq,
                    memslots=len(entry.vm.slots), tracked=entry.vm.tracked_count,
                    plugins=sorted(entry.plugins),
                )
        return loaded

    def _continue_seqs(self, entry: VmEntry) -> None:
        """Start the VM after the seqs the last run reserved: those past its saved seq
        were lost with the crash (or never used), and a resume across them says so."""
        mark = self.seqs.mark(entry.tenant, entry.name)
        vm = entry.vm
        if mark > vm.seq:
            entry.hub.history.add_lost(vm.seq + 1, mark)
            log.warning(
                "state.seqs_lost", tenant=entry.tenant, vm=entry.name,
                first_seq=vm.seq + 1, last_seq=mark,
            )
            vm.seq = mark
        entry.hub.history.seq_limit = vm.seq

    def _load_leases(self, engine: Engine) -> dict[str, set[str]]:
        path = self.path / LEASES_FILE
        out: dict[str, set[str]] = {}
        if not path.exists():
            return out
        try:
            body = _unseal(_regular_file(path))
            records = body.get("leases")
            if not isinstance(records, list):
                raise SnapshotError("no lease list")
            for r in records:
                remaining = int(r["remaining_ms"])
                if remaining <= 0:
                    continue
                lease = engine.leases.adopt(
                    TenantId(str(r["tenant"])), str(r["lease_id"]), int(r["ttl_ms"]),
                    remaining, str(r.get("label", "")),
                )
                out.setdefault(lease.tenant, set()).add(lease.lease_id)
        except (OSError, PageTrackError, KeyError, TypeError, ValueError) as exc:
            self._refuse(path, f"lease file: {exc}")
            return {}
        return out

    # ------------------------------------------------------------------ save

    async def save(self, engine: Engine) -> int:
        """Save every VM that changed since its last save, the leases, and remove the
        files of VMs that are gone. Returns the VM files written; ``last_save_complete``
        says whether everything was saved."""
        async with self._lock:
            started = time.perf_counter()
            # The leases file says when this save began (before any VM was copied): a
            # saved_at_ns after a change means every VM file holds that change.
            began_ns = time.time_ns()
            ttl = {
                lease.lease_id: lease
                for lease in engine.leases.live()
                if lease.kind is LeaseKind.TTL
            }
            owners = {f"lease:{lid}" for lid in ttl}

            def keep(owner: str) -> bool:
                return not owner.startswith("lease:") or owner in owners

            failures: dict[str, str] = {}
            live: set[Path] = set()
            written = 0
            journal = self.journal
            boundary = journal.rotate() if journal is not None else 0
            held: dict[Path, int] = {}  #: the journal index each VM file holds now
            for entry in engine.list_vms(None):
                if entry.vm.closed:
                    continue
                path = self.vm_path(entry.tenant, entry.name)
                live.add(path)
                sig = _signature(entry, set(ttl))
                if self._sigs.get(path) == sig:
                    held[path] = boundary  # unchanged: its file holds all of it
                    continue
                held[path] = self._journaled.get(path, 0)
                try:
                    header, arrays = capture_entry(
                        entry, include_memory=self.include_memory, engine=engine,
                        keep_owner=keep, include_history=True,
                    )
                    index = journal.last_index if journal is not None else 0
                    header["journal_index"] = index
                    await asyncio.to_thread(_encode_to, path, header, arrays)
                except Exception as exc:  # this VM's failure is this VM's alone
                    key = _vm_key(entry.tenant, entry.name)
                    failures[key] = f"{type(exc).__name__}: {exc}"
                    self._sigs.pop(path, None)
                    log.error("state.vm_save_failed", tenant=entry.tenant, vm=entry.name,
                              path=str(path), reason=failures[key])
                    continue
                self._sigs[path] = sig
                held[path] = self._journaled[path] = index
                written += 1
            leases_blob = _seal(
                {
                    "saved_at_ns": began_ns,
                    "leases": [
                        {
                            "lease_id": lease.lease_id,
                            "tenant": lease.tenant,
                            "ttl_ms": lease.ttl_ms,
                            "remaining_ms": engine.leases.remaining_ms(lease),
                            "label": lease.label,
                        }
                        for lease in ttl.values()
                    ],
                }
            )
            try:
                await asyncio.to_thread(self._write_rest, leases_blob, live)
            except OSError as exc:
                failures["leases"] = f"{type(exc).__name__}: {exc}"
                log.error("state.save_failed", path=str(self.path), reason=str(exc))
            self._sigs = {p: s for p, s in self._sigs.items() if p in live}
            self._journaled = {p: i for p, i in self._journaled.items() if p in live}
            if journal is not None and "leases" not in failures:
                # Records up to the lowest index some VM file holds are in every file.
                await journal.compact(min(held.values(), default=boundary))
            self.seqs.keep({(e.tenant, e.name) for e in engine.list_vms(None)})
            self.files_written += written
            self.failing = failures
            self._report(engine)
            self.last_save_complete = not failures
            if failures:
                self.save_errors += 1
                self.vm_save_errors += len(failures) - ("leases" in failures)
            else:
                self.saves += 1
                self.last_save_ns = time.time_ns()
                self.last_save_s = time.perf_counter() - started
            log.debug("state.saved", vms=len(live), written=written, failed=len(failures),
                      s=time.perf_counter() - started)
            return written

    def release_unused(self, engine: Engine) -> None:
        """After the final save, with nothing running any more: give back the seqs
        reserved beyond each saved VM's seq, so a clean restart continues at the very
        next seq. VMs that were not saved keep their reservations."""
        for entry in engine.list_vms(None):
            if _vm_key(entry.tenant, entry.name) not in self.failing:
                self.seqs.set_mark(entry.tenant, entry.name, entry.vm.seq)
        try:
            self.seqs.write()
        except OSError as exc:
            log.error("state.seqs_not_written", path=str(self.seqs.path), reason=str(exc))

    def _report(self, engine: Engine) -> None:
        """Put what is unsaved into the engine's problems (GetServerInfo)."""
        for key in [k for k in engine.problems if k.startswith("state:")]:
            del engine.problems[key]
        for key, reason in self.failing.items():
            tenant, _, vm = key.partition("/")
            if key == "leases":
                engine.problems["state:leases"] = (None, f"leases not saved: {reason}")
            else:
                engine.problems[f"state:{key}"] = (
                    TenantId(tenant), f"VM {vm!r} not saved: {reason}"
                )
        if self.seqs.errors and self.seqs.last_error:
            engine.problems["state:seqs"] = (
                None, f"seq reservations not written: {self.seqs.last_error}"
            )

    def _write_rest(self, leases: bytes, keep: set[Path]) -> None:
        write_atomic(self.path / LEASES_FILE, leases)
        vms = self.path / "vms"
        for path in vms.glob(f"*/*{SUFFIX}"):
            if path not in keep:
                path.unlink(missing_ok=True)  # the VM was deleted
                fsync_dir(path.parent)
        for tmp in vms.glob(f"*/.*{SUFFIX}.tmp"):
            if tmp.with_name(tmp.name[1 : -len(".tmp")]) not in keep:
                tmp.unlink(missing_ok=True)  # left by a VM deleted mid-save

    async def run(self, engine: Engine, interval_s: float) -> None:
        """Save every ``interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.save(engine)
            except Exception:  # a save bug must not stop the next save
                self.save_errors += 1
                log.exception("state.save_failed", path=str(self.path))


def _encode_to(path: Path, header: dict[str, Any], arrays: dict[str, Any]) -> None:
    """Write the snapshot file of ``header`` and ``arrays`` as :func:`encode` makes it,
    streaming: the arrays go to the file as they are encoded and the checksum is taken
    reading it back, so a large VM is not held in memory a second and third time."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "w+b") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)))
            f.write(head)
            at = f.tell()
            f.write(_U64.pack(0))
            np.savez(f, allow_pickle=False, **arrays)
            end = f.tell()
            f.seek(at)
            f.write(_U64.pack(end - at - _U64.size))
            f.seek(0)
            digest = hashlib.sha256()
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def _signature(entry: VmEntry, ttl_leases: set[str]) -> str:
    """Changes whenever anything a snapshot holds may have changed."""
    vm = entry.vm
    parts: list[Any] = [
        vm.generation, vm.seq, vm.vcpus, vm.dma_policy.value, vm.semantics.value,
        repr(vm.cost), repr(vm.stats), [repr(s) for s in vm.memslots()],
        [len(s.dirty) if s.dirty is not None else -1 for s in vm.slots.slots()],
        sorted(ttl_leases),
        [
            (k, repr(entry.plugin_options.get(k)), repr(p.status()))
            for k, p in entry.plugins.items()
        ],
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()
