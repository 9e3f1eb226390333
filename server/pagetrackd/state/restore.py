"""Restoring a VM from a snapshot: loading it into a fresh VM (anywhere, a worker thread
too), registering it, and bringing its history and plugins back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from functools import partial
from typing import Any

import structlog

from pagetrackd.application import Engine, VmEntry
from pagetrackd.application.snapshot_port import PendingRebuild
from pagetrackd.domain import InvalidArgument, PageTrackError, TenantId, Vm, VmAlreadyExists
from pagetrackd.domain.snapshot import VmState, import_vm, vm_options
from pagetrackd.domain.types import TENANT_OWNER
from pagetrackd.state.container import SnapshotError
from pagetrackd.state.plugin_records import REBUILD, reattach
from pagetrackd.state.snapshot import Snapshot

log = structlog.get_logger("pagetrackd.state")

__all__ = ["prepare_vm", "restore_snapshot"]

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
    later: list[PendingRebuild] | None = None,
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
    not refused at load by a quota (those are checked when it grows, as before). With
    ``later``, a plugin whose shadow can be rebuilt in steps (the vGPU's PPGTTs) is
    attached, and its rebuild added to ``later`` for the caller to run.
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
    # loading is not an operation of the recording
    paused = entry.recorder.paused() if entry.recorder is not None else contextlib.nullcontext()
    try:
        with paused:
            _fill(engine, entry, snap, later)
    except BaseException as exc:
        engine.delete_vm(tenant, name)  # never a half-made VM
        if isinstance(exc, PageTrackError) or not isinstance(exc, Exception):
            raise
        raise SnapshotError(f"snapshot cannot be restored: {type(exc).__name__}: {exc}") from None
    finally:
        if entry.quota is not None:
            entry.quota.exempt = False
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


def _fill(
    engine: Engine, entry: VmEntry, snap: Snapshot, later: list[PendingRebuild] | None
) -> None:
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
        kind = str(rec.get("kind"))
        try:
            steps = reattach(engine, entry, rec, stepped=later is not None)
        except PageTrackError as exc:
            log.warning("state.plugin_not_restored", vm=name, plugin=kind, reason=str(exc))
            continue
        if steps is None:
            _compare_plugin_refs(entry, state, kind)
        else:
            assert later is not None
            later.append(PendingRebuild(
                kind, steps, partial(_compare_plugin_refs, entry, state, kind),
                partial(_rebuild_failed, engine, entry, kind),
            ))


def _rebuild_failed(engine: Engine, entry: VmEntry, kind: str, exc: PageTrackError) -> None:
    """A plugin's shadow could not be rebuilt: it is detached, as if never restored."""
    with contextlib.suppress(PageTrackError):
        engine.detach_plugin(entry, kind)
    log.warning("state.plugin_not_restored", vm=entry.name, plugin=kind, reason=str(exc))


def _compare_plugin_refs(entry: VmEntry, state: VmState, kind: str) -> None:
    owner = f"plugin:{kind}"
    saved = sum(int(s.owners[owner][0].size) for s in state.slots if owner in s.owners)
    now = int(entry.vm.tracked_gfns(owner).size)
    rebuild = REBUILD.get(kind)
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
