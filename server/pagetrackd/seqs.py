"""Seq reservations: a VM's seqs are reserved on disk, in blocks, before they are
handed out, so that a daemon that crashes and restarts never hands one out twice.

The state directory holds ``seqs.json``: per VM the highest seq the running daemon may
hand out. An event past it first reserves the next block (the file is rewritten and
fsynced, synchronously: nothing of the event has reached a client yet). At start a VM
continues after its reserved mark; the seqs between its saved state and the mark are
the exact range a crash can have lost, reported to resuming streams as a RESTART gap.
"""

from __future__ import annotations

import hashlib
import json
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


def _key(tenant: str, name: str) -> str:
    return json.dumps([tenant, name])


@dataclass
class SeqReservations:
    """The reserved seq marks of every VM, and the file that holds them."""

    path: Path
    marks: dict[str, int] = field(default_factory=dict)
    _blocks: dict[str, tuple[int, float]] = field(default_factory=dict)
    writes: int = 0  #: times the file was written
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
            self.marks[_key(rec[0], rec[1])] = rec[2]

    def mark(self, tenant: str, name: str) -> int:
        """The highest seq reserved for the VM (0 = none)."""
        return self.marks.get(_key(tenant, name), 0)

    def attach(self, entry: VmEntry) -> None:
        """Reserve the VM's seqs from here on: its next event past what is reserved
        reserves a block first."""
        history = entry.hub.history
        key = _key(entry.tenant, entry.name)
        mark = self.marks.get(key, 0)
        history.seq_limit = mark if mark >= entry.vm.seq else entry.vm.seq
        history.on_seq_limit = lambda seq: self._reserve(entry, key, seq)

    def forget(self, tenant: str, name: str) -> None:
        """The VM is gone; its mark goes with the next write of the file."""
        self.marks.pop(_key(tenant, name), None)
        self._blocks.pop(_key(tenant, name), None)

    def set_mark(self, tenant: str, name: str, seq: int) -> None:
        """Set the VM's mark (written with the next :meth:`write`)."""
        self.marks[_key(tenant, name)] = seq

    def keep(self, vms: set[tuple[str, str]]) -> None:
        """Forget the marks of VMs not in ``vms`` (they are gone, with their files)."""
        self.marks = {k: v for k, v in self.marks.items() if tuple(json.loads(k)) in vms}

    def _reserve(self, entry: VmEntry, key: str, seq: int) -> None:
        now = time.monotonic()
        block, last = self._blocks.get(key, (MIN_BLOCK // 4, 0.0))
        block = min(MAX_BLOCK, block * 4) if now - last < 1.0 else MIN_BLOCK
        self._blocks[key] = (block, now)
        mark = min(seq + block, (1 << 64) - 1)
        self.marks[key] = mark
        entry.hub.history.seq_limit = mark
        try:
            self.write()
        except OSError as exc:
            # The event is applied already; what a failure costs is that a crash before
            # the next successful write may hand these seqs out again. Reported.
            self.errors += 1
            self.last_error = str(exc)
            log.error("seqs.reserve_failed", vm=entry.name, tenant=entry.tenant,
                      reason=str(exc))

    def write(self) -> None:
        """Write every mark (fsynced) to the file."""
        marks = [[*json.loads(k), v] for k, v in sorted(self.marks.items())]
        body = json.dumps(marks, separators=(",", ":")).encode()
        doc = {"sha256": hashlib.sha256(body).hexdigest(), "marks": marks}
        write_atomic(self.path, json.dumps(doc).encode())
        self.writes += 1
