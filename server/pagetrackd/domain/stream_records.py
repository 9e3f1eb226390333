"""What a Watch stream carries besides events, and what its queue and a VM's history
hold: event batches stamped with the time they reached the hub, gap records (exact seq
ranges and counts of events a stream will never get), region records, and what each
costs in bytes, which the queue and history bounds count."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagetrackd.domain.events import EventBatch
from pagetrackd.domain.findings import Finding
from pagetrackd.domain.types import RegionChange

if TYPE_CHECKING:
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


def region_record(vm: Vm, base_gfn: int, npages: int) -> RegionRemoved:
    return RegionRemoved(base_gfn, npages, vm.seq, vm.region_change)


@dataclass(frozen=True, slots=True)
class Stamped:
    """Events with the wall-clock time (ns) at which they reached the hub."""

    batch: EventBatch
    ts_ns: int


Item = Stamped | Gap | RegionRemoved | Finding


#: what holding one stored item costs beyond its event bytes: the batch object, its five
#: column arrays and the deque slot (a one-event batch takes some 760 bytes in all)
ITEM_BYTES = 720
#: what each event's columns take: seq, gpa (8 each), length, vcpu (4 each), source (1)
#: and a timestamp (4 on average, one per batch or per coalesced event)
EVENT_BYTES = 29


#: what a single event waiting to be packed into a batch (or coalesced) holds beyond its
#: data: the WriteEvent object and its fields
SINGLE_BYTES = 200


def batch_bytes(batch: EventBatch) -> int:
    """Bytes a stored batch holds: its data, its columns and its objects."""
    return len(batch.data) + EVENT_BYTES * len(batch) + ITEM_BYTES


def record_bytes(item: Gap | RegionRemoved | Finding) -> int:
    """Bytes a stored record holds."""
    return item.nbytes if isinstance(item, Finding) else ITEM_BYTES


def stamp(batch: EventBatch) -> Stamped:
    return Stamped(batch, time.time_ns())

