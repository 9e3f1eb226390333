"""The state package's snapshot format, as the application's port
(:class:`pagetrackd.application.snapshot_port.SnapshotFormat`) asks for it."""

from __future__ import annotations

from pagetrackd.application import Engine, VmEntry
from pagetrackd.application.snapshot_port import PendingRebuild
from pagetrackd.domain import TenantId, Vm
from pagetrackd.state.container import FORMAT_VERSION, snapshot_length
from pagetrackd.state.restore import prepare_vm, restore_snapshot
from pagetrackd.state.snapshot import Snapshot, read_snapshot, snapshot_entry


class StateSnapshots:
    """Snapshot bytes in and out, and restoring them into the engine."""

    version = FORMAT_VERSION

    def encode(self, engine: Engine, entry: VmEntry, include_memory: bool) -> bytes:
        return snapshot_entry(entry, include_memory=include_memory, engine=engine)

    def declared_length(self, head: bytes) -> int | None:
        return snapshot_length(head)

    def decode(self, raw: bytes) -> Snapshot:
        return read_snapshot(raw)

    def prepare(self, snap: Snapshot, name: str) -> Vm:
        return prepare_vm(snap, name)

    def restore(
        self, engine: Engine, tenant: TenantId, snap: Snapshot, *, name: str, replace: bool,
        prepared: Vm, later: list[PendingRebuild],
    ) -> VmEntry:
        return restore_snapshot(
            engine, tenant, snap, name=name, replace=replace, prepared=prepared, later=later)


__all__ = ["StateSnapshots"]
