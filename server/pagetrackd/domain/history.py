"""A VM's recent events, kept so that a Watch stream can resume from a seq: bounded in
events and bytes, saved and restored with the daemon's state. The design follows etcd's
watchable store: a revision (our seq) and ``Compacted`` for history that is gone."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.errors import Compacted, InvalidArgument
from pagetrackd.domain.events import EventBatch, WriteEvent
from pagetrackd.domain.findings import Finding
from pagetrackd.domain.stream_records import (
    Gap,
    GapReason,
    Item,
    RegionRemoved,
    Stamped,
    batch_bytes,
    record_bytes,
    region_record,
    stamp,
)

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm


#: the items of every history that has held none (never appended to)
_NO_ITEMS: deque[Item] = deque()

class History:
    """A VM's recent events and region records, bounded in events and bytes.

    Registered as the VM's first (so last-called among the streams) notifier. Single
    events are gathered into batches of up to 256 before they are stored.
    """

    name = "history"
    external = False

    def __init__(self, max_events: int = 65536, max_bytes: int = 16 << 20) -> None:
        if max_events < 0 or max_bytes < 0:
            raise InvalidArgument("history bounds must be >= 0")
        self.max_events = max_events
        self.max_bytes = max_bytes
        #: the held items; a VM that has had no event shares one empty deque (a deque
        #: takes 760 bytes even empty, and a daemon may hold 100,000 idle VMs)
        self._items: deque[Item] = _NO_ITEMS
        self._pending: list[WriteEvent] = []
        self._pending_ts = 0
        self.events = 0
        self.nbytes = 0
        self._oldest_seq = 1
        #: seq ranges lost in a crash (first, last), reported as RESTART gaps on resume
        self.lost: list[tuple[int, int]] = []
        #: the highest seq handed out may be ``seq_limit``; an event past it calls
        #: ``on_seq_limit`` first (the daemon reserves more seqs on disk there)
        self.seq_limit: int | None = None
        self.on_seq_limit: Callable[[int], None] = lambda seq: None

    @property
    def oldest_seq(self) -> int:
        """Lowest seq a resume may still start from."""
        self._flush()  # storing pending single events may let older ones go
        return self._oldest_seq

    @oldest_seq.setter
    def oldest_seq(self, seq: int) -> None:
        self._oldest_seq = seq

    def _flush(self) -> None:
        if self._pending:
            batch = EventBatch.from_events(self._pending)
            self._pending = []
            self._append(Stamped(batch, self._pending_ts))

    def _append(self, item: Item) -> None:
        """Store an item; the oldest go while the bounds are passed. ``nbytes`` counts
        what the items really hold (objects included, region records too), so many
        small batches cannot hold more memory than ``max_bytes`` says."""
        if self._items is _NO_ITEMS:
            self._items = deque()
        self._items.append(item)
        if isinstance(item, Stamped):
            self.events += len(item.batch)
            self.nbytes += batch_bytes(item.batch)
        else:
            self.nbytes += record_bytes(item)
        while self._items and (self.events > self.max_events or self.nbytes > self.max_bytes):
            old = self._items[0]
            if isinstance(old, Stamped):
                n = len(old.batch)
                excess = self.events - self.max_events
                if 0 < excess < n and self.nbytes <= self.max_bytes:
                    # Over by fewer events than the oldest batch holds: drop just those,
                    # so the history keeps exactly the newest max_events events.
                    keep = old.batch.slice(excess, n)
                    self._items[0] = Stamped(keep, old.ts_ns)
                    self._oldest_seq = int(old.batch.seq[excess])
                    self.events -= excess
                    self.nbytes -= batch_bytes(old.batch) - batch_bytes(keep)
                    continue
            self._items.popleft()
            if isinstance(old, Stamped):
                self.events -= len(old.batch)
                self.nbytes -= batch_bytes(old.batch)
                self._oldest_seq = int(old.batch.seq[-1]) + 1
            else:
                self.nbytes -= record_bytes(old)
                if isinstance(old, Finding):
                    self._oldest_seq = max(self._oldest_seq, old.seq + 1)

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        """Keep one event."""
        if self.seq_limit is not None and event.seq > self.seq_limit:
            self.on_seq_limit(event.seq)
        if not self._pending:
            self._pending_ts = time.time_ns()
        self._pending.append(event)
        if len(self._pending) >= 256:
            self._flush()

    def track_write_batch(self, vm: Vm, batch: EventBatch) -> None:
        """Keep a batch of events."""
        if self.seq_limit is not None and len(batch) and int(batch.seq[-1]) > self.seq_limit:
            self.on_seq_limit(int(batch.seq[-1]))
        self._flush()
        self._append(stamp(batch))

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        """Keep a region record in order with the events."""
        self._flush()
        self._append(region_record(vm, base_gfn, npages))

    def track_finding(self, vm: Vm, finding: Finding) -> None:
        """Keep a finding in order with the events."""
        if self.seq_limit is not None and finding.seq > self.seq_limit:
            self.on_seq_limit(finding.seq)
        self._flush()
        self._append(finding)

    def add_lost(self, first: int, last: int) -> None:
        """Seqs ``first..last`` were reserved by a daemon run that crashed: a resume
        across them gets a RESTART gap with that exact range."""
        if first <= last:
            self.lost.append((first, last))
            self.lost.sort()

    def dump(self) -> HistoryDump:
        """What the history holds, as columns (for a state file)."""
        self._flush()
        batches = [i.batch for i in self._items if isinstance(i, Stamped)]
        return HistoryDump(
            events=EventBatch.concat(batches),
            batch_events=np.array([len(b) for b in batches], dtype=np.int64),
            batch_ts_ns=np.array(
                [i.ts_ns for i in self._items if isinstance(i, Stamped)], dtype=np.int64
            ),
            is_region=np.array(
                [isinstance(i, RegionRemoved) for i in self._items if not isinstance(i, Finding)],
                dtype=bool,
            ),
            regions=[i for i in self._items if isinstance(i, RegionRemoved)],
            oldest_seq=self.oldest_seq,
            lost=[(a, b) for a, b in self.lost if b >= self._oldest_seq],
            findings=[i for i in self._items if isinstance(i, Finding)],
        )

    def restore(self, dump: HistoryDump, head_seq: int) -> None:
        """Hold what ``dump`` held (an empty history only), within this history's bounds:
        a daemon restarted from its state lets streams resume as if it had not stopped.
        Raises InvalidArgument if the dump does not fit together or runs past ``head_seq``."""
        n_batches = int(np.count_nonzero(~dump.is_region))
        seqs = dump.events.seq
        fseqs = [f.seq for f in dump.findings]
        if (
            self._items or self._pending
            or dump.batch_events.size != n_batches or dump.batch_ts_ns.size != n_batches
            or len(dump.regions) != dump.is_region.size - n_batches
            or int(dump.batch_events.sum()) != len(dump.events)
            or bool((dump.batch_events <= 0).any())
            or (seqs.size and (
                bool((np.diff(seqs.astype(np.int64)) <= 0).any())
                or int(seqs[0]) < dump.oldest_seq or int(seqs[-1]) > head_seq
            ))
            or not 1 <= dump.oldest_seq <= head_seq + 1
            or any(not 1 <= a <= b <= head_seq for a, b in dump.lost)
            or fseqs != sorted(set(fseqs))
            or any(not dump.oldest_seq <= s <= head_seq for s in fseqs)
            or bool(np.isin(np.array(fseqs, dtype=np.uint64), seqs).any())
        ):
            raise InvalidArgument("saved event history does not fit together; not restored")
        ends = np.cumsum(dump.batch_events).tolist()
        regions = iter(dump.regions)
        # Findings go back in seq order among the batches (a stored batch never spans a
        # finding's seq: the pending events are stored before a finding is).
        findings = list(reversed(dump.findings))
        k = lo = 0
        self._oldest_seq = dump.oldest_seq
        self.lost = sorted(dump.lost)
        for is_region in dump.is_region.tolist():
            if is_region:
                region = next(regions)
                while findings and findings[-1].seq <= region.at_seq:
                    self._append(findings.pop())
                self._append(region)
                continue
            while findings and findings[-1].seq < int(dump.events.seq[lo]):
                self._append(findings.pop())
            self._append(Stamped(dump.events.slice(lo, ends[k]), int(dump.batch_ts_ns[k])))
            lo = ends[k]
            k += 1
        while findings:
            self._append(findings.pop())

    def since(self, start_seq: int, head_seq: int) -> list[Item]:
        """Items with events of seq >= ``start_seq`` (region records after it too).

        Raises Compacted when ``start_seq`` is older than what is held.
        """
        # Pending single events first: storing them may let go of older ones, and the
        # checks below must see what is really held.
        self._flush()
        if start_seq > head_seq + 1:
            raise InvalidArgument(
                f"start_seq {start_seq} is in the future: the VM's last seq is {head_seq}"
            )
        if self.max_events == 0 and start_seq <= head_seq:
            raise Compacted(
                "this daemon keeps no event history; resume is not possible",
                oldest_seq=head_seq + 1,
            )
        if start_seq < self.oldest_seq:
            raise Compacted(
                f"seq {start_seq} is no longer held; the oldest held is {self.oldest_seq}",
                oldest_seq=self.oldest_seq,
            )
        out: list[Item] = []
        lost = [
            Gap(max(a, start_seq), b, b - max(a, start_seq) + 1, GapReason.RESTART)
            for a, b in self.lost if b >= start_seq
        ]
        for item in self._items:
            while lost and isinstance(item, Stamped) and int(item.batch.seq[0]) > lost[0].last_seq:
                out.append(lost.pop(0))
            if isinstance(item, Stamped):
                b = item.batch
                if int(b.seq[-1]) < start_seq:
                    continue
                if int(b.seq[0]) < start_seq:
                    first = int(np.searchsorted(b.seq, start_seq))  # seqs ascend
                    item = Stamped(b.slice(first, len(b)), item.ts_ns)
                out.append(item)
            elif isinstance(item, RegionRemoved) and item.at_seq >= start_seq - 1:
                out.append(item)
            elif isinstance(item, Finding) and item.seq >= start_seq:
                out.append(item)
        return out + lost


@dataclass(frozen=True, slots=True)
class HistoryDump:
    """A history's contents as columns: every held event in seq order, how many of them
    each stored batch held and when it was stamped, and the region records, placed by
    ``is_region`` (one flag per stored batch or region record, in order); findings
    are placed by their seqs."""

    events: EventBatch
    batch_events: npt.NDArray[np.int64]
    batch_ts_ns: npt.NDArray[np.int64]
    is_region: npt.NDArray[np.bool_]
    regions: list[RegionRemoved]
    oldest_seq: int
    #: seq ranges lost in a crash (see :meth:`History.add_lost`)
    lost: list[tuple[int, int]] = field(default_factory=list)
    #: findings held, in seq order
    findings: list[Finding] = field(default_factory=list)
