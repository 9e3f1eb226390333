"""Remote notifiers: per-VM event history and the subscribers behind Watch streams.

Each Watch stream is one :class:`Subscriber`, an external notifier on its VM that never
slows the vCPU; its queue and slow-consumer policies (drop, coalesce, disconnect, block)
are described in :mod:`pagetrackd.domain.subscriber`.

A per-VM :class:`History` keeps recent events so that a stream can resume from a seq.
The design follows etcd's watchable store: a revision (our seq), each subscriber's
position, bounded queues, and ``Compacted`` for history that is gone.

The parts live in modules of their own: ``stream_records`` (what queues and histories
hold), ``stream_filter``, ``history``, ``subscriber``; this module ties a VM's history and
subscribers together and names them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pagetrackd.domain.findings import Finding
from pagetrackd.domain.history import History, HistoryDump
from pagetrackd.domain.stream_filter import Filter, make_filter
from pagetrackd.domain.stream_records import (
    EVENT_BYTES,
    ITEM_BYTES,
    Gap,
    GapReason,
    Item,
    RegionRemoved,
    SlowPolicy,
    Stamped,
    batch_bytes,
)
from pagetrackd.domain.subscriber import StreamCounters, Subscriber

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm

__all__ = [
    "EVENT_BYTES", "ITEM_BYTES", "Filter", "Gap", "GapReason", "History", "HistoryDump", "Item",
    "RegionRemoved", "SlowPolicy", "Stamped", "StreamCounters", "Subscriber", "VmHub",
    "batch_bytes", "make_filter",
]


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
