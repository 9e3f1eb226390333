"""Administration use cases: the daemon's problems and process figures, VM snapshots
out and in (through the engine's snapshot format, see
:mod:`pagetrackd.application.snapshot_port`), recordings out, and replays in (uploads
within the tenant's quota)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pagetrackd.application.engine import Engine
from pagetrackd.application.entries import VmEntry, unrecorded
from pagetrackd.application.slices import run_steps
from pagetrackd.application.snapshot_port import PendingRebuild, SnapshotFormat
from pagetrackd.domain import (
    InvalidArgument,
    PageTrackError,
    QuotaExceeded,
    TenantId,
    Unavailable,
)
from pagetrackd.limits import DEFAULT_CHUNK_BYTES


@dataclass(frozen=True, slots=True)
class ProcessView:
    """The daemon process, for admins."""

    rss_bytes: int
    tasks: int
    notifiers: int
    watchers: int
    leases: int
    vms: int


@dataclass(frozen=True, slots=True)
class VmSnapshot:
    """A VM's state as snapshot bytes."""

    data: bytes
    sha256: bytes
    head_seq: int
    format_version: int


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def process_view(engine: Engine) -> ProcessView:
    """The process's figures now."""
    entries = engine.list_vms(None)
    return ProcessView(
        rss_bytes=_rss_bytes(), tasks=len(asyncio.all_tasks()),
        notifiers=sum(len(e.vm.notifiers) for e in entries),
        watchers=sum(len(e.hub.subscribers) for e in entries),
        leases=len(engine.leases), vms=len(entries),
    )


def problems(engine: Engine, tenant: TenantId, admin: bool) -> list[str]:
    """What is wrong now that the caller may see: the daemon's, its own tenant's, and
    for an admin every tenant's."""
    return [
        text for owner, text in engine.problems.values()
        if owner is None or owner == tenant or admin
    ]


def _format(engine: Engine) -> SnapshotFormat[Any]:
    if engine.snapshots is None:
        raise Unavailable("this engine was given no snapshot format")
    return engine.snapshots


def snapshot_vm(engine: Engine, tenant: TenantId, name: str, include_memory: bool) -> VmSnapshot:
    """The VM's state, with its guest memory when asked."""
    fmt = _format(engine)
    entry = engine.vm(tenant, name)
    head = entry.vm.seq
    data = fmt.encode(engine, entry, include_memory)
    return VmSnapshot(data, hashlib.sha256(data).digest(), head, fmt.version)


class SnapshotUpload:
    """A snapshot arriving in pieces, refused as soon as it is not one or passes the
    tenant's upload_bytes quota (or the length its header declares)."""

    def __init__(self, engine: Engine, tenant: TenantId) -> None:
        self.engine = engine
        self.tenant = tenant
        self.format = _format(engine)
        self.limit = engine.quotas(tenant).upload_bytes
        self._data = bytearray()
        self._declared: int | None = None

    def add(self, data: bytes) -> None:
        """Take the next piece."""
        self._data += data
        limit, declared = self.limit, self._declared
        if declared is None:
            # The header is checked on the first bytes: a stream that is not a
            # snapshot, or declares more than the quota, is refused at once.
            declared = self._declared = self.format.declared_length(
                bytes(self._data[:1 << 20]))
            if declared is not None and declared > limit:
                raise QuotaExceeded(
                    f"the snapshot declares {declared} bytes; the tenant's upload_bytes"
                    f" quota is {limit}",
                    quota="upload_bytes", limit=limit,
                )
        if len(self._data) > (declared or limit):
            raise InvalidArgument(
                f"snapshot upload passed the {declared or limit} bytes its header declares"
                if declared is not None and declared <= limit
                else f"snapshot upload passed the tenant's upload_bytes quota of {limit}",
                field="data",
            )

    async def restore(self, name: str, replace: bool) -> VmEntry:
        """Load the snapshot as VM ``name`` (its own name when empty). Decoding and
        loading run in worker threads (they touch nothing shared): the event loop keeps
        serving other calls meanwhile."""
        engine, tenant = self.engine, self.tenant
        raw = bytes(self._data)
        self._data = bytearray()
        fmt = self.format
        snap = await asyncio.to_thread(fmt.decode, raw)
        name = name or snap.state.name
        existing = None
        with contextlib.suppress(PageTrackError):
            existing = engine.vm(tenant, name)
        engine.check_restore_size(tenant, snap.state, existing)
        prepared = await asyncio.to_thread(fmt.prepare, snap, name)
        later: list[PendingRebuild] = []
        # The VM's lock is held until its plugins' shadows are rebuilt: no call on it
        # sees a half-made shadow.
        async with engine.vm_locks.hold(tenant, name):
            with engine.unjournaled():
                entry = fmt.restore(engine, tenant, snap, name=name, replace=replace,
                                    prepared=prepared, later=later)
            engine.journal_restored(entry, raw)
            await _rebuild(entry, later)
        return entry


async def _rebuild(entry: VmEntry, later: list[PendingRebuild]) -> None:
    """Rebuild restored plugins' shadows a step at a time (a vGPU with a PPGTT of
    thousands of tables does not hold the event loop), unrecorded: the restore record
    replays them. A cancelled call still rebuilds them all before it ends."""
    cancelled = False
    for pending in later:
        try:
            with unrecorded(entry):
                await run_steps(pending.steps)
        except asyncio.CancelledError:
            cancelled = True  # run_steps finished the steps first
        except PageTrackError as exc:
            pending.failed(exc)
            continue
        pending.done()
    if cancelled:
        raise asyncio.CancelledError


def recording_chunks(
    engine: Engine, tenant: TenantId, name: str, size: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[bytes, bool]]:
    """The VM's recording in chunks, each with whether it is the last (an empty
    recording gives one empty last chunk)."""
    path = engine.recording(engine.vm(tenant, name))
    with open(path, "rb") as f:
        data = f.read(size)
        while True:
            following = f.read(size)
            yield data, not following
            if not following:
                return
            data = following


class RecordingUpload:
    """A recording arriving in pieces, spooled to a temporary file within the tenant's
    upload_bytes quota, then replayed into a new VM. Use it as a context manager."""

    def __init__(self, engine: Engine, tenant: TenantId) -> None:
        self.engine = engine
        self.tenant = tenant
        self.limit = engine.quotas(tenant).upload_bytes
        self.total = 0
        self._dir = tempfile.TemporaryDirectory(prefix="pagetrack-replay-")
        self._path = Path(self._dir.name) / "recording.jsonl"
        self._file = open(self._path, "wb")  # noqa: SIM115 -- closed by __exit__

    def __enter__(self) -> RecordingUpload:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._file.close()
        self._dir.cleanup()

    def add(self, data: bytes) -> None:
        """Take the next piece."""
        self.total += len(data)
        if self.total > self.limit:
            raise QuotaExceeded(
                f"recording upload passed the tenant's upload_bytes quota of {self.limit}",
                quota="upload_bytes", limit=self.limit,
            )
        self._file.write(data)

    async def replay(self, name: str) -> tuple[VmEntry, int]:
        """Replay what arrived into a new VM ``name``; returns it and the records."""
        self._file.close()
        if not name:
            raise InvalidArgument("ReplayVm's first message must name the new VM (vm)")
        if not self.total:
            raise InvalidArgument("ReplayVm got no recording data")
        return await self.engine.replay_vm(self.tenant, name, self._path)
