"""Recordings of VMs' operations, and the journal's pauses for restores."""

from __future__ import annotations

import base64
import contextlib
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from pagetrackd.application.entries import VmEntry
from pagetrackd.application.plugins import Plugins
from pagetrackd.domain import FailedPrecondition, QuotaExceeded, TenantId
from pagetrackd.replay import Recorder


class Recordings(Plugins):
    """Where each recorded VM's operations go, up to its tenant's recording quota."""

    def recording_path(self, tenant: TenantId, name: str) -> Path:
        """Where the recording of a VM is kept."""
        base = self.recordings_dir
        if base is None:
            if self._record_dir is None:
                self._record_dir = Path(tempfile.mkdtemp(prefix="pagetrack-recordings-"))
            base = self._record_dir
        return base / urllib.parse.quote(tenant, safe="") / f"{name}.jsonl"

    def _start_recording(self, entry: VmEntry, record_from: tuple[int, bool] | None) -> None:
        """Record the VM's operations, up to the tenant's recording_bytes quota.
        ``record_from`` (bytes, overflowed) continues the recording already on disk
        after a restart: it is cut to the bytes that go with the loaded state (what
        followed is replayed from the journal, or was lost with the crash)."""
        path = self.recording_path(entry.tenant, entry.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = 0
        if record_from is not None and path.is_file():
            kept = min(record_from[0], path.stat().st_size)
            with open(path, "r+b") as old:
                old.truncate(kept)
        out = open(path, "a" if record_from is not None else "w", encoding="utf-8")
        entry.recording = path
        entry.recording_file = out
        entry.recorder = Recorder(
            entry.vm, out, max_bytes=self.quotas(entry.tenant).recording_bytes,
            fresh=record_from is None, header=record_from is None,
        )
        entry.recorder.nbytes = kept
        if record_from is not None and (record_from[1] or kept < record_from[0]):
            entry.recorder.overflowed = True  # stopped before, or cut short: incomplete

    @contextlib.contextmanager
    def unjournaled(self) -> Iterator[None]:
        """Nothing is journaled inside (a restore journals the snapshot instead)."""
        journal = self.journal
        if journal is None or journal.paused:
            yield
            return
        journal.paused = True
        try:
            yield
        finally:
            journal.paused = False

    def journal_restored(self, entry: VmEntry, data: bytes) -> None:
        """Journal a VM restored from snapshot bytes (replayed by restoring them)."""
        if self.journal is not None:
            self.journal.append({
                "t": entry.tenant, "vm": entry.name, "op": "restore",
                "data": base64.b64encode(data).decode("ascii"),
            })

    def recording(self, entry: VmEntry) -> Path:
        """The VM's recording so far, flushed to its file."""
        if entry.recorder is None or entry.recording is None:
            raise FailedPrecondition(
                f"VM {entry.name!r} is not recorded; create it with the record option"
            )
        if entry.recorder.overflowed:
            q = self.quotas(entry.tenant).recording_bytes
            raise QuotaExceeded(
                f"VM {entry.name!r}'s recording passed the tenant's recording_bytes quota of"
                f" {q} bytes and was stopped there; it cannot be replayed",
                quota="recording_bytes", limit=q,
            )
        entry.recorder.flush()
        return entry.recording
