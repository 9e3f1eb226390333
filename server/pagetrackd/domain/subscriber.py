"""One Watch stream's side of the hub: a :class:`Subscriber`.

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

"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pagetrackd.domain.errors import InvalidArgument
from pagetrackd.domain.events import EventBatch, WriteEvent
from pagetrackd.domain.findings import Finding
from pagetrackd.domain.stream_filter import Filter
from pagetrackd.domain.stream_records import (
    EVENT_BYTES,
    ITEM_BYTES,
    SINGLE_BYTES,
    Gap,
    GapReason,
    Item,
    SlowPolicy,
    Stamped,
    batch_bytes,
    region_record,
    stamp,
)
from pagetrackd.domain.types import PAGE_SHIFT

if TYPE_CHECKING:
    from pagetrackd.domain.notifiers import NotifierNode
    from pagetrackd.domain.vm import Vm


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
                len(e.data) + SINGLE_BYTES for e in self._singles
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
        self.nbytes += len(event.data) + SINGLE_BYTES
        old = self._coalesce.pop(event.gfn, None)
        if old is not None:
            self.nbytes -= len(old.data) + SINGLE_BYTES
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
        self.nbytes += len(event.data) + SINGLE_BYTES
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
        self._items.append(stamp(batch))
        self.depth += len(batch)
        self.nbytes += batch_bytes(batch)
        self.counters.queued += len(batch)
        self.wake()

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        """Queue a region record; it is never dropped (one per slot change)."""
        self._pack_singles()
        self._flush_gap()
        self._items.append(region_record(vm, base_gfn, npages))
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
        self.nbytes -= sum(len(e.data) + SINGLE_BYTES for e in events)
        if self._superseded:
            self.counters.coalesced += self._superseded
            self._items.append(
                Gap(self._superseded_first, self._superseded_last, self._superseded,
                    GapReason.COALESCED)
            )
            self._superseded = 0
        batch = EventBatch.from_events(events)
        self._items.append(stamp(batch))
        self.depth += len(batch)
        self.nbytes += batch_bytes(batch)
        self.counters.queued += len(batch)
        self.wake()

    @property
    def pending(self) -> bool:
        """Whether anything waits to be taken."""
        return bool(self._items or self._singles or self._gap or self._coalesce)
