"""Remote notifiers: per-VM event history and the subscribers behind Watch streams.

Each Watch stream is one :class:`Subscriber`, registered on its VM as a notifier of its
own (so it is an *external* user; streams are told of an event before the plugins
react to it, newest first among themselves, see ``domain.notifiers``). It
never slows the vCPU: events go into a bounded queue with ``put``-and-return, and what
does not fit is handled by the stream's slow-consumer policy, always accounted for:

* ``drop`` -- the events are dropped and the stream later gets one gap record with
  the exact seq range and count;
* ``coalesce`` -- while behind, only the latest write per gfn is kept; superseded
  events are reported as a gap with reason COALESCED;
* ``disconnect`` -- the stream is ended with its lag;
* ``block`` -- the writer is asked to wait for room (the transport does the waiting,
  up to a bound); if it still has no room the events are dropped and reported.

A per-VM :class:`History` keeps recent events so that a stream can resume from a seq.
The design follows etcd's watchable store: a revision (our seq), each subscriber's
position, bounded queues, and ``Compacted`` for history that is gone.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.errors import Compacted, InvalidArgument
from pagetrackd.domain.events import EventBatch, WriteEvent
from pagetrackd.domain.findings import Finding
from pagetrackd.domain.types import PAGE_SHIFT, RegionChange, Source

if TYPE_CHECKING:
    from pagetrackd.domain.notifiers import NotifierNode
    from pagetrackd.domain.vm import Vm


class SlowPolicy(enum.Enum):
    """What a stream does when its queue is full."""

    DROP = "drop"
    COALESCE = "coalesce"
    DISCONNECT = "disconnect"
    BLOCK = "block"


class GapReason(enum.Enum):
    """Why events are missing from a stream."""

    DROPPED = "dropped"  #: the queue was full (drop policy, or block that timed out)
    COALESCED = "coalesced"  #: superseded by a later write to the same gfn
    #: seqs a crashed daemon run had reserved: whatever events they held are lost
    RESTART = "restart"


@dataclass(frozen=True, slots=True)
class Gap:
    """Events the stream will never get: ``count`` events with seqs in
    ``[first_seq, last_seq]`` that matched its filter."""

    first_seq: int
    last_seq: int
    count: int
    reason: GapReason


@dataclass(frozen=True, slots=True)
class RegionRemoved:
    """A memslot's gfns are gone (delete or move); ``at_seq`` is the VM's seq then."""

    base_gfn: int
    npages: int
    at_seq: int
    change: RegionChange | None = None  #: the slot and change, when the VM said


def _region_record(vm: Vm, base_gfn: int, npages: int) -> RegionRemoved:
    return RegionRemoved(base_gfn, npages, vm.seq, vm.region_change)


@dataclass(frozen=True, slots=True)
class Stamped:
    """Events with the wall-clock time (ns) at which they reached the hub."""

    batch: EventBatch
    ts_ns: int


Item = Stamped | Gap | RegionRemoved | Finding


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a stream wants. Empty ``ranges`` means every gfn; ``sources`` None
    means both; ``owner`` keeps only gfns that owner holds a tracking reference on.
    Findings pass when their gfns meet a range and, with ``plugins``, when one of those
    plugins published them; ``only_findings`` lets no write event through."""

    ranges: tuple[tuple[int, int], ...] = ()
    sources: frozenset[Source] | None = None
    owner: str | None = None
    plugins: frozenset[str] | None = None
    only_findings: bool = False

    @property
    def filters_events(self) -> bool:
        """Whether some write event may be filtered out."""
        return bool(
            self.ranges or self.sources is not None or self.owner is not None
            or self.only_findings
        )

    def passes_finding(self, finding: Finding) -> bool:
        """Whether a finding passes."""
        if self.plugins is not None and finding.plugin not in self.plugins:
            return False
        return not self.ranges or any(finding.overlaps(s, c) for s, c in self.ranges)

    def mask(self, vm: Vm, batch: EventBatch) -> npt.NDArray[np.bool_] | None:
        """Which events of ``batch`` pass, or None when all do."""
        if self.only_findings:
            return np.zeros(len(batch), dtype=np.bool_)
        keep: npt.NDArray[np.bool_] | None = None
        if self.ranges:
            gfn = (batch.gpa >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            keep = np.zeros(len(batch), dtype=np.bool_)
            for start, count in self.ranges:
                keep |= (gfn >= start) & (gfn < start + count)
        if self.sources is not None:
            allowed = np.isin(batch.source, [int(s) for s in self.sources])
            keep = allowed if keep is None else keep & allowed
        if self.owner is not None:
            gfns = (batch.gpa >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            owned = np.isin(gfns, vm.tracked_gfns(self.owner))
            keep = owned if keep is None else keep & owned
        return keep

    def passes(self, vm: Vm, event: WriteEvent) -> bool:
        """Whether one event passes."""
        if self.only_findings:
            return False
        gfn = event.gpa >> PAGE_SHIFT
        if self.ranges and not any(s <= gfn < s + c for s, c in self.ranges):
            return False
        if self.sources is not None and event.source not in self.sources:
            return False
        if self.owner is not None:
            info = vm.track_query([gfn])[0]
            return info.owners.get(self.owner, 0) > 0
        return True


def make_filter(
    ranges: Sequence[tuple[int, int]] = (),
    sources: Sequence[Source] = (),
    owner: str | None = None,
    plugins: Sequence[str] = (),
    only_findings: bool = False,
) -> Filter:
    """Validate and build a filter."""
    if len(plugins) > 64 or any(not p or len(p) > 128 for p in plugins):
        raise InvalidArgument(
            "filter plugins: at most 64 plugin names of 1..128 characters", field="plugins"
        )
    for start, count in ranges:
        if start < 0 or count <= 0:
            raise InvalidArgument(
                f"filter gfn range start={start} count={count}: start >= 0 and count > 0",
                field="gfn_ranges",
            )
    if len(ranges) > 1024:
        raise InvalidArgument(f"{len(ranges)} filter ranges; at most 1024", field="gfn_ranges")
    return Filter(
        tuple(ranges), frozenset(sources) if sources else None, owner or None,
        frozenset(plugins) if plugins else None, only_findings,
    )


#: what holding one stored item costs beyond its event bytes: the batch object, its five
#: column arrays and the deque slot (a one-event batch takes some 760 bytes in all)
ITEM_BYTES = 720
#: what each event's columns take: seq, gpa (8 each), length, vcpu (4 each), source (1)
#: and a timestamp (4 on average, one per batch or per coalesced event)
EVENT_BYTES = 29


#: what a single event waiting to be packed into a batch (or coalesced) holds beyond its
#: data: the WriteEvent object and its fields
_SINGLE_BYTES = 200


def batch_bytes(batch: EventBatch) -> int:
    """Bytes a stored batch holds: its data, its columns and its objects."""
    return len(batch.data) + EVENT_BYTES * len(batch) + ITEM_BYTES


def _record_bytes(item: Gap | RegionRemoved | Finding) -> int:
    """Bytes a stored record holds."""
    return item.nbytes if isinstance(item, Finding) else ITEM_BYTES


def _stamp(batch: EventBatch) -> Stamped:
    return Stamped(batch, time.time_ns())


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
        self._items: deque[Item] = deque()
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
        self._items.append(item)
        if isinstance(item, Stamped):
            self.events += len(item.batch)
            self.nbytes += batch_bytes(item.batch)
        else:
            self.nbytes += _record_bytes(item)
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
                self.nbytes -= _record_bytes(old)
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
        self._append(_stamp(batch))

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        """Keep a region record in order with the events."""
        self._flush()
        self._append(_region_record(vm, base_gfn, npages))

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


@dataclass(slots=True)
class StreamCounters:
    """What a stream has been through, for progress messages and metrics."""

    queued: int = 0  #: events put in the queue (after filtering)
    sent: int = 0  #: events taken from the queue to be sent
    dropped: int = 0  #: events lost to a full queue, all reported in gaps
    coalesced: int = 0  #: events superseded by later writes to the same gfn
    filtered: int = 0  #: events the filter did not want
    blocked_writes: int = 0  #: writes that waited for room (block policy)
    block_timeouts: int = 0  #: waits that ran out, then dropped
    #: of ``dropped``, events already reported in a gap taken for sending
    reported_dropped: int = 0
    #: of ``coalesced``, events already reported in a gap taken for sending
    reported_coalesced: int = 0


class Subscriber:
    """One remote notifier (a Watch stream): filter, bounded queue, policy, counters.

    ``wake`` is called whenever the queue gains something; the transport uses it to
    wake the task that sends. Everything here runs on the daemon's event loop.
    """

    external = True

    def __init__(
        self,
        *,
        name: str,
        flt: Filter | None = None,
        queue_limit: int = 65536,
        policy: SlowPolicy = SlowPolicy.DROP,
        wake: Callable[[], None] = lambda: None,
        block_timeout_s: float = 1.0,
        queue_bytes: int = 4 << 20,
    ) -> None:
        if not 1 <= queue_limit <= 1 << 22:
            raise InvalidArgument(f"queue_limit {queue_limit} must be 1..{1 << 22} events")
        if queue_bytes < 1:
            raise InvalidArgument(f"queue_bytes {queue_bytes} must be >= 1")
        self.name = name
        self.filter = flt or Filter()
        self.queue_limit = queue_limit
        #: the queue is full at this many bytes (events' data, columns and objects), too
        self.queue_bytes = queue_bytes
        self.nbytes = 0  #: bytes queued, singles and coalesced events included
        self.policy = policy
        self.wake = wake
        #: block policy: how long a writer waits for room before events are dropped
        self.block_timeout_s = block_timeout_s
        self.node: NotifierNode | None = None
        self._items: deque[Item] = deque()
        self._singles: list[WriteEvent] = []  # single events not yet packed
        self._singles_ts = 0
        self.depth = 0  #: events queued, singles included
        self.counters = StreamCounters()
        self._gap: list[int] | None = None  # [first, last, count] of dropped events
        self._coalesce: dict[int, WriteEvent] = {}
        #: lowest and highest seq of the events superseded while coalescing, and how many
        self._superseded_first = 0
        self._superseded_last = 0
        self._superseded = 0
        #: set when the disconnect policy fired: the lag that made it fire
        self.overflowed_lag: int | None = None
        #: newest seq taken for sending: as an event, or reported in a gap
        self.last_seq = 0

    # ----------------------------------------------------------------- producer side

    @property
    def full(self) -> bool:
        """Whether the queue has no room."""
        return self.depth >= self.queue_limit or self.nbytes >= self.queue_bytes

    @property
    def room(self) -> int:
        """Events that still fit by count (see :meth:`_fits` for bytes)."""
        if self.nbytes >= self.queue_bytes:
            return 0
        return max(0, self.queue_limit - self.depth)

    def _fits(self, batch: EventBatch) -> int:
        """How many of ``batch``'s first events fit, by count and by bytes."""
        room = self.room
        left = self.queue_bytes - self.nbytes - ITEM_BYTES
        if room == 0 or left <= 0:
            return 0
        if len(batch.data) + EVENT_BYTES * len(batch) <= left:
            return min(room, len(batch))
        cost = np.cumsum(batch.length.astype(np.int64) + EVENT_BYTES)
        return min(room, int(np.searchsorted(cost, left, side="right")))

    def _note_gap(self, first: int, last: int, count: int) -> None:
        self.counters.dropped += count
        if self._gap is None:
            self._gap = [first, last, count]
        else:
            self._gap[0] = min(self._gap[0], first)
            self._gap[1] = max(self._gap[1], last)
            self._gap[2] += count

    def _flush_gap(self) -> None:
        if self._gap is not None:
            self._pack_singles()
            first, last, count = self._gap
            self._items.append(Gap(first, last, count, GapReason.DROPPED))
            self._gap = None

    def _pack_singles(self) -> None:
        if self._singles:
            batch = EventBatch.from_events(self._singles)
            self.nbytes += batch_bytes(batch) - ITEM_BYTES - sum(
                len(e.data) + _SINGLE_BYTES for e in self._singles
            )
            self._items.append(Stamped(batch, self._singles_ts))
            self._singles = []

    def _overflow(self, events: Sequence[WriteEvent] | None, batch: EventBatch | None) -> None:
        """Handle events that do not fit, by policy."""
        if self.policy is SlowPolicy.DISCONNECT:
            if self.overflowed_lag is None:
                self.overflowed_lag = self.depth + (len(batch) if batch else len(events or ()))
            seqs = batch.seq if batch is not None else [e.seq for e in events or ()]
            if len(seqs):
                self._note_gap(int(seqs[0]), int(seqs[-1]), len(seqs))
            self.wake()
            return
        if self.policy is SlowPolicy.COALESCE:
            if batch is not None:
                self._coalesce_batch(batch)
            for e in events or ():
                self._coalesce_one(e, None)
            return
        if batch is not None:
            self._note_gap(int(batch.seq[0]), int(batch.seq[-1]), len(batch))
        elif events:
            self._note_gap(events[0].seq, events[-1].seq, len(events))

    def _supersede(self, first: int, last: int, count: int) -> None:
        """``count`` events with seqs from ``first`` to ``last`` are folded away."""
        if not self._superseded:
            self._superseded_first, self._superseded_last = first, last
        else:
            self._superseded_first = min(self._superseded_first, first)
            self._superseded_last = max(self._superseded_last, last)
        self._superseded += count

    def _coalesce_one(self, event: WriteEvent, earlier: tuple[int, int, int] | None) -> None:
        """Keep ``event`` as the latest write to its gfn. ``earlier`` is (lowest seq,
        highest seq, count) of the earlier writes to that gfn folded into it, if any."""
        if event.gfn not in self._coalesce and (
            len(self._coalesce) >= self.queue_limit or self.nbytes >= self.queue_bytes
        ):
            # no room even to coalesce: the event and the writes folded into it are lost
            first, _, n = earlier if earlier is not None else (event.seq, 0, 0)
            self._note_gap(first, event.seq, n + 1)
            return
        self.nbytes += len(event.data) + _SINGLE_BYTES
        old = self._coalesce.pop(event.gfn, None)
        if old is not None:
            self.nbytes -= len(old.data) + _SINGLE_BYTES
            self._supersede(old.seq, old.seq, 1)
        if earlier is not None:
            self._supersede(*earlier)
        self._coalesce[event.gfn] = event

    def _coalesce_batch(self, batch: EventBatch) -> None:
        """Coalesce a batch in bulk: only the last write per gfn is looked at one by one."""
        gfn = (batch.gpa >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        n = gfn.size
        # Writes in gfn order, each gfn's in seq order: a group's last write is kept,
        # the ones before it (from the group's first to its second-to-last) are folded.
        order = np.lexsort((np.arange(n), gfn))
        _, starts, counts = np.unique(gfn[order], return_index=True, return_counts=True)
        lasts = starts + counts - 1
        seq = batch.seq[order]
        keep_at = order[lasts]
        by_position = np.argsort(keep_at)
        keep = np.zeros(n, dtype=np.bool_)
        keep[keep_at] = True
        kept = batch.select(keep)  # in batch order, i.e. by_position
        for event, k in zip(kept.events(), by_position.tolist(), strict=True):
            c = int(counts[k])
            earlier = (
                (int(seq[starts[k]]), int(seq[lasts[k] - 1]), c - 1) if c > 1 else None
            )
            self._coalesce_one(event, earlier)

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        """Queue one event (if the filter wants it)."""
        f = self.filter
        if f.filters_events and not f.passes(vm, event):
            self.counters.filtered += 1
            return
        if self.full or self._coalesce:
            self._overflow((event,), None)
            return
        if self._gap is not None:
            self._flush_gap()
        if not self._singles:
            self._singles_ts = time.time_ns()
            self.nbytes += ITEM_BYTES
        self._singles.append(event)
        self.nbytes += len(event.data) + _SINGLE_BYTES
        self.depth += 1
        self.counters.queued += 1
        if len(self._singles) >= 512:
            self._pack_singles()
        self.wake()

    def track_write_batch(self, vm: Vm, batch: EventBatch) -> None:
        """Queue a batch of events (those the filter wants; what fits)."""
        mask = self.filter.mask(vm, batch)
        if mask is not None:
            kept = int(np.count_nonzero(mask))
            self.counters.filtered += len(batch) - kept
            if kept == 0:
                return
            batch = batch.select(mask)
        if self._coalesce:
            self._overflow(None, batch)
            return
        room = self._fits(batch)
        if room < len(batch):
            if room:
                self._put(batch.slice(0, room))
            self._overflow(None, batch.slice(room, len(batch)))
            return
        self._put(batch)

    def _put(self, batch: EventBatch) -> None:
        if self._gap is not None:
            self._flush_gap()
        self._pack_singles()
        self._items.append(_stamp(batch))
        self.depth += len(batch)
        self.nbytes += batch_bytes(batch)
        self.counters.queued += len(batch)
        self.wake()

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        """Queue a region record; it is never dropped (one per slot change)."""
        self._pack_singles()
        self._flush_gap()
        self._items.append(_region_record(vm, base_gfn, npages))
        self.wake()

    def track_finding(self, vm: Vm, finding: Finding) -> None:
        """Queue a finding (if the filter wants it). A finding counts as one event
        towards the queue's bounds; when it does not fit it is lost like one, and
        reported in a gap (DROP and BLOCK: the writer is not made to wait for it)."""
        if not self.filter.passes_finding(finding):
            self.counters.filtered += 1
            return
        if self.full:
            if self.policy is SlowPolicy.DISCONNECT and self.overflowed_lag is None:
                self.overflowed_lag = self.depth + 1
            self._note_gap(finding.seq, finding.seq, 1)
            self.wake()
            return
        self._pack_singles()
        self._flush_gap()
        self._items.append(finding)
        self.depth += 1
        self.nbytes += finding.nbytes
        self.counters.queued += 1
        self.wake()

    def vm_closed(self, vm: Vm) -> None:
        """The VM is gone; the transport ends the stream once the queue is drained."""
        self.node = None
        self.wake()

    def preload(self, items: list[Item]) -> None:
        """Put history items (a resume backlog) at the front, ahead of live events.
        They count towards depth but are never dropped (they were held already)."""
        for item in reversed(items):
            self._items.appendleft(item)
            if isinstance(item, Stamped):
                self.depth += len(item.batch)
                self.nbytes += batch_bytes(item.batch)
                self.counters.queued += len(item.batch)
            elif isinstance(item, Finding):
                self.depth += 1
                self.nbytes += item.nbytes
                self.counters.queued += 1
        if items:
            self.wake()

    # ----------------------------------------------------------------- consumer side

    def take(self, max_events: int) -> list[Item]:
        """Take up to ``max_events`` events (and the records in between), in order.

        When the queue drains while coalesced events wait, they are released, in seq
        order, after a gap record for the superseded ones.
        """
        out: list[Item] = []
        budget = max_events
        self._pack_singles()
        while self._items and budget > 0:
            item = self._items[0]
            if isinstance(item, Stamped):
                n = len(item.batch)
                if n > budget:
                    head = Stamped(item.batch.slice(0, budget), item.ts_ns)
                    self._items[0] = Stamped(item.batch.slice(budget, n), item.ts_ns)
                    self.nbytes -= batch_bytes(head.batch) - ITEM_BYTES
                    item = head
                    n = budget
                else:
                    self._items.popleft()
                    self.nbytes -= batch_bytes(item.batch)
                budget -= n
                self.depth -= n
                self.counters.sent += n
                # max: events released after a COALESCED gap are older than its end
                self.last_seq = max(self.last_seq, int(item.batch.seq[-1]))
            elif isinstance(item, Finding):
                self._items.popleft()
                self.nbytes -= item.nbytes
                budget -= 1
                self.depth -= 1
                self.counters.sent += 1
                self.last_seq = max(self.last_seq, item.seq)
            else:
                self._items.popleft()
                if isinstance(item, Gap):
                    self._took_gap(item)
            out.append(item)
        if not self._items and self._gap is not None and budget > 0:
            self._flush_gap()
            gap = self._items.popleft()
            assert isinstance(gap, Gap)
            self._took_gap(gap)
            out.append(gap)
        if not self._items and self._coalesce and self.depth == 0:
            self._release_coalesced()
        return out

    def _took_gap(self, gap: Gap) -> None:
        """A gap is on its way to the consumer: its events count as reported."""
        self.last_seq = max(self.last_seq, gap.last_seq)
        if gap.reason is GapReason.COALESCED:
            self.counters.reported_coalesced += gap.count
        else:
            self.counters.reported_dropped += gap.count

    def _release_coalesced(self) -> None:
        events = sorted(self._coalesce.values(), key=lambda e: e.seq)
        self._coalesce = {}
        self.nbytes -= sum(len(e.data) + _SINGLE_BYTES for e in events)
        if self._superseded:
            self.counters.coalesced += self._superseded
            self._items.append(
                Gap(self._superseded_first, self._superseded_last, self._superseded,
                    GapReason.COALESCED)
            )
            self._superseded = 0
        batch = EventBatch.from_events(events)
        self._items.append(_stamp(batch))
        self.depth += len(batch)
        self.nbytes += batch_bytes(batch)
        self.counters.queued += len(batch)
        self.wake()

    @property
    def pending(self) -> bool:
        """Whether anything waits to be taken."""
        return bool(self._items or self._singles or self._gap or self._coalesce)


def _wanted(flt: Filter, item: Item) -> bool:
    """Whether a (filtered) backlog item still goes to the stream."""
    if isinstance(item, Stamped):
        return len(item.batch) > 0
    if isinstance(item, Finding):
        return flt.passes_finding(item)
    return True


@dataclass(slots=True)
class VmHub:
    """The streams side of one VM: its history and its subscribers."""

    history: History
    subscribers: dict[int, Subscriber] = field(default_factory=dict)

    def subscribe(self, vm: Vm, sub: Subscriber, start_seq: int | None = None) -> int:
        """Register ``sub`` on ``vm``; with ``start_seq``, preload the backlog from the
        history first. Returns the notifier id. Raises Compacted if the backlog is gone."""
        backlog = self.history.since(start_seq, vm.seq) if start_seq is not None else []
        # The backlog passes the same filter as live events.
        for i, item in enumerate(backlog):
            if isinstance(item, Stamped):
                mask = sub.filter.mask(vm, item.batch)
                if mask is not None:
                    sub.counters.filtered += len(item.batch) - int(np.count_nonzero(mask))
                    backlog[i] = Stamped(item.batch.select(mask), item.ts_ns)
            elif isinstance(item, Finding) and not sub.filter.passes_finding(item):
                sub.counters.filtered += 1
        backlog = [b for b in backlog if _wanted(sub.filter, b)]
        node = vm.register_notifier(sub)
        sub.node = node
        sub.preload(backlog)
        self.subscribers[node.node_id] = sub
        return node.node_id

    def unsubscribe(self, vm: Vm, sub: Subscriber) -> None:
        """Unregister ``sub``; it gets nothing more, and its queue is dropped."""
        if sub.node is not None:
            vm.unregister_notifier(sub.node)
            self.subscribers.pop(sub.node.node_id, None)
            sub.node = None

