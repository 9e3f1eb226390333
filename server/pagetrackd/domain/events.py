"""Track-write events, one at a time and columnar in batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.types import PAGE_SHIFT, Source

#: Bit of :attr:`EventBatch.flags`: the event's page was not write-tracked when it was
#: written. KVM's emulator notifies every piece of an emulated write, tracked or not
#: (arch/x86/kvm/x86.c emulator_write_phys -> kvm_page_track_write); notifiers decide
#: whether they care. The same bit as the API's EVENT_FLAG_UNTRACKED.
FLAG_UNTRACKED = 8


@dataclass(frozen=True, slots=True)
class WriteEvent:
    """One notified write: what KVM passes to ``track_write(gpa, new, bytes)``, plus
    the seq, the vCPU and the source. ``data`` is the new bytes, already in guest
    memory when the event is delivered; it never crosses a page boundary. ``untracked``:
    the page was not write-tracked (a piece of an emulated write that crossed into an
    untracked page)."""

    seq: int
    vcpu: int
    gpa: int
    data: bytes
    source: Source = Source.GUEST
    untracked: bool = False

    @property
    def gfn(self) -> int:
        """The written frame."""
        return self.gpa >> PAGE_SHIFT

    @property
    def length(self) -> int:
        """Number of bytes written."""
        return len(self.data)



# A fast constructor for the write path. A frozen dataclass's __init__ sets each field
# through object.__setattr__ (~600 ns for a WriteEvent); setting the slots through their
# descriptors builds the same object in about half the time. The field list is checked
# here so a change to the class fails loudly at import instead of leaving a field unset.
assert [f.name for f in fields(WriteEvent)] == [
    "seq", "vcpu", "gpa", "data", "source", "untracked"
]
_new = object.__new__
_ev_seq, _ev_vcpu, _ev_gpa, _ev_data, _ev_source, _ev_untracked = (
    WriteEvent.__dict__[f.name].__set__ for f in fields(WriteEvent)
)
_GUEST = Source.GUEST


def guest_event(
    seq: int, vcpu: int, gpa: int, data: bytes, untracked: bool = False
) -> WriteEvent:
    """``WriteEvent(seq, vcpu, gpa, data, untracked=untracked)`` (source GUEST), built
    faster."""
    e: WriteEvent = _new(WriteEvent)
    _ev_seq(e, seq)
    _ev_vcpu(e, vcpu)
    _ev_gpa(e, gpa)
    _ev_data(e, data)
    _ev_source(e, _GUEST)
    _ev_untracked(e, untracked)
    return e

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events in seq order, stored as columns: the i-th event is ``seq[i]``,
    ``gpa[i]``, ``length[i]`` bytes of ``data`` starting at ``sum(length[:i])``,
    ``vcpu[i]``, ``source[i]`` and ``flags[i]`` (:data:`FLAG_UNTRACKED`). Seqs need not
    be contiguous (filters drop some)."""

    seq: U64
    gpa: U64
    length: U32
    vcpu: U32
    source: U8
    data: bytes
    flags: U8

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def offsets(self) -> U64:
        """Start of each event's bytes in ``data``."""
        out = np.zeros(len(self), dtype=np.uint64)
        if len(self) > 1:
            np.cumsum(self.length[:-1], out=out[1:])
        return out

    def events(self) -> Iterator[WriteEvent]:
        """The batch as :class:`WriteEvent` objects, in order."""
        pos = 0
        data = self.data
        for seq, gpa, length, vcpu, source, flags in zip(
            self.seq.tolist(),
            self.gpa.tolist(),
            self.length.tolist(),
            self.vcpu.tolist(),
            self.source.tolist(),
            self.flags.tolist(),
            strict=True,
        ):
            yield WriteEvent(
                seq, vcpu, gpa, data[pos : pos + length], Source(source),
                bool(flags & FLAG_UNTRACKED),
            )
            pos += length

    def select(self, mask: npt.NDArray[np.bool_]) -> EventBatch:
        """The events where ``mask`` is true, in order. A run of neighbours is a
        :meth:`slice`; otherwise the data is gathered in one numpy pass, not per event."""
        keep = np.flatnonzero(mask)
        if keep.size == len(self):
            return self
        if keep.size == 0 or int(keep[-1]) - int(keep[0]) + 1 == keep.size:
            lo = int(keep[0]) if keep.size else 0
            return self.slice(lo, lo + keep.size)
        data = np.frombuffer(self.data, dtype=np.uint8)[np.repeat(mask, self.length)]
        return EventBatch(
            self.seq[keep], self.gpa[keep], self.length[keep], self.vcpu[keep],
            self.source[keep], data.tobytes(), self.flags[keep],
        )

    @classmethod
    def from_events(cls, events: Sequence[WriteEvent]) -> EventBatch:
        """Pack events into columns."""
        return cls(
            np.fromiter((e.seq for e in events), np.uint64, len(events)),
            np.fromiter((e.gpa for e in events), np.uint64, len(events)),
            np.fromiter((len(e.data) for e in events), np.uint32, len(events)),
            np.fromiter((e.vcpu for e in events), np.uint32, len(events)),
            np.fromiter((int(e.source) for e in events), np.uint8, len(events)),
            b"".join(e.data for e in events),
            np.fromiter(
                (FLAG_UNTRACKED if e.untracked else 0 for e in events), np.uint8, len(events)
            ),
        )

    @classmethod
    def concat(cls, batches: Sequence[EventBatch]) -> EventBatch:
        """The events of ``batches``, one after the other."""
        if not batches:
            return cls.empty()
        return cls(
            np.concatenate([b.seq for b in batches]),
            np.concatenate([b.gpa for b in batches]),
            np.concatenate([b.length for b in batches]),
            np.concatenate([b.vcpu for b in batches]),
            np.concatenate([b.source for b in batches]),
            b"".join(b.data for b in batches),
            np.concatenate([b.flags for b in batches]),
        )

    def slice(self, lo: int, hi: int) -> EventBatch:
        """Events ``lo`` to ``hi - 1``."""
        start = int(self.length[:lo].sum(dtype=np.int64))
        end = start + int(self.length[lo:hi].sum(dtype=np.int64))
        return EventBatch(
            self.seq[lo:hi], self.gpa[lo:hi], self.length[lo:hi], self.vcpu[lo:hi],
            self.source[lo:hi], self.data[start:end], self.flags[lo:hi],
        )

    @classmethod
    def empty(cls) -> EventBatch:
        """A batch with no events."""
        return cls.from_events(())
