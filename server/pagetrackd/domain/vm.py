"""A simulated VM: memslots, guest memory, the track pool, the write path and notifiers.

Every method either completes or raises a :class:`PageTrackError` having changed
nothing. The rules follow KVM x86; rule ids like R4.4 below are those of
docs/kvm-rules.md, which names the kernel source of each.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.cost import CostModel
from pagetrackd.domain.errors import (
    CounterOverflow,
    DmaRejected,
    FailedPrecondition,
    GfnNotInSlot,
    InvalidArgument,
    MoveRefused,
    NotTracked,
    SlotNotFound,
    SlotOverlap,
)
from pagetrackd.domain.events import FLAG_UNTRACKED, EventBatch, WriteEvent
from pagetrackd.domain.memslots import MemslotTable, Slot
from pagetrackd.domain.notifiers import ClosingNotifier, Notifier, NotifierList, NotifierNode
from pagetrackd.domain.track import COUNTER_MAX
from pagetrackd.domain.types import (
    NO_VCPU,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    TENANT_OWNER,
    CmpxchgResult,
    DmaPolicy,
    Memslot,
    RegionChange,
    Semantics,
    SlotChange,
    SlotFlags,
    Source,
    TrackInfo,
    VmLimits,
    WritePath,
    WritePiece,
    WriteResult,
)
from pagetrackd.limits import DEFAULT_VCPUS, MAX_VCPUS

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

_OWNER_RE = re.compile(r"^[a-z][a-z0-9_.:/-]{0,127}$")
#: gfns one tracking call may name, counting every gfn of every range
MAX_GFNS_PER_CALL = 1 << 25
#: writes one batch may hold
MAX_BATCH_WRITES = 1 << 20
# Enum members as module constants: a class attribute lookup on an Enum costs ~70 ns.
_FAST = WritePath.FAST
_EMULATED = WritePath.EMULATED
_MMIO_EXIT = WritePath.MMIO_EXIT
_GUEST = Source.GUEST

# Fast constructors for the frozen value objects of the single-write path. A frozen
# dataclass's __init__ sets each field through object.__setattr__ (~600 ns for a
# WriteEvent); setting the slots through their descriptors builds the same object in
# about half the time. The field lists are checked here so a change to a class fails
# loudly at import instead of leaving a field unset.
_new = object.__new__
assert [f.name for f in fields(WriteEvent)] == [
    "seq", "vcpu", "gpa", "data", "source", "untracked"
]
assert [f.name for f in fields(WritePiece)] == ["gpa", "length", "path", "seq"]
assert [f.name for f in fields(WriteResult)] == ["pieces"]
_ev_seq, _ev_vcpu, _ev_gpa, _ev_data, _ev_source, _ev_untracked = (
    WriteEvent.__dict__[f.name].__set__ for f in fields(WriteEvent)
)
_wp_gpa, _wp_length, _wp_path, _wp_seq = (
    WritePiece.__dict__[f.name].__set__ for f in fields(WritePiece)
)
_wr_pieces = WriteResult.__dict__["pieces"].__set__


def _guest_event(
    seq: int, vcpu: int, gpa: int, data: bytes, untracked: bool = False
) -> WriteEvent:
    """``WriteEvent(seq, vcpu, gpa, data, untracked=untracked)``, built faster."""
    e: WriteEvent = _new(WriteEvent)
    _ev_seq(e, seq)
    _ev_vcpu(e, vcpu)
    _ev_gpa(e, gpa)
    _ev_data(e, data)
    _ev_source(e, _GUEST)
    _ev_untracked(e, untracked)
    return e


def _piece(gpa: int, length: int, path: WritePath, seq: int | None = None) -> WritePiece:
    """``WritePiece(gpa, length, path, seq)``, built faster."""
    p: WritePiece = _new(WritePiece)
    _wp_gpa(p, gpa)
    _wp_length(p, length)
    _wp_path(p, path)
    _wp_seq(p, seq)
    return p


def _result(pieces: tuple[WritePiece, ...]) -> WriteResult:
    """``WriteResult(pieces)``, built faster."""
    r: WriteResult = _new(WriteResult)
    _wr_pieces(r, pieces)
    return r


@dataclass(slots=True)
class VmStats:
    """Counters of one VM since it was created."""

    writes: int = 0  #: guest write calls (a batch counts each write)
    pieces: list[int] = field(default_factory=lambda: [0, 0, 0])  #: by WritePath
    bytes_written: int = 0  #: bytes that reached guest memory from the guest
    dma_writes: int = 0  #: DMA calls that wrote
    dma_applied: int = 0  #: DMA pieces written to untracked RAM
    dma_bypassed: int = 0  #: DMA pieces written to tracked gfns, nobody told (bypass)
    dma_notified: int = 0  #: DMA pieces written to tracked gfns and notified (notify)
    dma_rejected: int = 0  #: DMA calls refused by the reject policy
    notifications: int = 0  #: notifier calls, one per event per notifier
    notifier_errors: int = 0
    cycles: list[int] = field(default_factory=lambda: [0, 0, 0])  #: by WritePath
    dma_cycles: int = 0
    vcpu_cycles: dict[int, int] = field(default_factory=dict)

    @property
    def mmio_exits(self) -> int:
        """Pieces that exited to user space (not applied)."""
        return self.pieces[WritePath.MMIO_EXIT]

    @property
    def emulations(self) -> int:
        """Pieces that were trapped, emulated and notified."""
        return self.pieces[WritePath.EMULATED]

    @property
    def fast_writes(self) -> int:
        """Pieces applied natively."""
        return self.pieces[WritePath.FAST]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of a batched write, per piece (pieces are page-sized parts of writes,
    in write order): the write each came from, its gpa, length, path and seq (0 if none)."""

    write_index: I64
    gpa: I64
    length: I64
    path: npt.NDArray[np.int8]
    seq: I64
    #: pieces per WritePath value (MMIO_EXIT, FAST, EMULATED)
    counts: tuple[int, int, int] = (0, 0, 0)
    #: seq of the first and of the last event of the batch, 0 if none
    first_seq: int = 0
    last_seq: int = 0

    def count(self, path: WritePath) -> int:
        """Pieces that took ``path``."""
        return self.counts[path]


class _HeldEvents:
    """The events of a batched write that the batch nodes (streams) have not been given
    yet: given to them when the batch ends, or earlier, as ``NotifierList.flush``,
    before anything that must come after them in seq order reaches them or the
    registrations change (a per-event notifier's callback may do either)."""

    def __init__(
        self, vm: Vm, pgpa: I64, plen: I64, poff: I64, pvcpu: I64, pflags: U8, data: bytes
    ) -> None:
        self.vm = vm
        self.columns = (pgpa, plen, poff, pvcpu, pflags)
        self.data = data
        #: seq of each emulated piece, in order (a notifier's DMA with
        #: dma_policy=notify may take seqs in between), and its piece index
        self.seqs: list[int] = []
        self.pieces: list[int] = []
        self.sent = 0  # events handed to the batch nodes (or to none) so far
        self.outer: Callable[[], None] | None = None

    def flush(self) -> None:
        """Give the batch nodes the events held so far."""
        if self.sent == len(self.seqs):
            return
        seqs, js = self.seqs[self.sent :], np.array(self.pieces[self.sent :], dtype=np.int64)
        self.sent = len(self.seqs)
        vm = self.vm
        if vm.notifiers.batch:
            pgpa, plen, poff, pvcpu, pflags = self.columns
            batch = EventBatch(
                np.array(seqs, dtype=np.uint64),
                pgpa[js].astype(np.uint64),
                plen[js].astype(np.uint32),
                pvcpu[js].astype(np.uint32),
                np.zeros(js.size, dtype=np.uint8),
                _gather(self.data, poff[js], plen[js]),
                pflags[js],
            )
            told = vm.notifiers.dispatch_batch(vm, batch)
            vm.stats.notifications += told

    def __enter__(self) -> _HeldEvents:
        notifiers = self.vm.notifiers
        self.outer = notifiers.flush
        if self.outer is not None:
            self.outer()  # a batch written from a callback: the outer batch's events first
        notifiers.flush = self.flush
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        notifiers = self.vm.notifiers
        try:
            if exc_type is None:
                self.flush()
        finally:
            notifiers.flush = self.outer
            self.vm.stats.notifier_errors = notifiers.errors


def _gather(data: bytes, start: I64, length: I64) -> bytes:
    """The bytes ``data[start[k] : start[k] + length[k]]`` for every k, concatenated."""
    ends = np.cumsum(length)
    first = int(start[0])
    if np.array_equal(start[1:] - first, ends[:-1]):
        # The pieces are back to back: the whole buffer (every piece emulated) or a run.
        total = int(ends[-1])
        return bytes(data) if first == 0 and total == len(data) else bytes(
            data[first : first + total]
        )
    src = np.arange(int(ends[-1]), dtype=np.int64) + np.repeat(start - (ends - length), length)
    out: bytes = np.frombuffer(data, dtype=np.uint8)[src].tobytes()
    return out


def gfns_from(ranges: Iterable[tuple[int, int]] = (), gfns: Iterable[int] = ()) -> I64:
    """One array of gfns from ``(start, count)`` ranges and a list, in the given order.

    Raises InvalidArgument for negative values or more than MAX_GFNS_PER_CALL gfns.
    """
    parts: list[I64] = []
    total = 0
    for start, count in ranges:
        if start < 0 or count <= 0:
            raise InvalidArgument(
                f"gfn range start={start} count={count}: start must be >= 0 and count > 0",
                field="ranges",
            )
        total += count
        if total > MAX_GFNS_PER_CALL:
            raise InvalidArgument(f"a call may name at most {MAX_GFNS_PER_CALL} gfns")
        parts.append(np.arange(start, start + count, dtype=np.int64))
    listed = np.fromiter(gfns, dtype=np.int64) if not isinstance(gfns, np.ndarray) else gfns
    if listed.size:
        if (listed < 0).any():
            raise InvalidArgument("gfns must be >= 0")
        total += listed.size
        if total > MAX_GFNS_PER_CALL:
            raise InvalidArgument(f"a call may name at most {MAX_GFNS_PER_CALL} gfns")
        parts.append(listed.astype(np.int64, copy=False))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class Vm:
    """One simulated VM. Not thread-safe: the daemon drives it from one event loop."""

    def __init__(
        self,
        name: str,
        *,
        vcpus: int = DEFAULT_VCPUS,
        dma_policy: DmaPolicy = DmaPolicy.BYPASS,
        semantics: Semantics = Semantics.V2016,
        cost: CostModel | None = None,
        limits: VmLimits | None = None,
    ) -> None:
        if not 1 <= vcpus <= MAX_VCPUS:
            raise InvalidArgument(f"vcpus must be between 1 and {MAX_VCPUS}, got {vcpus}")
        self.name = name
        self.vcpus = vcpus
        self.dma_policy = dma_policy
        self.semantics = semantics
        self.cost = cost or CostModel()
        self.limits = limits or VmLimits()
        self.slots = MemslotTable()
        self.notifiers = NotifierList()
        self.stats = VmStats()
        #: seq of the last event; the next event gets seq + 1 (gap-free, R-stream)
        self.seq = 0
        self._generation = 0
        #: called (with the VM) whenever :attr:`generation` moves and on every call that
        #: may write guest memory: the daemon keeps per-tenant totals (memslot pages,
        #: tracked gfns, bytes held) without scanning its VMs
        self.on_change: Callable[[Vm], None] | None = None
        self.closed = False
        #: set only while notifiers hear of a removed region: which slot and change
        self.region_change: RegionChange | None = None
        #: called with the gfns whose counter just went 0 -> 1, inside track_add: the
        #: shadow MMU write-protects every SPTE mapping them, as KVM's add does by a
        #: direct call (R3.1, arch/x86/kvm/mmu/page_track.c __kvm_write_track_add_gfn ->
        #: kvm_mmu_slot_gfn_write_protect)
        self.track_start_hooks: list[Callable[[list[int]], None]] = []

    # ------------------------------------------------------------------ memslots

    def set_memslot(
        self, slot_id: int, base_gfn: int, npages: int, flags: SlotFlags = SlotFlags.NONE
    ) -> SlotChange:
        """``KVM_SET_USER_MEMORY_REGION``: create, move, change flags of or delete
        (``npages == 0``) a slot. Returns what it did; NONE if nothing changed."""
        lim = self.limits
        if not 0 <= slot_id < lim.max_slots:
            raise InvalidArgument(
                f"slot id {slot_id} out of range: must be 0..{lim.max_slots - 1}"
            )
        try:
            flags = SlotFlags(flags)
        except ValueError:
            raise InvalidArgument(
                f"unknown memslot flags {flags:#x}: only READONLY and LOG_DIRTY_PAGES exist"
            ) from None
        # int(): ~ on an IntFlag only spans the known bits, so it would let 4 through.
        if int(flags) & ~int(SlotFlags.READONLY | SlotFlags.LOG_DIRTY_PAGES):
            raise InvalidArgument(
                f"unknown memslot flags {int(flags):#x}: only READONLY and LOG_DIRTY_PAGES exist"
            )
        if npages < 0:
            raise InvalidArgument(f"npages must be >= 0, got {npages}")
        old = self.slots.by_id.get(slot_id)
        if npages == 0:
            if old is None:
                raise SlotNotFound(
                    f"slot {slot_id} does not exist; nothing to delete", name=str(slot_id)
                )
            self._delete_slot(old)
            return SlotChange.DELETE
        if not 0 <= base_gfn or base_gfn + npages > lim.gfn_limit:
            raise InvalidArgument(
                f"gfn range {base_gfn:#x}+{npages:#x} exceeds the {lim.gfn_bits}-bit gfn space"
                f" (last gfn {lim.gfn_limit - 1:#x})",
                field="base_gfn",
            )
        if old is not None:
            if npages != old.info.npages:
                raise InvalidArgument(
                    f"slot {slot_id} has {old.info.npages} pages; a live slot cannot change"
                    " size (delete it first)"
                )
            if (flags ^ old.info.flags) & SlotFlags.READONLY:
                raise InvalidArgument(
                    f"slot {slot_id}: READONLY cannot be toggled on a live slot (as in KVM)"
                )
        clash = self.slots.overlapping(base_gfn, npages, slot_id)
        if clash is not None:
            c = clash.info
            raise SlotOverlap(
                f"gfns {base_gfn:#x}..{base_gfn + npages - 1:#x} overlap slot {c.slot_id}"
                f" ({c.base_gfn:#x}..{c.end_gfn - 1:#x})"
            )
        new = Memslot(slot_id, base_gfn, npages, flags)
        if old is None:
            self.slots.by_id[slot_id] = Slot(new)
            self.slots.reindex()
            self.generation += 1
            return SlotChange.CREATE
        if base_gfn != old.info.base_gfn:
            self._move_slot(old, new)
            return SlotChange.MOVE
        if flags == old.info.flags:
            return SlotChange.NONE
        # FLAGS_ONLY keeps the counters (the arch data is shared, R6.2).
        old.info = new
        if flags & SlotFlags.LOG_DIRTY_PAGES:
            if old.dirty is None:
                old.dirty = set()
        else:
            old.dirty = None
        self.generation += 1
        return SlotChange.FLAGS_ONLY

    def _region_gone(
        self, slot: Memslot, change: SlotChange, new_base_gfn: int = 0,
        internal_only: bool = False,
    ) -> None:
        """Tell notifiers that ``slot``'s range is gone. While they are told,
        ``region_change`` says which slot, what change and (MOVE) the new base."""
        self.region_change = RegionChange(slot.slot_id, change, new_base_gfn)
        try:
            self.notifiers.dispatch_remove_region(
                self, slot.base_gfn, slot.npages, internal_only=internal_only
            )
        finally:
            self.region_change = None

    def _delete_slot(self, slot: Slot) -> None:
        info = slot.info
        if self.semantics is Semantics.V2016:
            # track_flush_slot ran before the memslot update was committed (R5.5).
            self._region_gone(info, SlotChange.DELETE)
            del self.slots.by_id[info.slot_id]
            self.slots.reindex()
        else:
            # track_remove_region runs once the deletion is certain (R5.6).
            del self.slots.by_id[info.slot_id]
            self.slots.reindex()
            self._region_gone(info, SlotChange.DELETE)
        self.stats.notifier_errors = self.notifiers.errors
        self.generation += 1

    def _move_slot(self, slot: Slot, new: Memslot) -> None:
        old = slot.info
        if self.semantics is Semantics.LINUX_6_6:
            if self.notifiers.has_external:
                raise MoveRefused(
                    f"slot {old.slot_id} cannot move while an external notifier is registered"
                    " (linux-6.6 semantics; KVM returns -EINVAL)"
                )
            # The moved slot gets fresh, zeroed counters (R6.3); the shadow MMU is told
            # because KVM zaps the slot's shadow pages.
            self._region_gone(old, SlotChange.MOVE, new.base_gfn, internal_only=True)
            memory = slot.memory
            moved = Slot(new, memory)
            # As KVM: keep the old dirty bitmap if there is one, else start a new one
            # when the move also turns dirty logging on (Slot() made it already).
            if new.flags & SlotFlags.LOG_DIRTY_PAGES and slot.dirty is not None:
                moved.dirty = slot.dirty
            self.slots.by_id[old.slot_id] = moved
        else:
            # 2016: notifiers hear that the old range is gone; counters move with the
            # slot (the seed series' v2 fix).
            self._region_gone(old, SlotChange.MOVE, new.base_gfn)
            slot = self.slots.by_id[old.slot_id]
            # KVMGT's flush_slot removed its own tracking of the range; plugins forget
            # theirs in track_remove_region, so their references are dropped here. The
            # tenant's and leases' references stay with the moved slot.
            for owner in [o for o in slot.tracking.owners if o.startswith("plugin:")]:
                idx, cnt = slot.tracking.owner_arrays(owner)
                slot.tracking.apply(idx, -cnt, owner)
            slot.info = new
            slot.tracking.rebase(new.base_gfn)
            if new.flags & SlotFlags.LOG_DIRTY_PAGES:
                if slot.dirty is None:
                    slot.dirty = set()
            else:
                slot.dirty = None
        self.slots.reindex()
        self.stats.notifier_errors = self.notifiers.errors
        self.generation += 1

    def memslots(self) -> list[Memslot]:
        """Live memslots in gfn order."""
        return [s.info for s in self.slots.slots()]

    def get_dirty_log(self, slot_id: int) -> bytes:
        """``KVM_GET_DIRTY_LOG``: the slot's dirty bitmap (bit i = page i, little-endian
        bit order, padded to 64-bit words), then cleared."""
        slot = self.slots.by_id.get(slot_id)
        if slot is None:
            raise SlotNotFound(f"slot {slot_id} does not exist", name=str(slot_id))
        if slot.dirty is None:
            raise FailedPrecondition(
                f"slot {slot_id} does not have LOG_DIRTY_PAGES set; enable it first"
            )
        words = (slot.info.npages + 63) // 64
        bits = np.zeros(words * 64, dtype=np.uint8)
        if slot.dirty:
            bits[np.fromiter(slot.dirty, np.int64, len(slot.dirty))] = 1
        slot.dirty = set()
        return np.packbits(bits, bitorder="little").tobytes()

    @property
    def generation(self) -> int:
        """Bumped whenever tracking or memslots change, so a batch in progress knows its
        classification is stale."""
        return self._generation

    @generation.setter
    def generation(self, value: int) -> None:
        self._generation = value
        if self.on_change is not None:
            self.on_change(self)

    # ------------------------------------------------------------------ tracking

    def _check_owner(self, owner: str) -> None:
        if not _OWNER_RE.match(owner):
            raise InvalidArgument(
                f"owner {owner!r} is not valid: 1-128 chars, lowercase letters, digits and _.:/-"
                ", starting with a letter"
            )

    def _group(self, gfns: I64) -> list[tuple[Slot, I64, I64 | int]]:
        """Split gfns by slot: (slot, distinct ascending page indexes, occurrences of
        each, or 1 when every gfn is listed once)."""
        if gfns.size == 0:
            return []
        if int(gfns.min()) < 0:
            raise InvalidArgument("gfns must be >= 0")
        slot = self.slots.find(int(gfns[0]))
        if (
            slot is not None
            and int(gfns[-1]) < slot.info.end_gfn
            and (gfns.size == 1 or bool((gfns[1:] > gfns[:-1]).all()))
        ):
            # Ascending and distinct within one slot (a range, or a sorted list): no
            # sort, no per-gfn counts, however many gfns.
            return [(slot, gfns - slot.base_gfn if slot.base_gfn else gfns, 1)]
        pos = self.slots.find_many(gfns)
        outside = np.flatnonzero(pos < 0)
        if outside.size:
            g = int(gfns[outside[0]])
            raise GfnNotInSlot(
                f"gfn {g:#x} is not in any memslot ({outside.size} of the gfns are outside)"
            )
        slots = self.slots.slots()
        out: list[tuple[Slot, I64, I64 | int]] = []
        for p in np.unique(pos).tolist():
            slot = slots[p]
            idx, counts = np.unique(gfns[pos == p] - slot.base_gfn, return_counts=True)
            out.append((slot, idx, counts.astype(np.int64)))
        return out

    def _single_gfn(self, gfns: I64 | Sequence[int]) -> tuple[Slot, int] | None:
        """For a list of exactly one int gfn: its slot and page index, checked as
        :meth:`_group` checks (same errors); None for anything else (the array path)."""
        if type(gfns) is not list or len(gfns) != 1 or type(gfns[0]) is not int:
            return None
        gfn = gfns[0]
        if gfn < 0:
            raise InvalidArgument("gfns must be >= 0")
        slot = self.slots.find(gfn)
        if slot is None:
            raise GfnNotInSlot(
                f"gfn {gfn:#x} is not in any memslot (1 of the gfns are outside)"
            )
        return slot, gfn - slot.base_gfn

    def track_add(self, gfns: I64 | Sequence[int], owner: str = TENANT_OWNER) -> int:
        """Add one reference per listed gfn (a gfn listed twice gets two), all or none.

        Returns how many gfns became tracked (0 -> 1). The first reference
        write-protects the gfn and disallows 2M/1G mappings over it (R3.1).
        Raises GfnNotInSlot (KVM: -EINVAL, R2.3) or CounterOverflow (KVM WARNs and
        skips, R1.3; we refuse and change nothing).
        """
        self._check_owner(owner)
        one = self._single_gfn(gfns)
        if one is not None:
            tracking, i1 = one[0].tracking, one[1]
            if tracking.counters.get1(i1) + 1 > COUNTER_MAX:
                raise CounterOverflow(
                    f"gfn {one[0].base_gfn + i1:#x}: track counter would pass {COUNTER_MAX}"
                    " (KVM would WARN and skip; pagetrack refuses)"
                )
            started1, _ = tracking.apply1(i1, 1, owner)
            self.generation += 1
            if started1 and self.track_start_hooks:
                self._tracking_started([one[0].base_gfn + i1])
            return int(started1)
        arr = np.asarray(gfns, dtype=np.int64)
        groups = self._group(arr)
        for slot, idx, cnt in groups:
            counts = slot.tracking.counts(idx)
            top = int(counts.max()) + (cnt if isinstance(cnt, int) else int(cnt.max()))
            if top <= COUNTER_MAX:
                continue
            over = np.flatnonzero(counts.astype(np.int64) + cnt > COUNTER_MAX)
            if over.size:
                g = slot.base_gfn + int(idx[over[0]])
                raise CounterOverflow(
                    f"gfn {g:#x}: track counter would pass {COUNTER_MAX}"
                    " (KVM would WARN and skip; pagetrack refuses)"
                )
        started = 0
        new: list[int] = []
        for slot, idx, cnt in groups:
            s, _ = slot.tracking.apply(idx, cnt, owner)
            started += int(s.size)
            if s.size and self.track_start_hooks:
                new += (s + slot.base_gfn).tolist()
        if groups:
            self.generation += 1
        if new:
            self._tracking_started(new)
        return started

    def _tracking_started(self, gfns: list[int]) -> None:
        for hook in list(self.track_start_hooks):
            hook(gfns)

    def track_remove(self, gfns: I64 | Sequence[int], owner: str = TENANT_OWNER) -> int:
        """Drop one of ``owner``'s references per listed gfn, all or none.

        Returns how many gfns became untracked (1 -> 0). Write access then comes back
        lazily and large pages are allowed again (R3.2). Raises NotTracked when the
        owner holds fewer references than asked (KVM WARNs on 0 and ignores, R2.4).
        """
        self._check_owner(owner)
        one = self._single_gfn(gfns)
        if one is not None:
            tracking, i1 = one[0].tracking, one[1]
            held1 = tracking.held1(i1, owner)
            if held1 < 1:
                raise NotTracked(
                    f"gfn {one[0].base_gfn + i1:#x}: owner {owner!r} holds {held1}"
                    " reference(s), cannot remove 1"
                )
            _, stopped1 = tracking.apply1(i1, -1, owner)
            self.generation += 1
            return int(stopped1)
        arr = np.asarray(gfns, dtype=np.int64)
        groups = self._group(arr)
        for slot, idx, cnt in groups:
            held = slot.tracking.held(idx, owner)
            short = np.flatnonzero(held < cnt)
            if short.size:
                i = int(short[0])
                g = slot.base_gfn + int(idx[i])
                want = cnt if isinstance(cnt, int) else int(cnt[i])
                raise NotTracked(
                    f"gfn {g:#x}: owner {owner!r} holds {int(held[i])} reference(s),"
                    f" cannot remove {want}"
                )
        stopped = 0
        for slot, idx, cnt in groups:
            _, s = slot.tracking.apply(idx, -cnt, owner)
            stopped += int(s.size)
        if groups:
            self.generation += 1
        return stopped

    def release_owner(self, owner: str) -> int:
        """Drop every reference ``owner`` holds (a lease ended). Returns gfns untracked."""
        if owner == TENANT_OWNER:
            raise InvalidArgument("the tenant's references are not released as a whole")
        stopped = 0
        for slot in self.slots.slots():
            if owner not in slot.tracking.owners:
                continue
            idx, cnt = slot.tracking.owner_arrays(owner)
            if not idx.size:
                continue
            _, s = slot.tracking.apply(idx, -cnt, owner)
            stopped += int(s.size)
            self.generation += 1
        return stopped

    def is_tracked(self, gfn: int) -> bool:
        """``kvm_gfn_is_write_tracked``: false outside memslots (R1.5)."""
        slot = self.slots.find(gfn)
        return slot is not None and slot.tracking.counters.get1(gfn - slot.base_gfn) > 0

    def track_query(self, gfns: Iterable[int]) -> list[TrackInfo]:
        """What the track pool knows of each gfn (a gfn outside memslots: all zero)."""
        out = []
        for gfn in gfns:
            slot = self.slots.find(gfn)
            if slot is None:
                out.append(TrackInfo(gfn, 0))
                continue
            t = slot.tracking
            i = gfn - slot.base_gfn
            count = t.counters.get1(i)
            lpage_2m, lpage_1g = t.lpage_disallowed(gfn)
            out.append(
                TrackInfo(
                    gfn,
                    count,
                    t.owners_of(i) if count else {},
                    write_protected=count > 0,
                    lpage_disallowed_2m=lpage_2m,
                    lpage_disallowed_1g=lpage_1g,
                )
            )
        return out

    def tracked_gfns(self, owner: str | None = None) -> I64:
        """Every tracked gfn ascending, or those ``owner`` holds a reference on."""
        parts = []
        for slot in self.slots.slots():
            t = slot.tracking
            if owner is None:
                idx = t.counters.nonzero_indices()
            elif owner == TENANT_OWNER:
                idx = t.counters.nonzero_indices()
                idx = idx[t.held(idx, owner) > 0]
            else:
                idx = t.owner_arrays(owner)[0]
            parts.append(idx + slot.base_gfn)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def owner_references(self, owner: str) -> int:
        """Tracking references a non-tenant owner (a lease or a plugin) holds in this VM."""
        return sum(
            refs.total()
            for s in self.slots.slots()
            if (refs := s.tracking.owners.get(owner)) is not None
        )

    @property
    def tracked_count(self) -> int:
        """Number of gfns whose counter is > 0."""
        return sum(s.tracking.counters.nonzero for s in self.slots.slots())

    # ------------------------------------------------------------------ notifiers

    def register_notifier(self, notifier: Notifier) -> NotifierNode:
        """``kvm_page_track_register_notifier``: insert at the head (called first)."""
        return self.notifiers.register(notifier)

    def unregister_notifier(self, node: NotifierNode) -> bool:
        """Unregister; after it returns the notifier is never called again (R5.2)."""
        return self.notifiers.unregister(node)

    # ------------------------------------------------------------------ guest access

    def _check_access(self, gpa: int, n: int) -> None:
        lim = self.limits
        if n <= 0:
            raise InvalidArgument("a write needs at least one byte of data", field="data")
        if n > lim.max_write_bytes:
            raise InvalidArgument(
                f"{n} bytes in one access; at most {lim.max_write_bytes} are allowed"
            )
        if gpa < 0 or gpa + n > lim.gfn_limit << PAGE_SHIFT:
            raise InvalidArgument(
                f"gpa {gpa:#x}+{n} is outside the {lim.gfn_bits + PAGE_SHIFT}-bit guest"
                " physical address space"
            )

    def _check_vcpu(self, vcpu: int) -> None:
        if not 0 <= vcpu < self.vcpus:
            raise InvalidArgument(
                f"vcpu {vcpu} does not exist: this VM has vcpus 0..{self.vcpus - 1}"
            )

    def write(self, vcpu: int, gpa: int, data: bytes) -> WriteResult:
        """One guest write: split at page boundaries (R4.3); each piece exits as MMIO,
        lands natively, or is emulated: applied first, then notified (R4.4)."""
        if self.on_change is not None:
            self.on_change(self)
        # The checks inline; the _check_* methods run (and raise) only when one fails.
        if not 0 <= vcpu < self.vcpus:
            self._check_vcpu(vcpu)
        n = len(data)
        lim = self.limits
        if not (
            0 < n <= lim.max_write_bytes
            and 0 <= gpa
            and gpa + n <= 1 << (lim.gfn_bits + PAGE_SHIFT)
        ):
            self._check_access(gpa, n)
        stats = self.stats
        stats.writes += 1
        if (gpa & PAGE_MASK) + n <= PAGE_SIZE:
            return _result((self._write_piece(vcpu, gpa, data),))
        view = memoryview(data)
        spans = []
        trapped = False
        off = 0
        while off < n:
            g = gpa + off
            plen = min(PAGE_SIZE - (g & PAGE_MASK), n - off)
            spans.append((g, off, plen))
            if not trapped:
                slot = self.slots.find(g >> PAGE_SHIFT)
                trapped = (
                    slot is None
                    or slot.readonly
                    or slot.tracking.counters.get1((g >> PAGE_SHIFT) - slot.base_gfn) > 0
                )
            off += plen
        # A write that faults on any of its pages (tracked, or not writable RAM) is
        # emulated whole: the emulator writes each one-page piece and notifies every piece
        # that reached RAM, tracked or not (R4.3, R4.6: arch/x86/kvm/x86.c
        # emulator_read_write_onepage -> emulator_write_phys -> kvm_page_track_write).
        return WriteResult(
            tuple(self._write_piece(vcpu, g, view[o : o + ln], trapped) for g, o, ln in spans)
        )

    def cmpxchg(self, vcpu: int, gpa: int, expected: bytes, desired: bytes) -> CmpxchgResult:
        """An emulated guest ``LOCK CMPXCHG`` of ``len(desired)`` bytes, as KVM's
        ``emulator_cmpxchg_emulated`` (arch/x86/kvm/x86.c) does it (R4.5).

        1, 2, 4 or 8 bytes inside one page of writable RAM are exchanged atomically. On
        an untracked page the instruction runs natively (FAST, no event). On a tracked
        page it exits and is emulated: if memory holds ``expected``, ``desired`` is stored
        and notified like any emulated write (R4.4); if not, nothing is stored and no
        notifier is told (X86EMUL_CMPXCHG_FAILED), and the guest gets the current value.
        The page is marked dirty either way (a failed LOCK CMPXCHG writes the old value
        back). Any other size, an access that crosses a page, or a target that is not
        writable RAM is emulated as a plain write of ``desired`` ("emulating exchange as
        write"): see :meth:`write`.
        """
        if self.on_change is not None:
            self.on_change(self)
        if len(expected) != len(desired):
            raise InvalidArgument(
                f"expected has {len(expected)} bytes and desired {len(desired)}: a compare-"
                "exchange compares and stores the same number of bytes"
            )
        n = len(desired)
        if n == 0:
            raise InvalidArgument("a write needs at least one byte of data", field="desired")
        if not 0 <= vcpu < self.vcpus:
            self._check_vcpu(vcpu)
        self._check_access(gpa, n)
        gfn = gpa >> PAGE_SHIFT
        slot = self.slots.find(gfn)
        if (
            n not in (1, 2, 4, 8)
            or (gpa & PAGE_MASK) + n > PAGE_SIZE
            or slot is None
            or slot.readonly
        ):
            return CmpxchgResult(True, b"", True, self.write(vcpu, gpa, desired))
        self.stats.writes += 1
        index = gfn - slot.info.base_gfn
        current = slot.memory.read(index, gpa & PAGE_MASK, n)
        if slot.dirty is not None:
            slot.dirty.add(index)
        exchanged = current == expected
        tracked = slot.tracking.counters.get1(index) > 0
        if not tracked:
            self._charge(vcpu, _FAST, self.cost.fast_cycles)
            if exchanged:
                slot.memory.write(index, gpa & PAGE_MASK, desired)
                self.stats.bytes_written += n
            return CmpxchgResult(exchanged, current, False, _result((_piece(gpa, n, _FAST),)))
        self._charge(vcpu, _EMULATED, self.cost.emulate_cycles)
        if not exchanged:
            return CmpxchgResult(
                False, current, False, _result((_piece(gpa, n, _EMULATED),))
            )
        slot.memory.write(index, gpa & PAGE_MASK, desired)
        self.stats.bytes_written += n
        self.seq = seq = self.seq + 1
        notifiers = self.notifiers
        if notifiers.sync or notifiers.batch:
            told = notifiers.dispatch_write(self, _guest_event(seq, vcpu, gpa, bytes(desired)))
            self.stats.notifications += told
            self.stats.notifier_errors = notifiers.errors
        return CmpxchgResult(True, current, False, _result((_piece(gpa, n, _EMULATED, seq),)))

    def _charge(self, vcpu: int, path: WritePath, cycles: int) -> None:
        stats = self.stats
        stats.pieces[path] += 1
        if cycles:
            stats.cycles[path] += cycles
            stats.vcpu_cycles[vcpu] = stats.vcpu_cycles.get(vcpu, 0) + cycles

    def _write_piece(
        self, vcpu: int, gpa: int, data: bytes | memoryview, trapped: bool = False
    ) -> WritePiece:
        """One page's piece of a guest write. ``trapped``: the write is being emulated
        (another of its pieces faulted), so this piece is emulated and notified even if
        its page is not tracked; its event is then flagged ``untracked``."""
        gfn = gpa >> PAGE_SHIFT
        slot = self.slots.find(gfn)
        n = len(data)
        if slot is None or slot.readonly:
            self._charge(vcpu, WritePath.MMIO_EXIT, self.cost.mmio_exit_cycles)
            return WritePiece(gpa, n, WritePath.MMIO_EXIT)
        index = gfn - slot.info.base_gfn
        slot.memory.write(index, gpa & PAGE_MASK, data)
        stats = self.stats
        stats.bytes_written += n
        if slot.dirty is not None:
            slot.dirty.add(index)
        untracked = not slot.tracking.counters.get1(index)
        if untracked and not trapped:
            self._charge(vcpu, _FAST, self.cost.fast_cycles)
            return _piece(gpa, n, _FAST)
        self._charge(vcpu, _EMULATED, self.cost.emulate_cycles)
        self.seq = seq = self.seq + 1
        notifiers = self.notifiers
        if notifiers.sync or notifiers.batch:  # any node registered
            event = _guest_event(seq, vcpu, gpa, bytes(data), untracked)
            told = notifiers.dispatch_write(self, event)  # a notifier may write: count after
            stats.notifications += told
            stats.notifier_errors = notifiers.errors
        return _piece(gpa, n, _EMULATED, seq)

    def read(self, gpa: int, length: int) -> bytes:
        """Read guest memory; pages never written read as zeros. Every byte must be in
        a memslot."""
        self._check_access(gpa, length)
        out = bytearray()
        off = 0
        while off < length:
            g = gpa + off
            plen = min(PAGE_SIZE - (g & PAGE_MASK), length - off)
            slot = self.slots.find(g >> PAGE_SHIFT)
            if slot is None:
                raise FailedPrecondition(f"gpa {g:#x} is not in any memslot; it is not RAM")
            out += slot.memory.read((g >> PAGE_SHIFT) - slot.info.base_gfn, g & PAGE_MASK, plen)
            off += plen
        return bytes(out)

    def dma_write(self, gpa: int, data: bytes) -> WriteResult:
        """A device-model write into guest memory, by the VM's DMA policy.

        KVM's host-side writes never notify (R4.7): ``bypass``. ``notify`` delivers them
        as events with source DMA; ``reject`` refuses a DMA that touches a tracked gfn.
        Every byte must be in a writable memslot; nothing is written otherwise.
        """
        if self.on_change is not None:
            self.on_change(self)
        n = len(data)
        self._check_access(gpa, n)
        plan: list[tuple[Slot, int, int, int]] = []  # slot, gpa, offset in data, length
        off = 0
        while off < n:
            g = gpa + off
            plen = min(PAGE_SIZE - (g & PAGE_MASK), n - off)
            slot = self.slots.find(g >> PAGE_SHIFT)
            if slot is None or slot.readonly:
                raise FailedPrecondition(
                    f"DMA to gpa {g:#x}: not in a writable memslot; nothing was written"
                )
            plan.append((slot, g, off, plen))
            off += plen
        policy = self.dma_policy
        if policy is DmaPolicy.REJECT:
            for slot, g, _, _ in plan:
                if slot.tracking.counters.get1((g >> PAGE_SHIFT) - slot.base_gfn):
                    self.stats.dma_rejected += 1
                    raise DmaRejected(
                        f"DMA to write-tracked gfn {g >> PAGE_SHIFT:#x} rejected by the VM's"
                        " dma_policy=reject; nothing was written"
                    )
        view = memoryview(data)
        pieces = []
        self.stats.dma_writes += 1
        for slot, g, o, plen in plan:
            index = (g >> PAGE_SHIFT) - slot.base_gfn
            slot.memory.write(index, g & PAGE_MASK, view[o : o + plen])
            if slot.dirty is not None:
                slot.dirty.add(index)
            self.stats.dma_cycles += self.cost.dma_cycles
            tracked = slot.tracking.counters.get1(index) > 0
            if not tracked:
                self.stats.dma_applied += 1
            elif policy is not DmaPolicy.NOTIFY:
                self.stats.dma_bypassed += 1
            if policy is DmaPolicy.NOTIFY and tracked:
                self.seq += 1
                self.stats.dma_notified += 1
                event = WriteEvent(self.seq, NO_VCPU, g, bytes(view[o : o + plen]), Source.DMA)
                told = self.notifiers.dispatch_write(self, event)  # (count after: nested writes)
                self.stats.notifications += told
                self.stats.notifier_errors = self.notifiers.errors
                pieces.append(WritePiece(g, plen, WritePath.EMULATED, self.seq))
            else:
                pieces.append(WritePiece(g, plen, WritePath.FAST))
        return WriteResult(tuple(pieces))

    # ------------------------------------------------------------------ batched writes

    def write_batch(
        self,
        gpa: npt.ArrayLike,
        vcpu: npt.ArrayLike,
        length: npt.ArrayLike,
        data: bytes,
    ) -> BatchResult:
        """Many guest writes in one call: write i is ``length[i]`` bytes of ``data``
        (concatenated in order) at ``gpa[i]`` from ``vcpu[i]``.

        The outcome, guest memory and events equal those of calling :meth:`write` for
        each in order. numpy classifies the pieces in bulk; per-event notifiers are called
        after each emulated piece, batch notifiers once with all the events at the end
        (or in parts, where a per-event notifier's callback makes that necessary to keep
        them in seq order).
        If a notifier changes tracking or memslots, the rest of the batch is classified
        again, so the equivalence holds.
        """
        if self.on_change is not None:
            self.on_change(self)
        g = np.asarray(gpa, dtype=np.int64).ravel()
        v = np.asarray(vcpu, dtype=np.int64).ravel()
        n = np.asarray(length, dtype=np.int64).ravel()
        count = g.size
        if not (v.size == count and n.size == count):
            raise InvalidArgument(
                f"gpa, vcpu and length must have one entry per write: got {g.size}, {v.size},"
                f" {n.size}"
            )
        if count > MAX_BATCH_WRITES:
            raise InvalidArgument(f"{count} writes in one batch; at most {MAX_BATCH_WRITES}")
        if count == 0:
            empty = np.zeros(0, dtype=np.int64)
            return BatchResult(empty, empty, empty, np.zeros(0, dtype=np.int8), empty)
        lim = self.limits
        if int(n.min()) <= 0 or int(n.max()) > lim.max_write_bytes:
            raise InvalidArgument(
                f"every write needs 1..{lim.max_write_bytes} bytes"
            )
        total = int(n.sum())
        if total != len(data):
            raise InvalidArgument(
                f"lengths add up to {total} bytes but data holds {len(data)}"
            )
        if int(g.min()) < 0 or int((g + n).max()) > lim.gfn_limit << PAGE_SHIFT:
            raise InvalidArgument(
                f"a write falls outside the {lim.gfn_bits + PAGE_SHIFT}-bit guest physical"
                " address space"
            )
        if int(v.min()) < 0 or int(v.max()) >= self.vcpus:
            raise InvalidArgument(
                f"vcpu ids must be 0..{self.vcpus - 1}; got {int(v.min())}..{int(v.max())}"
            )
        offs = np.zeros(count, dtype=np.int64)
        np.cumsum(n[:-1], out=offs[1:])
        # Split writes at page boundaries (R4.3).
        first_page = g >> PAGE_SHIFT
        npieces = ((g + n - 1) >> PAGE_SHIFT) - first_page + 1
        if int(npieces.max()) == 1:
            widx = np.arange(count, dtype=np.int64)
            pgpa, plen, poff = g, n, offs
        else:
            widx = np.repeat(np.arange(count, dtype=np.int64), npieces)
            starts = np.cumsum(npieces) - npieces
            k = np.arange(widx.size, dtype=np.int64) - np.repeat(starts, npieces)
            pgpa = np.where(k == 0, g[widx], (first_page[widx] + k) << PAGE_SHIFT)
            pend = np.minimum(g[widx] + n[widx], (first_page[widx] + k + 1) << PAGE_SHIFT)
            plen = pend - pgpa
            poff = offs[widx] + (pgpa - g[widx])
        pvcpu = v if pgpa is g else v[widx]
        self.stats.writes += count
        return self._apply_pieces(widx, pgpa, plen, poff, pvcpu, data, packed=pgpa is g)

    def _classify(
        self, pgpa: I64, widx: I64 | None = None, carry: int = -1
    ) -> tuple[npt.NDArray[np.int8], I64, I64, U8]:
        """Path, slot position, page index and event flags of each piece, from current
        state. ``widx`` (given when writes cross pages): the write of each piece. A write
        that faults on any of its pieces is emulated whole (see :meth:`write`), so its
        pieces on untracked RAM are EMULATED with FLAG_UNTRACKED; ``carry`` is a write
        whose earlier pieces were emulated already."""
        path, pos, index = self._classify_pages(pgpa)
        flags = np.zeros(path.size, dtype=np.uint8)
        if widx is not None and path.size:
            fast = path == _FAST
            if carry >= 0 or not fast.all():
                trapped = np.zeros(int(widx[-1]) + 1, dtype=np.bool_)
                trapped[widx[~fast]] = True
                if carry >= 0:
                    trapped[carry] = True
                promote = fast & trapped[widx]
                path[promote] = _EMULATED
                flags[promote] = FLAG_UNTRACKED
        return path, pos, index, flags

    def _classify_pages(
        self, pgpa: I64
    ) -> tuple[npt.NDArray[np.int8], I64, I64]:
        """Path, slot position and page index of each piece by its own page alone."""
        gfn = pgpa >> PAGE_SHIFT
        pos = self.slots.find_many(gfn)
        if not gfn.size:
            return np.zeros(0, dtype=np.int8), pos, np.zeros(0, dtype=np.int64)
        slots = self.slots.slots()
        lo, hi = int(pos.min()), int(pos.max())
        if lo == hi and lo >= 0 and not slots[lo].readonly:
            # Every piece in one writable slot (the common case): no masks.
            slot = slots[lo]
            index = gfn - slot.base_gfn
            path = (slot.tracking.counters.get(index) > 0).astype(np.int8) + np.int8(_FAST)
            return path, pos, index
        path = np.full(gfn.size, _MMIO_EXIT, dtype=np.int8)
        index = np.zeros(gfn.size, dtype=np.int64)
        for p in range(max(lo, 0), hi + 1):
            slot = slots[p]
            if slot.readonly:
                continue
            mask = pos == p
            if not mask.any():
                continue
            idx = gfn[mask] - slot.base_gfn
            index[mask] = idx
            path[mask] = (slot.tracking.counters.get(idx) > 0).astype(np.int8) + np.int8(_FAST)
        return path, pos, index

    def _apply_pieces(
        self,
        widx: I64,
        pgpa: I64,
        plen: I64,
        poff: I64,
        pvcpu: I64,
        data: bytes,
        *,
        packed: bool = False,
    ) -> BatchResult:
        """Classify, store, notify and account pieces. ``packed``: the pieces are the
        writes themselves, their bytes back to back from the start of ``data``."""
        multi = None if packed else widx  # writes that cross pages: classified whole
        path, pos, index, pflags = self._classify(pgpa, multi)
        slots = self.slots.slots()
        view = memoryview(data)
        sync = self.notifiers.sync
        stats = self.stats
        counts: list[int] = np.bincount(path, minlength=3).tolist()
        every = pgpa.size
        if not sync:
            # No per-event notifier: nothing can change tracking mid-batch, so one pass.
            self._apply_range(0, every, path, pos, index, pgpa, plen, poff, slots, view)
            n_emul = counts[_EMULATED]
            if n_emul == every:
                seq = np.arange(self.seq + 1, self.seq + 1 + n_emul, dtype=np.int64)
            elif n_emul:
                seq = np.zeros(every, dtype=np.int64)
                seq[path == _EMULATED] = np.arange(
                    self.seq + 1, self.seq + 1 + n_emul, dtype=np.int64
                )
            else:
                seq = np.zeros(every, dtype=np.int64)
            first, last = (self.seq + 1, self.seq + n_emul) if n_emul else (0, 0)
            self.seq += n_emul
        else:
            seq = np.zeros(every, dtype=np.int64)
            self._apply_sync(path, pos, index, pgpa, plen, poff, pvcpu, pflags, multi, data, seq)
            # Notifiers may change tracking mid-batch: count the paths taken. A
            # notifier's DMA may take seqs in between the batch's.
            counts = np.bincount(path, minlength=3).tolist()
            held = seq[seq > 0]
            first, last = (int(held[0]), int(held[-1])) if held.size else (0, 0)
        # Accounting, in bulk.
        cost = self.cost
        per_path = (cost.mmio_exit_cycles, cost.fast_cycles, cost.emulate_cycles)
        for p in range(3):  # WritePath values
            stats.pieces[p] += counts[p]
            stats.cycles[p] += counts[p] * per_path[p]
        if counts[_MMIO_EXIT]:
            stats.bytes_written += int(plen[path != _MMIO_EXIT].sum())
        else:
            stats.bytes_written += int(plen.sum())
        if any(per_path):
            vcpu_cycles = stats.vcpu_cycles
            writer = int(pvcpu[0])
            if bool((pvcpu == writer).all()):  # one vCPU wrote the whole batch
                total = sum(c * k for c, k in zip(per_path, counts, strict=True))
                if total:
                    vcpu_cycles[writer] = vcpu_cycles.get(writer, 0) + total
            else:
                # Cycles per vCPU (ids are below self.vcpus <= 4096), ascending.
                cyc = np.asarray(per_path, dtype=np.int64)[path]
                sums = np.bincount(pvcpu, weights=cyc)
                for vid in np.flatnonzero(sums).tolist():
                    vcpu_cycles[vid] = vcpu_cycles.get(vid, 0) + int(sums[vid])
        if not sync and counts[_EMULATED] and self.notifiers.batch:
            # (With per-event nodes, _apply_sync gave the batch nodes their events.)
            if self.notifiers.flush is not None:
                self.notifiers.flush()  # an outer batch's events come first
            if counts[_EMULATED] == every:
                batch = EventBatch(
                    seq.astype(np.uint64),
                    pgpa.astype(np.uint64),
                    plen.astype(np.uint32),
                    pvcpu.astype(np.uint32),
                    np.zeros(every, dtype=np.uint8),
                    bytes(data) if packed else _gather(data, poff, plen),
                    pflags,
                )
            else:
                emulated = np.flatnonzero(path == _EMULATED)
                batch = EventBatch(
                    seq[emulated].astype(np.uint64),
                    pgpa[emulated].astype(np.uint64),
                    plen[emulated].astype(np.uint32),
                    pvcpu[emulated].astype(np.uint32),
                    np.zeros(emulated.size, dtype=np.uint8),
                    _gather(data, poff[emulated], plen[emulated]),
                    pflags[emulated],
                )
            told = self.notifiers.dispatch_batch(self, batch)
            stats.notifications += told
            stats.notifier_errors = self.notifiers.errors
        return BatchResult(
            widx, pgpa, plen, path, seq, (counts[0], counts[1], counts[2]), first, last
        )

    def _apply_sync(
        self,
        path: npt.NDArray[np.int8],
        pos: I64,
        index: I64,
        pgpa: I64,
        plen: I64,
        poff: I64,
        pvcpu: I64,
        pflags: U8,
        multi: I64 | None,
        data: bytes,
        seq: I64,
    ) -> None:
        """Apply pieces in order with per-event notifiers: each emulated piece is
        stored, then its event goes to every per-event node (as ``dispatch_sync``),
        before the next piece lands. Stretches of other pieces are stored in bulk.
        When a notifier changes tracking or memslots, the rest is classified again.
        Batch nodes get the events at the end, or earlier where order requires it
        (see NotifierList.flush)."""
        if not isinstance(data, bytes):
            data = bytes(data)
        with _HeldEvents(self, pgpa, plen, poff, pvcpu, pflags, data) as held:
            done_s = held.seqs
            done_j = held.pieces
            view = memoryview(data)
            notifiers = self.notifiers
            slots = self.slots.slots()
            total = pgpa.size
            gen = self.generation
            calls = 0
            known: tuple[NotifierNode, ...] | None = None  # the nodes `fast` was made for
            fast: list[tuple[NotifierNode, Callable[[Vm, int, int, int, bytes], None]]] = []
            one: Callable[[Vm, int, int, int, bytes], None] | None = None  # fast's only node
            one_calls = 0  # calls made to `one` not yet counted
            i = 0
            while True:
                # The emulated pieces still to do, found once (and again after a
                # re-classification), not by rescanning the rest of the batch per piece;
                # their columns as Python lists, which iterate far faster than numpy scalars.
                todo = np.flatnonzero(path[i:] == _EMULATED) + i
                if not todo.size:
                    break
                again = False
                for j, p, ix, gp, o, ln, vc, fl in zip(
                    todo.tolist(), pos[todo].tolist(), index[todo].tolist(), pgpa[todo].tolist(),
                    poff[todo].tolist(), plen[todo].tolist(), pvcpu[todo].tolist(),
                    pflags[todo].tolist(), strict=True,
                ):
                    if j > i:
                        self._apply_range(i, j, path, pos, index, pgpa, plen, poff, slots, view)
                    # Emulate piece j: write first, then notify (R4.4).
                    slot = slots[p]
                    piece = data[o : o + ln]
                    slot.memory.write(ix, gp & PAGE_MASK, piece)
                    if slot.dirty is not None:
                        slot.dirty.add(ix)
                    self.seq = s = self.seq + 1
                    done_s.append(s)
                    done_j.append(j)
                    nodes = notifiers.sync
                    if nodes is not known:
                        # Registered nodes changed (or first piece): can every node take the
                        # write without an event object (GuestWriteNotifier)?
                        if one_calls:
                            fast[0][0].calls += one_calls
                            calls += one_calls
                            one_calls = 0
                        known = nodes
                        fns = [getattr(n.notifier, "track_guest_write", None) for n in nodes]
                        fast = [] if None in fns else [
                            (n, fn) for n, fn in zip(nodes, fns, strict=True) if fn is not None
                        ]
                        one = fast[0][1] if len(fast) == 1 else None
                    if fl:
                        # A piece on an untracked page: its event carries the flag, so
                        # no shortcut (track_guest_write has no flag).
                        flagged = _guest_event(s, vc, gp, piece, True)
                        for node in nodes:
                            if not node.active:
                                continue
                            calls += 1
                            node.calls += 1
                            try:
                                node.notifier.track_write(self, flagged)
                            except Exception:
                                notifiers._failed(node, self, "track_write")
                    elif one is not None:
                        # The only node (the usual case, a plugin): it is active, or `sync`
                        # would have changed; its calls are counted when the list changes.
                        one_calls += 1
                        try:
                            one(self, s, vc, gp, piece)
                        except Exception:
                            notifiers._failed(fast[0][0], self, "track_write")
                    elif fast:
                        for node, fn in fast:
                            if not node.active:  # unregistered by a node called before it
                                continue
                            calls += 1
                            node.calls += 1
                            try:
                                fn(self, s, vc, gp, piece)
                            except Exception:
                                notifiers._failed(node, self, "track_write")
                    else:
                        event: WriteEvent = _new(WriteEvent)  # _guest_event(s, vc, gp, piece)
                        _ev_seq(event, s)
                        _ev_vcpu(event, vc)
                        _ev_gpa(event, gp)
                        _ev_data(event, piece)
                        _ev_source(event, _GUEST)
                        _ev_untracked(event, False)
                        for node in nodes:
                            if not node.active:
                                continue
                            calls += 1
                            node.calls += 1
                            try:
                                node.notifier.track_write(self, event)
                            except Exception:
                                notifiers._failed(node, self, "track_write")
                    i = j + 1
                    if self.generation != gen:
                        gen = self.generation
                        if i < total:
                            # A notifier changed tracking or memslots: classify the rest again.
                            rest, carry = None, -1
                            if multi is not None:
                                rest = multi[i:]
                                if multi[i] == multi[j]:
                                    carry = int(multi[j])  # this write goes on emulated
                            path[i:], pos[i:], index[i:], pflags[i:] = self._classify(
                                pgpa[i:], rest, carry
                            )
                            slots = self.slots.slots()
                            again = True
                            break
                if not again:
                    break
            self._apply_range(i, total, path, pos, index, pgpa, plen, poff, slots, view)
            if one_calls:
                fast[0][0].calls += one_calls
                calls += one_calls
            if done_s:
                # Every piece that ends up EMULATED was emulated here, in order; their seqs
                # are consecutive unless a notifier took some in between.
                first, last = done_s[0], done_s[-1]
                if last - first + 1 == len(done_s):
                    seq[path == _EMULATED] = np.arange(first, last + 1, dtype=np.int64)
                else:
                    seq[path == _EMULATED] = done_s
            self.stats.notifications += calls
            self.stats.notifier_errors = notifiers.errors

    def _apply_range(
        self,
        a: int,
        b: int,
        path: npt.NDArray[np.int8],
        pos: I64,
        index: I64,
        pgpa: I64,
        plen: I64,
        poff: I64,
        slots: list[Slot],
        view: memoryview,
    ) -> None:
        """Store pieces a..b-1 that reach memory (FAST and, when called for a whole
        batch, EMULATED), in order; mark them dirty where the slot logs."""
        if a >= b:
            return
        if b - a <= 4:
            # A few pieces (between two emulated ones, say): one by one, no arrays.
            for k in range(a, b):
                if path[k] == _MMIO_EXIT:
                    continue
                slot = slots[pos[k]]
                ix = int(index[k])
                o = int(poff[k])
                slot.memory.write(ix, int(pgpa[k]) & PAGE_MASK, view[o : o + int(plen[k])])
                if slot.dirty is not None:
                    slot.dirty.add(ix)
            return
        groups: list[tuple[Slot, I64 | slice]]
        first = int(pos[a])
        if first >= 0 and bool((pos[a:b] == first).all()):
            # Every piece in one slot (the common case): slices, no index arrays. No
            # MMIO piece either, as a slot is all readonly or all writable.
            if slots[first].readonly:
                return
            groups = [(slots[first], slice(a, b))]
        else:
            sel = np.flatnonzero(path[a:b] != _MMIO_EXIT) + a
            if sel.size == 0:
                return
            # Slot by slot (slots share no memory, so only the order within a slot
            # matters), each slot's pieces in batch order.
            spos = pos[sel]
            groups = [(slots[p], sel[spos == p]) for p in np.unique(spos).tolist()]
        for slot, sub in groups:
            idx = index[sub]
            slot.memory.write_many(idx, pgpa[sub] & PAGE_MASK, view, poff[sub], plen[sub])
            if slot.dirty is not None:
                slot.dirty.update(idx.tolist())

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Delete the VM: every notifier hears that every region is gone, then is
        unregistered (plugins detach); then memory, counters and slots are freed."""
        if self.closed:
            return
        for slot in self.slots.slots():
            self._region_gone(slot.info, SlotChange.DELETE)
        for node in self.notifiers.nodes():
            self.notifiers.unregister(node)
            if isinstance(node.notifier, ClosingNotifier):
                try:
                    node.notifier.vm_closed(self)
                except Exception:
                    self.notifiers._failed(node, self, "vm_closed")
        self.stats.notifier_errors = self.notifiers.errors
        self.slots = MemslotTable()
        self.closed = True
        self.generation += 1

    @property
    def memory_bytes(self) -> int:
        """Bytes of guest memory held (written data only)."""
        return sum(s.memory.nbytes for s in self.slots.slots())

    @property
    def counter_bytes(self) -> int:
        """Bytes held by track counters."""
        return sum(s.tracking.nbytes for s in self.slots.slots())

    @property
    def memory_footprint(self) -> int:
        """Bytes guest memory really holds: written data and what indexes it."""
        return sum(s.memory.footprint for s in self.slots.slots())

    @property
    def tracking_footprint(self) -> int:
        """Bytes track counters, region counts and owner records really hold."""
        return sum(s.tracking.footprint for s in self.slots.slots())

    def memory_growth_bound(self, gpa: I64, length: I64) -> int:
        """At most how many bytes :attr:`memory_footprint` grows by if the guest writes
        ``length[i]`` bytes at ``gpa[i]`` (any path): checked against a quota first."""
        if not gpa.size:
            return 0
        first = gpa >> PAGE_SHIFT
        npieces = ((gpa + length - 1) >> PAGE_SHIFT) - first + 1
        if int(npieces.max()) == 1:
            pgpa, pend = gpa, gpa + length
        else:
            w = np.repeat(np.arange(gpa.size, dtype=np.int64), npieces)
            starts = np.cumsum(npieces) - npieces
            k = np.arange(w.size, dtype=np.int64) - np.repeat(starts, npieces)
            pgpa = np.where(k == 0, gpa[w], (first[w] + k) << PAGE_SHIFT)
            pend = np.minimum(gpa[w] + length[w], (first[w] + k + 1) << PAGE_SHIFT)
        gfn = pgpa >> PAGE_SHIFT
        pos = self.slots.find_many(gfn)
        slots = self.slots.slots()
        grow = 0
        for p in np.unique(pos[pos >= 0]).tolist():
            slot = slots[p]
            if slot.readonly:
                continue
            mask = pos == p
            start = pgpa[mask]
            grow += slot.memory.growth_bound(
                gfn[mask] - slot.base_gfn, start & PAGE_MASK,
                (start & PAGE_MASK) + pend[mask] - start,
            )
        return grow

    def tracking_growth_bound(self, gfns: I64, owner: str = TENANT_OWNER) -> int:
        """At most how many bytes :attr:`tracking_footprint` grows by if ``owner`` tracks
        ``gfns``: checked against a quota first."""
        if gfns.size > 1 and not bool((gfns[1:] > gfns[:-1]).all()):
            gfns = np.unique(gfns)  # a range or a sorted list needs no sort
        if not gfns.size:
            return 0
        one = self.slots.find(int(gfns[0]))
        if one is not None and int(gfns[-1]) < one.info.end_gfn:
            base = one.base_gfn
            return one.tracking.growth_bound(gfns - base if base else gfns, owner)
        pos = self.slots.find_many(gfns)
        slots = self.slots.slots()
        grow = 0
        for p in np.unique(pos[pos >= 0]).tolist():
            slot = slots[p]
            grow += slot.tracking.growth_bound(gfns[pos == p] - slot.base_gfn, owner)
        return grow

    def set_policy(
        self,
        *,
        dma_policy: DmaPolicy | None = None,
        semantics: Semantics | None = None,
        cost: CostModel | None = None,
    ) -> None:
        """Change the VM's policies; unset arguments stay as they are."""
        if dma_policy is not None:
            self.dma_policy = dma_policy
        if semantics is not None:
            self.semantics = semantics
        if cost is not None:
            self.cost = cost
