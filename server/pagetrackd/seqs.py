"""Seq reservations: a VM's seqs are reserved on disk, in blocks, before they are
handed out, so that a daemon that crashes and restarts never hands one out twice.

The state directory holds ``seqs.json``: per VM the highest seq the running daemon may
hand out. Once a VM has used half of its block, the next block is reserved in the
background (the file is rewritten and fsynced in a thread); only an event past the
mark that is known to be on disk waits for a synchronous write (nothing of that event
has reached a client yet). At start every VM gets a block at once, in one write. A VM
continues after its reserved mark; the seqs between its saved state and the mark are
the range a crash can have lost, reported to resuming streams as a RESTART gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from pagetrackd.files import write_atomic

if TYPE_CHECKING:
    from pagetrackd.application import VmEntry

log = structlog.get_logger("pagetrackd.seqs")

__all__ = ["SEQS_FILE", "SeqReservations"]

SEQS_FILE = "seqs.json"
#: the first block a VM reserves; a VM that reserves again within a second gets a block
#: four times larger (up to MAX_BLOCK), so a fast writer costs few fsyncs
MIN_BLOCK = 4096
MAX_BLOCK = 1 << 24

Key = tuple[str, str]


@dataclass
class SeqReservations:
    """The reserved seq marks of every VM, and the file that holds them.

    ``marks`` is what the next write puts in the file; ``durable`` what a completed
    write has put there. A VM hands out seqs up to its durable mark only. Writes are
    serialized (a lock), each writes a copy of ``marks`` taken when it was asked for,
    and one older than the last written is skipped (the newer copy holds its marks).
    """

    path: Path
    marks: dict[Key, int] = field(default_factory=dict)
    durable: dict[Key, int] = field(default_factory=dict)
    _blocks: dict[Key, tuple[int, float]] = field(default_factory=dict)
    _extending: set[Key] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: while true (loading), reservations are made in memory; reserve_ahead writes them
    deferred: bool = False
    _version: int = 0  #: copies of marks taken for writing
    _written_version: int = 0
    writes: int = 0  #: times the file was written
    background_writes: int = 0  #: of which in a thread, off the event loop
    errors: int = 0  #: reservations that could not be written
    last_error: str = ""

    def load(self) -> None:
        """Read the marks the last run reserved. A damaged file is an error: starting
        without it could hand out seqs twice."""
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.path}: cannot be read ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("marks"), list):
            raise ValueError(f"{self.path}: not a seq reservation file")
        body = json.dumps(doc["marks"], separators=(",", ":")).encode()
        if hashlib.sha256(body).hexdigest() != doc.get("sha256"):
            raise ValueError(f"{self.path}: sha256 mismatch, the file is corrupt")
        for rec in doc["marks"]:
            if (
                not isinstance(rec, list) or len(rec) != 3
                or not all(isinstance(v, str) for v in rec[:2])
                or not isinstance(rec[2], int) or not 0 <= rec[2] < 1 << 64
            ):
                raise ValueError(f"{self.path}: malformed record {rec!r}")
            self.marks[(rec[0], rec[1])] = rec[2]
        self.durable = dict(self.marks)

    def mark(self, tenant: str, name: str) -> int:
        """The highest seq reserved for the VM (0 = none)."""
        return self.marks.get((tenant, name), 0)

    def attach(self, entry: VmEntry) -> None:
        """Reserve the VM's seqs from here on: its next event past what is reserved
        reserves a block first (a VM that never writes reserves nothing)."""
        key = (entry.tenant, entry.name)
        entry.hub.history.on_seq_limit = lambda seq: self._reserve(entry, key, seq)
        self._set_limit(entry, key)

    def reserve_ahead(self, entries: list[VmEntry]) -> None:
        """Give every VM in ``entries`` a fresh block past its seq, in one write (at
        start, so the first writes after a restart do not each wait for one)."""
        for entry in entries:
            key = (entry.tenant, entry.name)
            want = min(entry.vm.seq + MIN_BLOCK, (1 << 64) - 1)
            if self.marks.get(key, 0) < want:
                self.marks[key] = want
        try:
            self.write()
        except OSError as exc:
            self._failed(exc, "", "")
        for entry in entries:
            self._set_limit(entry, (entry.tenant, entry.name))

    def _set_limit(self, entry: VmEntry, key: Key) -> None:
        """Call back when the VM passes half of what is durably reserved (or all of it
        while an extension is being written)."""
        history = entry.hub.history
        hard = max(self.durable.get(key, 0), entry.vm.seq)
        block = self._blocks.get(key, (MIN_BLOCK, 0.0))[0]
        soft = hard - block // 2
        background = not self.deferred and key not in self._extending
        history.seq_limit = soft if background and soft > entry.vm.seq else hard

    def forget(self, tenant: str, name: str) -> None:
        """The VM is gone; its mark goes with the next write of the file."""
        key = (tenant, name)
        self.marks.pop(key, None)
        self.durable.pop(key, None)
        self._blocks.pop(key, None)

    def set_mark(self, tenant: str, name: str, seq: int) -> None:
        """Set the VM's mark (written with the next :meth:`write`)."""
        self.marks[(tenant, name)] = seq

    def keep(self, vms: set[tuple[str, str]]) -> None:
        """Forget the marks of VMs not in ``vms`` (they are gone, with their files)."""
        self.marks = {k: v for k, v in self.marks.items() if k in vms}

    def _next_mark(self, key: Key, seq: int) -> int:
        now = time.monotonic()
        block, last = self._blocks.get(key, (MIN_BLOCK // 4, 0.0))
        block = min(MAX_BLOCK, block * 4) if now - last < 1.0 else MIN_BLOCK
        self._blocks[key] = (block, now)
        return min(seq + block, (1 << 64) - 1)

    def _reserve(self, entry: VmEntry, key: Key, seq: int) -> None:
        if seq <= self.durable.get(key, 0):
            # Half the block is used: reserve the next one in the background.
            if not self.deferred and key not in self._extending:
                self._extend(entry, key, seq)
            self._set_limit(entry, key)
            return
        if self.deferred:
            # Loading (a journal replay past the mark): nothing reaches a client before
            # reserve_ahead has written the file, so the marks only need to be right then.
            self.marks[key] = self.durable[key] = max(
                self.marks.get(key, 0), self._next_mark(key, seq)
            )
            self._set_limit(entry, key)
            return
        self.marks[key] = max(self.marks.get(key, 0), self._next_mark(key, seq))
        try:
            self.write()
        except OSError as exc:
            # The event is applied already; what a failure costs is that a crash before
            # the next successful write may hand these seqs out again. Reported.
            self._failed(exc, entry.name, entry.tenant)
            # Go on to the end of the block (as if written) and try again there, not at
            # every event.
            self.durable[key] = max(self.durable.get(key, 0), self.marks[key])
        self._set_limit(entry, key)

    def _extend(self, entry: VmEntry, key: Key, seq: int) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self.marks[key] = max(self.marks.get(key, 0), self._next_mark(key, seq))
        if loop is None:
            with contextlib.suppress(OSError):
                self.write()
            return
        self._extending.add(key)
        copy = self._copy()

        def done(fut: asyncio.Future[None]) -> None:
            self._extending.discard(key)
            exc = fut.exception()
            if isinstance(exc, OSError):
                self._failed(exc, entry.name, entry.tenant)
            if not entry.vm.closed:
                self._set_limit(entry, key)

        fut = loop.run_in_executor(None, self._write_copy, copy)
        fut.add_done_callback(done)
        self.background_writes += 1

    def _failed(self, exc: OSError, vm: str, tenant: str) -> None:
        self.errors += 1
        self.last_error = str(exc)
        log.error("seqs.reserve_failed", vm=vm, tenant=tenant, reason=str(exc))

    def _copy(self) -> tuple[int, dict[Key, int]]:
        self._version += 1
        return self._version, dict(self.marks)

    def write(self) -> None:
        """Write every mark (fsynced) to the file."""
        self._write_copy(self._copy())

    def _write_copy(self, copy: tuple[int, dict[Key, int]]) -> None:
        version, marks = copy
        with self._lock:
            if version > self._written_version:
                rows = [[*k, v] for k, v in sorted(marks.items())]
                body = json.dumps(rows, separators=(",", ":")).encode()
                doc = {"sha256": hashlib.sha256(body).hexdigest(), "marks": rows}
                write_atomic(self.path, json.dumps(doc).encode())
                self._written_version = version
                self.writes += 1
            # What this copy holds is on disk now (or in a newer copy written before).
            for k, v in marks.items():
                if v > self.durable.get(k, 0):
                    self.durable[k] = v
