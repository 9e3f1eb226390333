"""The daemon's state directory (``--state-dir``): every VM loaded at start, saved on a
timer and at shutdown.

It holds one snapshot per VM at ``vms/<tenant>/<vm>.ptvm`` (see
:mod:`pagetrack.snapshot_format`), the TTL leases in ``leases.json``, the seq
reservations in ``seqs.json`` (:mod:`pagetrackd.seqs`) and, with ``durability =
"journal"``, the journal (:mod:`pagetrackd.journal`). Every file is written to a
temporary name, fsynced, renamed over the old one, and the directory fsynced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from pagetrackd.application import Engine, VmEntry
from pagetrackd.domain import InvalidArgument, PageTrackError, TenantId
from pagetrackd.files import fsync_dir, write_atomic
from pagetrackd.journal import Journal, JournalRecorder
from pagetrackd.leases import Lease, LeaseKind
from pagetrackd.replay import encode_value
from pagetrackd.seqs import SEQS_FILE, SeqReservations
from pagetrackd.state.container import SUFFIX, SnapshotError
from pagetrackd.state.incremental import (
    SavedFiles,
    VmGone,
    begin_save,
    bind_loaded,
    files_dir,
    read_vm_file,
    remove_unnamed,
    save_vm,
)
from pagetrackd.state.journal_replay import replay_journal
from pagetrackd.state.leases_file import (
    LEASES_FILE,
    apply_lease_records,
    lease_record,
    leases_blob,
    load_leases,
)
from pagetrackd.state.restore import restore_snapshot
from pagetrackd.state.snapshot import capture_entry
from pagetrackd.state.vmfiles import signature

log = structlog.get_logger("pagetrackd.state")

__all__ = ["StateDir"]


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
    #: VM file -> the side files it names (memory chunks, history segments)
    _files: dict[Path, SavedFiles] = field(default_factory=dict)
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
            side = files_dir(path)
            if side.is_dir():
                os.replace(side, side.with_name(side.name + ".bad"))  # kept with it
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
        self.seqs.deferred = True
        engine.on_vm_created.append(self.seqs.attach)
        engine.on_vm_deleted.append(self.seqs.forget)
        engine.recordings_dir = self.path / "recordings"
        journal = self.journal
        if journal is not None:
            engine.journal = journal
            engine.on_vm_created.append(self._journal_vm)
            engine.on_vm_deleted.append(self._journal_deleted)
            engine.leases.on_change.append(self._journal_lease)
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
        self.seqs.deferred = False
        self.seqs.reserve_ahead(engine.list_vms(None))
        kept = {e.recording for e in engine.list_vms(None)}
        for path in engine.recordings_dir.glob("*/*.jsonl"):
            if path not in kept:
                path.unlink(missing_ok=True)  # of a VM that did not come back
        log.info("state.loaded", path=str(self.path), vms=loaded, refused=len(self.refused))
        return loaded

    def _journal_vm(self, entry: VmEntry) -> None:
        assert self.journal is not None
        entry.journal_recorder = JournalRecorder(self.journal, entry)
        h = entry.hub.history
        self.journal.append({
            "t": entry.tenant, "vm": entry.name, "op": "create",
            "options": encode_value({
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

    def _journal_lease(self, change: str, lease: Lease) -> None:
        assert self.journal is not None
        self.journal.append(lease_record(change, lease))

    def _load_files(self, engine: Engine, saved: dict[tuple[str, str], int]) -> int:
        leases = self._load_leases(engine)
        loaded = 0
        for tdir in sorted(p for p in (self.path / "vms").iterdir() if p.is_dir()):
            tenant = TenantId(urllib.parse.unquote(tdir.name))
            for stale in tdir.glob(f".*{SUFFIX}.tmp"):
                stale.unlink(missing_ok=True)  # a save interrupted by a crash
            for path in sorted(tdir.glob(f"*{SUFFIX}")):
                loaded += self._load_one(engine, tenant, path, leases.get(tenant, set()), saved)
        self._remove_orphans()
        return loaded

    def _remove_orphans(self) -> None:
        """Side files of VM files that are gone (deleted VMs, a crash mid-delete)."""
        parts = self.path / "parts"
        if not parts.is_dir():
            return
        for tdir in parts.iterdir():
            for side in tdir.iterdir() if tdir.is_dir() else ():
                vm_file = self.path / "vms" / tdir.name / f"{side.name}{SUFFIX}"
                if not side.name.endswith(".bad") and not vm_file.exists():
                    remove_unnamed(vm_file, None)

    def _load_one(self, engine: Engine, tenant: TenantId, path: Path, leases: set[str],
                  saved: dict[tuple[str, str], int]) -> bool:
        """Load one VM file (and the side files it names); False if it was refused."""
        try:
            snap, files = read_vm_file(path)
            if snap.tenant != tenant or snap.name != path.name[: -len(SUFFIX)]:
                raise SnapshotError(
                    f"the file holds VM {snap.name!r} of tenant {snap.tenant!r};"
                    " its place says otherwise"
                )
            entry = restore_snapshot(engine, tenant, snap, leases=leases, saved=True)
        except (OSError, PageTrackError) as exc:
            self._refuse(path, str(exc))
            return False
        if files is not None:
            bind_loaded(files, entry)
            self._files[path] = files
        remove_unnamed(path, files)
        self._sigs[path] = signature(entry, leases)
        index = snap.header.get("journal_index", 0)
        if isinstance(index, int) and not isinstance(index, bool):
            saved[(tenant, entry.name)] = self._journaled[path] = index
        log.info(
            "state.vm_loaded", tenant=tenant, vm=entry.name, seq=entry.vm.seq,
            memslots=len(entry.vm.slots), tracked=entry.vm.tracked_count,
            plugins=sorted(entry.plugins),
        )
        return True

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

    def _load_leases(self, engine: Engine) -> dict[str, set[str]]:
        """The TTL leases of the last save, and those made or ended since (journal)."""
        path = self.path / LEASES_FILE
        try:
            leases, index = load_leases(engine, path)
        except (OSError, SnapshotError) as exc:
            self._refuse(path, str(exc) if isinstance(exc, SnapshotError) else f"lease file: {exc}")
            leases, index = {}, 0
        if self.journal is not None:
            applied = apply_lease_records(engine, self.journal.lease_records(), index, leases)
            if applied:
                log.info("state.journal_leases", records=applied)
        return leases

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
            lease_index = self.journal.last_index if self.journal is not None else 0
            ttl = [lease for lease in engine.leases.live() if lease.kind is LeaseKind.TTL]
            run = _SaveRun(self, engine, {lease.lease_id for lease in ttl})
            for entry in engine.list_vms(None):
                if not entry.vm.closed:
                    await run.save_vm(entry)
            try:
                await asyncio.to_thread(
                    self._write_rest, leases_blob(engine, ttl, began_ns, lease_index),
                    run.live,
                )
            except OSError as exc:
                run.failures["leases"] = f"{type(exc).__name__}: {exc}"
                log.error("state.save_failed", path=str(self.path), reason=str(exc))
            await self._finish(engine, run, started)
            return run.written

    async def _finish(self, engine: Engine, run: _SaveRun, started: float) -> None:
        """Forget what is gone, compact the journal, and account for the save."""
        failures = run.failures
        self._sigs = {p: s for p, s in self._sigs.items() if p in run.live}
        self._journaled = {p: i for p, i in self._journaled.items() if p in run.live}
        self._files = {p: f for p, f in self._files.items() if p in run.live}
        if self.journal is not None and "leases" not in failures:
            # Records up to the lowest index some VM file holds are in every file.
            await self.journal.compact(min(run.held.values(), default=run.boundary))
        self.seqs.keep({(e.tenant, e.name) for e in engine.list_vms(None)})
        self.files_written += run.written
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
        log.debug("state.saved", vms=len(run.live), written=run.written,
                  failed=len(failures), s=time.perf_counter() - started)

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
                remove_unnamed(path, None)
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



class _SaveRun:
    """One pass of :meth:`StateDir.save` over the VMs: what it wrote, what failed."""

    def __init__(self, state: StateDir, engine: Engine, ttl_leases: set[str]) -> None:
        self.state = state
        self.engine = engine
        self.ttl_leases = ttl_leases
        self.owners = {f"lease:{lid}" for lid in ttl_leases}
        self.failures: dict[str, str] = {}
        self.live: set[Path] = set()
        self.written = 0
        journal = state.journal
        self.boundary = journal.rotate() if journal is not None else 0
        self.held: dict[Path, int] = {}  #: the journal index each VM file holds now

    def keep(self, owner: str) -> bool:
        """Stream leases end with their streams: only TTL leases' references are saved.
        With a journal, a lease made since this save began is kept too: its record is
        newer than the leases file and is applied before this VM file loads."""
        if not owner.startswith("lease:") or owner in self.owners:
            return True
        return self.state.journal is not None and self.engine.leases.is_ttl(owner[len("lease:"):])

    async def save_vm(self, entry: VmEntry) -> None:
        """Write the VM's file if it changed; a failure is recorded, never raised."""
        state = self.state
        path = state.vm_path(entry.tenant, entry.name)
        self.live.add(path)
        sig = signature(entry, self.ttl_leases)
        if state._sigs.get(path) == sig:
            self.held[path] = self.boundary  # unchanged: its file holds all of it
            return
        self.held[path] = state._journaled.get(path, 0)
        journal = state.journal
        try:
            # A big request applies in slices under its VM's lock: waiting for the lock
            # puts the cut between two requests, never inside one. Taking it does not
            # yield when it is free, and it is let go before anything is written.
            async with self.engine.vm_locks.hold(entry.tenant, entry.name):
                header, arrays = capture_entry(
                    entry, include_memory=False, engine=self.engine, keep_owner=self.keep,
                )
                index = journal.last_index if journal is not None else 0
                header["journal_index"] = index
                save = begin_save(entry, path, state._files.get(path),
                                  include_memory=state.include_memory)
            state._files[path] = await save_vm(save, header, arrays)
        except VmGone:
            return  # deleted meanwhile: the next save removes its file
        except Exception as exc:  # this VM's failure is this VM's alone
            key = _vm_key(entry.tenant, entry.name)
            self.failures[key] = f"{type(exc).__name__}: {exc}"
            state._sigs.pop(path, None)
            log.error("state.vm_save_failed", tenant=entry.tenant, vm=entry.name,
                      path=str(path), reason=self.failures[key])
            return
        state._sigs[path] = sig
        self.held[path] = state._journaled[path] = index
        self.written += 1
