"""The journal (``durability = "journal"``): every acknowledged change is on disk before
its reply, so a SIGKILL loses nothing that was acknowledged.

Every operation on every VM is appended as one JSON line, the way a recording holds it
(:mod:`pagetrackd.replay`: the op, its arguments, the seq before and after), plus the
daemon's own operations (a VM created, deleted or restored). Before an RPC replies, it
waits until everything appended so far is fsynced (:meth:`Journal.commit`); the calls
that wait together share one fsync (group commit). Records nobody waits for (a
workload's writes) are flushed in the background.

Files: ``STATE_DIR/journal/<first index>.jnl``, each holding records from its first
index on. A save starts a new file; once every VM's saved file holds everything up to
an index, the files wholly below it are deleted. At start, after the VM files are
loaded, every record newer than the VM's file is applied again in order, with the seqs
it had (:mod:`pagetrackd.state.journal_replay`): a seq taken by something that was not
journaled becomes a RESTART gap. A torn last line (the crash came mid-write) is cut off
and ends that run's file; the next run wrote its records to a newer file, which is read
on. A damaged whole line ends the journal.

TTL leases made or ended are records too (``lease_create`` / ``lease_end``, with no VM):
they are applied before the VM files load (:meth:`Journal.lease_records`), so the
references held under a lease made since the last save load with their VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from pagetrackd.domain import Unavailable
from pagetrackd.files import fsync_dir
from pagetrackd.replay import Recorder

if TYPE_CHECKING:
    from pagetrackd.application import VmEntry

log = structlog.get_logger("pagetrackd.journal")

__all__ = ["Journal", "JournalRecorder"]

SUFFIX = ".jnl"


@dataclass
class Journal:
    """Append-only records with group commit; see the module docstring."""

    directory: Path
    #: highest index appended (0 = none); the next record gets last_index + 1
    last_index: int = 0
    #: highest index known to be on disk
    durable_index: int = 0
    #: while true (loading, replaying, a restore) nothing is appended
    paused: bool = False
    commits: int = 0  #: fsyncs done
    records_written: int = 0
    errors: int = 0
    _buf: list[bytes] = field(default_factory=list)
    _flush: asyncio.Task[None] | None = None
    _file: Any = None
    _new_segment: bool = True

    # ------------------------------------------------------------------ reading

    def segments(self) -> list[tuple[int, Path]]:
        """(first index, path) of each journal file, oldest first."""
        out = []
        for p in self.directory.glob(f"*{SUFFIX}"):
            with contextlib.suppress(ValueError):
                out.append((int(p.name[: -len(SUFFIX)]), p))
        return sorted(out)

    def read(self) -> Iterator[dict[str, Any]]:
        """Every record, oldest first. A torn last line (the crash came while it was
        written, so it was never acknowledged) is cut off and reading goes on with the
        next file; a damaged whole line ends the journal."""
        for _, path in self.segments():
            with open(path, "rb") as f:
                good = 0  # bytes of whole lines so far
                for line in f:
                    if not line.endswith(b"\n"):
                        # The run writing this file died mid-line; the next run wrote its
                        # records to a newer file, so the journal goes on there.
                        log.warning("journal.torn_tail", path=str(path))
                        _cut(path, good)
                        break
                    good += len(line)
                    try:
                        rec = json.loads(line)
                    except (ValueError, RecursionError):
                        log.warning("journal.damaged_line", path=str(path))
                        return
                    if not isinstance(rec, dict) or not isinstance(rec.get("i"), int):
                        log.warning("journal.damaged_line", path=str(path))
                        return
                    self.last_index = max(self.last_index, rec["i"])
                    yield rec
        self.durable_index = self.last_index

    def lease_records(self) -> Iterator[dict[str, Any]]:
        """The lease records, oldest first, without the rest: only lines naming a lease
        op are decoded. Reading stops where :meth:`read` would (a torn or damaged line);
        nothing is changed on disk."""
        for _, path in self.segments():
            with open(path, "rb") as f:
                for line in f:
                    if not (line.startswith(b"{") and line.endswith(b"}\n")):
                        if line.endswith(b"\n"):
                            return  # damaged: the journal ends here
                        break  # torn: that run's file ends here
                    if b'"op":"lease_' not in line:
                        continue
                    try:
                        rec = json.loads(line)
                    except (ValueError, RecursionError):
                        return
                    if isinstance(rec, dict) and isinstance(rec.get("i"), int):
                        yield rec

    # ------------------------------------------------------------------ writing

    def append(self, record: dict[str, Any]) -> None:
        """Add a record (unless paused); :meth:`commit` makes it durable."""
        if self.paused:
            return
        self.last_index += 1
        record["i"] = self.last_index
        self._buf.append(json.dumps(record, separators=(",", ":")).encode() + b"\n")

    async def commit(self) -> None:
        """Return once every record appended so far is on disk (one fsync for all the
        records waiting together). Raises Unavailable if the journal cannot be written:
        the change is made but not durable."""
        target = self.last_index
        while self.durable_index < target:
            if self._flush is None or self._flush.done():
                self._flush = asyncio.get_running_loop().create_task(self._write_pending())
            task = self._flush
            try:
                await asyncio.shield(task)
            except OSError as exc:
                raise Unavailable(
                    f"the change was made but the journal could not be written ({exc});"
                    " it may be lost if the daemon stops before its next save"
                ) from None

    async def _write_pending(self) -> None:
        data, upto = b"".join(self._buf), self.last_index
        first = upto - len(self._buf) + 1
        self._buf = []
        try:
            await asyncio.to_thread(self._write, data, first)
        except OSError:
            self.errors += 1
            # Keep the records for the next attempt: a hole would make replay diverge.
            self._buf.insert(0, data)
            raise
        self.durable_index = max(self.durable_index, upto)
        self.commits += 1

    def _write(self, data: bytes, first: int) -> None:
        if not data:
            return
        if self._file is None or self._new_segment:
            if self._file is not None:
                self._file.close()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self.directory / f"{first:020d}{SUFFIX}", "ab")
            fsync_dir(self.directory)
            self._new_segment = False
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records_written += data.count(b"\n")

    async def run(self, interval_s: float = 0.05) -> None:
        """Flush records nobody waits for (workloads), until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            if self._buf:
                with contextlib.suppress(Unavailable):
                    await self.commit()

    def rotate(self) -> int:
        """Start a new file with the next record; returns the last index before it."""
        self._new_segment = True
        return self.last_index

    async def compact(self, upto: int) -> None:
        """Delete the files whose records all have an index <= ``upto`` (every VM file
        holds them). The newest file is kept."""
        segs = self.segments()
        doomed = [p for (first, p), (nxt, _) in zip(segs, segs[1:], strict=False)
                  if nxt - 1 <= upto]
        if doomed:
            await asyncio.to_thread(_unlink_all, doomed, self.directory)

    async def close(self) -> None:
        """Write what is pending and close the file."""
        with contextlib.suppress(Unavailable):
            await self.commit()
        if self._file is not None:
            self._file.close()
            self._file = None


def _cut(path: Path, length: int) -> None:
    """Drop a torn last line, so a file is whole lines again."""
    with open(path, "r+b") as f:
        f.truncate(length)
        f.flush()
        os.fsync(f.fileno())


def _unlink_all(paths: list[Path], directory: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
    fsync_dir(directory)


class JournalRecorder(Recorder):
    """Records one VM's operations into the journal (from its current state on)."""

    def __init__(self, journal: Journal, entry: VmEntry) -> None:
        self.journal = journal
        self.tenant = entry.tenant
        self.vm_name = entry.name
        # _emit goes to the journal: the file is never written
        super().__init__(entry.vm, io.StringIO(), fresh=False)

    def _emit(self, record: dict[str, Any]) -> None:
        if "format" in record:  # the recording header: the journal has a create record
            return
        self.journal.append({"t": self.tenant, "vm": self.vm_name, **record})
