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
import hashlib
import io
import json
import os
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
from pagetrackd.domain import InvalidArgument, PageTrackError, TenantId, Vm, VmAlreadyExists
from pagetrackd.domain.events import EventBatch
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
from pagetrackd.engine import Engine, VmEntry
from pagetrackd.leases import LeaseKind
from pagetrackd.plugins import Plugin

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


def snapshot_length(prefix: bytes) -> int | None:
    """The whole file's length as its first bytes declare it, or None while fewer than
    ``prefix + header + 8`` bytes are there. Raises SnapshotError for bytes that are
    not a snapshot of this version, so an upload is refused on its first message."""
    if len(prefix) < _PREFIX.size:
        return None
    magic, version, hlen = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise SnapshotError("not a pagetrack VM snapshot (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot format_version {version} is not supported; this daemon reads"
            f" version {FORMAT_VERSION}"
        )
    if hlen > MAX_HEADER_BYTES:
        raise SnapshotError(f"snapshot header length {hlen} is implausible; the file is corrupt")
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
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("not a pagetrack VM snapshot (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot format_version {version} is not supported; this daemon reads"
            f" version {FORMAT_VERSION}"
        )
    if hlen > MAX_HEADER_BYTES:
        raise SnapshotError(f"snapshot header length {hlen} is implausible; the file is corrupt")
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
            plugin.call("build_ppgtt", root_gpa=int(mm["root_gpa"]))


def _shadow_roots(plugin: Plugin) -> list[dict[str, int]]:
    out = []
    for part in str(plugin.status().get("cr3", "")).split():
        vcpu, _, cr3 = part.partition("=")
        if vcpu.startswith("vcpu") and cr3:
            out.append({"vcpu": int(vcpu[4:]), "cr3": int(cr3, 0)})
    return out


def _shadow_replay(plugin: Plugin, roots: Any) -> None:
    for r in roots:
        plugin.call("set_root", cr3=int(r["cr3"]), vcpu=int(r["vcpu"]))


_REBUILD: dict[str, _Rebuild] = {
    "vgpu": _Rebuild(
        lambda p: p.call("ppgtts")["ppgtts"], _vgpu_replay, frozenset({"root_gpa"})
    ),
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
    }


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
    return HistoryDump(
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
    return encode(header, arrays)


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
    import_vm(snap.state, vm, keep_owner=keep)
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
    changed then.
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
    old_pages = sum(s.npages for s in existing.vm.memslots()) if existing else 0
    old_tracked = existing.vm.tracked_count if existing else 0
    engine.check_guest_pages(tenant, sum(s.npages for s in state.slots) - old_pages)
    engine.check_tracked(tenant, sum(s.counters()[0].size for s in state.slots) - old_tracked)
    if existing is not None:
        engine.delete_vm(tenant, name)
    hist = snap.header.get("history") or {}
    entry = engine.create_vm(
        tenant, name, **opts,
        history_events=int(hist.get("events", engine.config.history_events)),
        history_bytes=int(hist.get("bytes", engine.config.history_bytes)),
        vm=prepared,
    )
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
    return entry


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file,
    never a mix: write a temporary file, fsync it, rename it over, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


@dataclass
class StateDir:
    """The daemon's saved state: load at start, save on a timer and at shutdown."""

    path: Path
    include_memory: bool = True
    saves: int = 0  #: completed saves
    files_written: int = 0  #: VM files written (unchanged VMs are not rewritten)
    last_save_ns: int = 0  #: wall time of the last completed save
    last_save_s: float = 0.0  #: how long it took
    save_errors: int = 0
    refused: list[str] = field(default_factory=list)  #: files moved aside at load
    _sigs: dict[Path, str] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

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
        the rest still load.
        """
        (self.path / "vms").mkdir(parents=True, exist_ok=True)
        leases = self._load_leases(engine)
        loaded = 0
        for tdir in sorted(p for p in (self.path / "vms").iterdir() if p.is_dir()):
            tenant = TenantId(urllib.parse.unquote(tdir.name))
            for stale in tdir.glob(f".*{SUFFIX}.tmp"):
                stale.unlink(missing_ok=True)  # a save interrupted by a crash
            for path in sorted(tdir.glob(f"*{SUFFIX}")):
                try:
                    snap = read_snapshot(path.read_bytes())
                    if snap.tenant != tenant or snap.name != path.name[: -len(SUFFIX)]:
                        raise SnapshotError(
                            f"the file holds VM {snap.name!r} of tenant {snap.tenant!r};"
                            " its place says otherwise"
                        )
                    entry = restore_snapshot(engine, tenant, snap, leases=leases.get(tenant, ()))
                except (OSError, PageTrackError) as exc:
                    self._refuse(path, str(exc))
                    continue
                self._sigs[path] = _signature(entry, leases.get(tenant, set()))
                loaded += 1
                log.info(
                    "state.vm_loaded", tenant=tenant, vm=entry.name, seq=entry.vm.seq,
                    memslots=len(entry.vm.slots), tracked=entry.vm.tracked_count,
                    plugins=sorted(entry.plugins),
                )
        log.info("state.loaded", path=str(self.path), vms=loaded, refused=len(self.refused))
        return loaded

    def _load_leases(self, engine: Engine) -> dict[str, set[str]]:
        path = self.path / LEASES_FILE
        out: dict[str, set[str]] = {}
        if not path.exists():
            return out
        try:
            body = _unseal(path.read_bytes())
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
        files of VMs that are gone. Returns the VM files written."""
        async with self._lock:
            started = time.perf_counter()
            ttl = {
                lease.lease_id: lease
                for lease in engine.leases.live()
                if lease.kind is LeaseKind.TTL
            }
            owners = {f"lease:{lid}" for lid in ttl}

            def keep(owner: str) -> bool:
                return not owner.startswith("lease:") or owner in owners

            files: dict[Path, bytes] = {}
            sigs: dict[Path, str] = {}
            for entry in engine.list_vms(None):
                path = self.vm_path(entry.tenant, entry.name)
                sig = _signature(entry, set(ttl))
                sigs[path] = sig
                if self._sigs.get(path) == sig:
                    continue
                files[path] = snapshot_entry(
                    entry, include_memory=self.include_memory, engine=engine,
                    keep_owner=keep, include_history=True,
                )
            leases_blob = _seal(
                {
                    "saved_at_ns": time.time_ns(),
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
                await asyncio.to_thread(self._write, files, leases_blob, set(sigs))
            except OSError as exc:
                self.save_errors += 1
                log.error("state.save_failed", path=str(self.path), reason=str(exc))
                return 0
            self._sigs = {p: s for p, s in sigs.items()}
            self.saves += 1
            self.files_written += len(files)
            self.last_save_ns = time.time_ns()
            self.last_save_s = time.perf_counter() - started
            log.debug("state.saved", vms=len(sigs), written=len(files), s=self.last_save_s)
            return len(files)

    def _write(self, files: dict[Path, bytes], leases: bytes, keep: set[Path]) -> None:
        for path, data in files.items():
            write_atomic(path, data)
        write_atomic(self.path / LEASES_FILE, leases)
        vms = self.path / "vms"
        for path in vms.glob(f"*/*{SUFFIX}"):
            if path not in keep:
                path.unlink(missing_ok=True)  # the VM was deleted
                _fsync_dir(path.parent)

    async def run(self, engine: Engine, interval_s: float) -> None:
        """Save every ``interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.save(engine)
            except Exception:  # a save bug must not stop the next save
                self.save_errors += 1
                log.exception("state.save_failed", path=str(self.path))


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
