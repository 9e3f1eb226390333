"""The batch write engine: many guest writes in one call, classified, stored and
accounted with numpy, equal in every outcome to writing them one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.arrays import distinct, uniform
from pagetrackd.domain.errors import (
    InvalidArgument,
)
from pagetrackd.domain.events import FLAG_UNTRACKED, EventBatch
from pagetrackd.domain.memslots import Slot
from pagetrackd.domain.notifiers import GuestWrites
from pagetrackd.domain.types import (
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    WritePath,
)

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

#: writes one batch may hold
MAX_BATCH_WRITES = 1 << 20
# The paths as plain ints, for the arrays below: numpy compares an array with an IntEnum
# member only after probing the member for its array protocols (through the enum class's
# __getattr__), which cost microseconds per batch.
_FAST = int(WritePath.FAST)
_EMULATED = int(WritePath.EMULATED)
_MMIO_EXIT = int(WritePath.MMIO_EXIT)


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


def write_batch(
    vm: Vm,
    gpa: npt.ArrayLike,
    vcpu: npt.ArrayLike,
    length: npt.ArrayLike,
    data: bytes,
) -> BatchResult:
    """Many guest writes in one call: write i is ``length[i]`` bytes of ``data``
    (concatenated in order) at ``gpa[i]`` from ``vcpu[i]``.

    The outcome, guest memory and events equal those of calling ``vm.write`` for
    each in order. numpy classifies the pieces in bulk; per-event notifiers are called
    after each emulated piece, batch notifiers once with all the events at the end
    (or in parts, where a per-event notifier's callback makes that necessary to keep
    them in seq order).
    If a notifier changes tracking or memslots, the rest of the batch is classified
    again, so the equivalence holds.
    """
    if vm.on_change is not None:
        vm.on_change(vm)
    g, v, n, lo, hi = _checked(vm, gpa, vcpu, length, data)
    if not g.size:
        empty = np.zeros(0, dtype=np.int64)
        return BatchResult(empty, empty, empty, np.zeros(0, dtype=np.int8), empty)
    widx, pgpa, plen, poff = split_writes(g, n)
    pvcpu = v if pgpa is g else v[widx]
    vm.stats.writes += g.size
    packed = pgpa is g  # then the pieces' gfns lie within the writes' first and last
    bounds = (lo >> PAGE_SHIFT, hi >> PAGE_SHIFT) if packed else None
    return _apply_pieces(vm, widx, pgpa, plen, poff, pvcpu, data, packed=packed,
                         gfn_bounds=bounds)


def check_batch(
    vm: Vm, gpa: npt.ArrayLike, vcpu: npt.ArrayLike, length: npt.ArrayLike, data: bytes
) -> tuple[I64, I64, I64]:
    """The gpa, vcpu and length columns of a batch as int64 arrays, checked whole:
    raises InvalidArgument (having changed nothing) if any write is not valid."""
    g, v, n, _, _ = _checked(vm, gpa, vcpu, length, data)
    return g, v, n


def _checked(
    vm: Vm, gpa: npt.ArrayLike, vcpu: npt.ArrayLike, length: npt.ArrayLike, data: bytes
) -> tuple[I64, I64, I64, int, int]:
    """:func:`check_batch`, and the lowest and highest gpa (0, -1 for no writes)."""
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
        return g, v, n, 0, -1
    lim = vm.limits
    # Batches usually write one length from one vCPU: one comparison each then.
    same_n = uniform(n)
    n_lo, n_hi = (same_n, same_n) if same_n is not None else (int(n.min()), int(n.max()))
    if n_lo <= 0 or n_hi > lim.max_write_bytes:
        raise InvalidArgument(f"every write needs 1..{lim.max_write_bytes} bytes")
    total = same_n * count if same_n is not None else int(n.sum())
    if total != len(data):
        raise InvalidArgument(f"lengths add up to {total} bytes but data holds {len(data)}")
    g_lo, g_hi = int(g.min()), int(g.max())
    end = g_hi + same_n if same_n is not None else int((g + n).max())
    if g_lo < 0 or end > lim.gfn_limit << PAGE_SHIFT:
        raise InvalidArgument(
            f"a write falls outside the {lim.gfn_bits + PAGE_SHIFT}-bit guest physical"
            " address space"
        )
    same_v = uniform(v)
    v_lo, v_hi = (same_v, same_v) if same_v is not None else (int(v.min()), int(v.max()))
    if v_lo < 0 or v_hi >= vm.vcpus:
        raise InvalidArgument(f"vcpu ids must be 0..{vm.vcpus - 1}; got {v_lo}..{v_hi}")
    return g, v, n, g_lo, g_hi


def split_writes(g: I64, n: I64) -> tuple[I64, I64, I64, I64]:
    """Split writes of ``n[i]`` bytes at ``g[i]`` at page boundaries (R4.3): the write,
    gpa, length and offset in the batch's data of each piece. When no write crosses a
    page the pieces are the writes: ``g`` and ``n`` themselves are returned."""
    count = g.size
    offs = np.zeros(count, dtype=np.int64)
    np.cumsum(n[:-1], out=offs[1:])
    if int(((g & (PAGE_SIZE - 1)) + n).max()) <= PAGE_SIZE:  # no write crosses a page
        return np.arange(count, dtype=np.int64), g, n, offs
    first_page = g >> PAGE_SHIFT
    npieces = ((g + n - 1) >> PAGE_SHIFT) - first_page + 1
    widx = np.repeat(np.arange(count, dtype=np.int64), npieces)
    starts = np.cumsum(npieces) - npieces
    k = np.arange(widx.size, dtype=np.int64) - np.repeat(starts, npieces)
    pgpa: I64 = np.where(k == 0, g[widx], (first_page[widx] + k) << PAGE_SHIFT)
    pend: I64 = np.minimum(g[widx] + n[widx], (first_page[widx] + k + 1) << PAGE_SHIFT)
    plen: I64 = pend - pgpa
    poff: I64 = offs[widx] + (pgpa - g[widx])
    return widx, pgpa, plen, poff


def classify(
    vm: Vm, pgpa: I64, widx: I64 | None = None, carry: int = -1,
    gfn_bounds: tuple[int, int] | None = None,
) -> tuple[npt.NDArray[np.int8], I64, I64, U8]:
    """Path, slot position, page index and event flags of each piece, from current
    state. ``widx`` (given when writes cross pages): the write of each piece. A write
    that faults on any of its pieces is emulated whole (see :meth:`write`), so its
    pieces on untracked RAM are EMULATED with FLAG_UNTRACKED; ``carry`` is a write
    whose earlier pieces were emulated already."""
    path, pos, index = _classify_pages(vm, pgpa, gfn_bounds)
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
    vm: Vm, pgpa: I64, gfn_bounds: tuple[int, int] | None = None
) -> tuple[npt.NDArray[np.int8], I64, I64]:
    """Path, slot position and page index of each piece by its own page alone
    (``gfn_bounds``: the lowest and highest gfn, when known already)."""
    gfn = pgpa >> PAGE_SHIFT
    if not gfn.size:
        return np.zeros(0, dtype=np.int8), np.zeros(0, dtype=np.int64), gfn
    slots = vm.slots.slots()
    lo, hi = gfn_bounds if gfn_bounds is not None else (int(gfn.min()), int(gfn.max()))
    one = vm.slots.holding(lo, hi)
    if one >= 0 and not slots[one].readonly:
        # Every piece in one writable slot (the common case): no masks.
        slot = slots[one]
        index = gfn - slot.base_gfn
        path = (slot.tracking.counters.get(index) > 0).astype(np.int8) + np.int8(_FAST)
        return path, np.full(gfn.shape, one, dtype=np.int64), index
    pos = vm.slots.find_many(gfn)
    first, last = int(pos.min()), int(pos.max())
    path = np.full(gfn.size, _MMIO_EXIT, dtype=np.int8)
    index = np.zeros(gfn.size, dtype=np.int64)
    for p in range(max(first, 0), last + 1):
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


@dataclass(slots=True, eq=False)
class _Pieces:
    """The pieces of a batched write as columns (piece k is entry k of each): the
    write it comes from, gpa, length, offset of its bytes in ``data``, vCPU; ``multi``
    is ``widx`` when writes cross pages (such a write is classified whole, else None);
    then what :func:`classify` says of it: path, slot position, page index, flags."""

    widx: I64
    pgpa: I64
    plen: I64
    poff: I64
    pvcpu: I64
    data: bytes
    multi: I64 | None
    path: npt.NDArray[np.int8]
    pos: I64
    index: I64
    pflags: U8

    @property
    def size(self) -> int:
        """Number of pieces."""
        return int(self.pgpa.size)

    def events(self, seq: I64, sel: I64 | None) -> EventBatch:
        """The events of the pieces ``sel`` (all when None) with seqs ``seq``."""
        if sel is None:
            data = self.data if self.multi is None else _gather(self.data, self.poff, self.plen)
            return EventBatch(
                seq.astype(np.uint64), self.pgpa.astype(np.uint64), self.plen.astype(np.uint32),
                self.pvcpu.astype(np.uint32), np.zeros(seq.size, dtype=np.uint8),
                bytes(data), self.pflags,
            )
        return EventBatch(
            seq.astype(np.uint64), self.pgpa[sel].astype(np.uint64),
            self.plen[sel].astype(np.uint32), self.pvcpu[sel].astype(np.uint32),
            np.zeros(sel.size, dtype=np.uint8),
            _gather(self.data, self.poff[sel], self.plen[sel]), self.pflags[sel],
        )


def _apply_pieces(
    vm: Vm, widx: I64, pgpa: I64, plen: I64, poff: I64, pvcpu: I64, data: bytes,
    *, packed: bool = False, gfn_bounds: tuple[int, int] | None = None,
) -> BatchResult:
    """Classify, store, notify and account pieces. ``packed``: the pieces are the
    writes themselves, their bytes back to back from the start of ``data``;
    ``gfn_bounds``: the pieces' lowest and highest gfn, if known."""
    multi = None if packed else widx  # writes that cross pages: classified whole
    if not isinstance(data, bytes):
        data = bytes(data)
    pc = _Pieces(widx, pgpa, plen, poff, pvcpu, data, multi,
                 *classify(vm, pgpa, multi, gfn_bounds=gfn_bounds))
    counts: list[int]
    if not vm.notifiers.sync:
        # No per-event notifier: nothing can change tracking mid-batch, so one pass.
        _apply_range(pc, 0, pc.size, vm.slots.slots())
        counts = np.bincount(pc.path, minlength=3).tolist()
        seq, first, last = _number(vm, pc.path, counts[_EMULATED])
        if last and vm.notifiers.batch:
            _tell_batch_nodes(vm, pc, seq, last - first + 1)
    else:
        seq = np.zeros(pc.size, dtype=np.int64)
        _apply_sync(vm, pc, seq)
        # A notifier's DMA may take seqs in between the batch's.
        held = seq[seq > 0]
        first, last = (int(held[0]), int(held[-1])) if held.size else (0, 0)
        # Notifiers may have changed tracking mid-batch: count the paths taken.
        counts = np.bincount(pc.path, minlength=3).tolist()
    _account(vm, pc, counts)
    return BatchResult(
        widx, pgpa, plen, pc.path, seq, (counts[0], counts[1], counts[2]), first, last
    )


def _number(vm: Vm, path: npt.NDArray[np.int8], n_emul: int) -> tuple[I64, int, int]:
    """Seqs of a batch's pieces when no notifier can intervene (``n_emul`` of them
    emulated): the emulated ones get the next seqs in order, the others 0. Also returns
    the first and last (0 if none)."""
    nxt = vm.seq + 1
    if n_emul == path.size:
        seq = np.arange(nxt, nxt + n_emul, dtype=np.int64)
    else:
        seq = np.zeros(path.size, dtype=np.int64)
        if n_emul:
            seq[path == _EMULATED] = np.arange(nxt, nxt + n_emul, dtype=np.int64)
    vm.seq += n_emul
    return seq, (nxt if n_emul else 0), (vm.seq if n_emul else 0)


def _tell_batch_nodes(vm: Vm, pc: _Pieces, seq: I64, n_emul: int) -> None:
    """Give the batch nodes the events of a batch written with no per-event node."""
    notifiers = vm.notifiers
    if notifiers.flush is not None:
        notifiers.flush()  # an outer batch's events come first
    if n_emul == pc.size:
        batch = pc.events(seq, None)
    else:
        emulated = np.flatnonzero(pc.path == _EMULATED)
        batch = pc.events(seq[emulated], emulated)
    vm.stats.notifications += notifiers.dispatch_batch(vm, batch)
    vm.stats.notifier_errors = notifiers.errors


def _account(vm: Vm, pc: _Pieces, counts: list[int]) -> None:
    """Count a batch's pieces, bytes and simulated cycles, in bulk."""
    stats = vm.stats
    cost = vm.cost
    path, plen, pvcpu = pc.path, pc.plen, pc.pvcpu
    per_path = (cost.mmio_exit_cycles, cost.fast_cycles, cost.emulate_cycles)
    for p in range(3):  # WritePath values
        stats.pieces[p] += counts[p]
        stats.cycles[p] += counts[p] * per_path[p]
    if counts[_MMIO_EXIT]:
        stats.bytes_written += int(plen[path != _MMIO_EXIT].sum())
    else:
        same_len = uniform(plen)
        stats.bytes_written += same_len * plen.size if same_len is not None else int(plen.sum())
    if not any(per_path):
        return
    vcpu_cycles = stats.vcpu_cycles
    writer = uniform(pvcpu)
    if writer is not None:  # one vCPU wrote the whole batch
        total = sum(c * k for c, k in zip(per_path, counts, strict=True))
        if total:
            vcpu_cycles[writer] = vcpu_cycles.get(writer, 0) + total
    else:
        # Cycles per vCPU (ids are below vm.vcpus <= 4096), ascending.
        cyc = np.asarray(per_path, dtype=np.int64)[path]
        sums = np.bincount(pvcpu, weights=cyc)
        for vid in np.flatnonzero(sums).tolist():
            vcpu_cycles[vid] = vcpu_cycles.get(vid, 0) + int(sums[vid])


class _HeldEvents:
    """The events of a batched write that the batch nodes (streams) have not been given
    yet: given to them when the batch ends, or earlier, as ``NotifierList.flush``,
    before anything that must come after them in seq order reaches them or the
    registrations change (a per-event notifier's callback may do either)."""

    def __init__(self, vm: Vm, pc: _Pieces) -> None:
        self.vm = vm
        self.pc = pc
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
        seqs, pieces = self.seqs[self.sent :], self.pieces[self.sent :]
        self.sent = len(self.seqs)
        vm = self.vm
        if vm.notifiers.batch:
            # every piece of the batch (the usual case): no selection to gather
            whole = pieces[0] == 0 and len(pieces) == self.pc.size
            batch = self.pc.events(_increasing(seqs), None if whole else _increasing(pieces))
            vm.stats.notifications += vm.notifiers.dispatch_batch(vm, batch)

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


def _increasing(values: list[int]) -> I64:
    """Strictly increasing ``values`` as an array; when they are consecutive (seqs and
    piece numbers usually are), a range, with no Python int converted one by one."""
    n = len(values)
    if n and values[-1] - values[0] == n - 1:
        return np.arange(values[0], values[0] + n, dtype=np.int64)
    return np.array(values, dtype=np.int64)


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


def _apply_sync(vm: Vm, pc: _Pieces, seq: I64) -> None:
    """Apply pieces in order with per-event notifiers: each emulated piece is
    stored, then its event goes to every per-event node (as ``dispatch_sync``),
    before the next piece lands. Stretches of other pieces are stored in bulk.
    When a notifier changes tracking or memslots, the rest is classified again.
    Batch nodes get the events at the end, or earlier where order requires it
    (see NotifierList.flush). Fills ``seq`` with the seq of each emulated piece."""
    writes = vm.notifiers.guest_writes()
    with _HeldEvents(vm, pc) as held:
        i, more = 0, True
        while more:
            i, more = _emulate_from(vm, pc, i, writes, held)
        _apply_range(pc, i, pc.size, vm.slots.slots())
        if held.seqs:
            # Every piece that ends up EMULATED was emulated here, in order; their seqs
            # are consecutive unless a notifier took some in between.
            seq[pc.path == _EMULATED] = _increasing(held.seqs)
        vm.stats.notifications += writes.finish()
        vm.stats.notifier_errors = vm.notifiers.errors


def _emulate_from(
    vm: Vm, pc: _Pieces, i: int, writes: GuestWrites, held: _HeldEvents
) -> tuple[int, bool]:
    """Store pieces from ``i`` on up to the last emulated one, each emulated piece
    notified before the next lands; stop early when a notifier changed tracking or
    memslots (after classifying the rest again) or the registrations. Returns the first
    piece not stored and whether emulated pieces may remain."""
    # The emulated pieces still to do, found once (and again after a re-classification),
    # not by rescanning the rest of the batch per piece; their columns as Python lists,
    # which iterate far faster than numpy scalars.
    todo = np.flatnonzero(pc.path[i:] == _EMULATED) + i
    if not todo.size:
        return i, False
    slots = vm.slots.slots()
    gen = vm._generation  # read per piece below: the attribute, not the property
    data = pc.data
    seqs, pieces, tell = held.seqs, held.pieces, writes.tell
    # The notifier module's choice of what to call for a piece on a tracked page while
    # the per-event nodes stay `nodes`: the only node's function, or None (then tell).
    notifiers = vm.notifiers
    nodes, one = writes.direct()
    start, by_tell = len(seqs), 0  # the calls to `one` are counted from these at the end
    stopped = False
    for j, p, ix, gp, o, ln, vc, fl in zip(
        todo.tolist(), pc.pos[todo].tolist(), pc.index[todo].tolist(), pc.pgpa[todo].tolist(),
        pc.poff[todo].tolist(), pc.plen[todo].tolist(), pc.pvcpu[todo].tolist(),
        pc.pflags[todo].tolist(), strict=True,
    ):
        if j > i:
            _apply_range(pc, i, j, slots)
        # Emulate piece j: write first, then notify (R4.4).
        slot = slots[p]
        piece = data[o : o + ln]
        slot.memory.write(ix, gp & PAGE_MASK, piece)
        if slot.dirty is not None:
            slot.dirty.add(ix)
        vm.seq = s = vm.seq + 1
        seqs.append(s)
        pieces.append(j)
        if fl or one is None:
            by_tell += 1
            tell(vm, s, vc, gp, piece, fl)
        else:
            try:
                one(vm, s, vc, gp, piece)
            except Exception:
                writes.failed(vm)
        i = j + 1
        if vm._generation != gen or notifiers.sync is not nodes:
            stopped = True
            break
    writes.called(len(seqs) - start - by_tell)
    if not stopped or i >= pc.size:
        return i, False
    if vm._generation != gen:
        _classify_rest(vm, pc, i, j)
    return i, True


def _classify_rest(vm: Vm, pc: _Pieces, i: int, j: int) -> None:
    """A notifier changed tracking or memslots after piece ``j``: classify the pieces
    from ``i`` on again (a write whose piece ``j`` was emulated goes on emulated)."""
    rest, carry = None, -1
    if pc.multi is not None:
        rest = pc.multi[i:]
        if pc.multi[i] == pc.multi[j]:
            carry = int(pc.multi[j])
    pc.path[i:], pc.pos[i:], pc.index[i:], pc.pflags[i:] = classify(vm, pc.pgpa[i:], rest, carry)


def _apply_range(pc: _Pieces, a: int, b: int, slots: list[Slot]) -> None:
    """Store pieces a..b-1 that reach memory (FAST and, when called for a whole
    batch, EMULATED), in order; mark them dirty where the slot logs."""
    if a >= b:
        return
    path, pos, index, pgpa, plen, poff = pc.path, pc.pos, pc.index, pc.pgpa, pc.plen, pc.poff
    view = memoryview(pc.data)
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
    first = uniform(pos[a:b])
    if first is not None and first >= 0:
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
        groups = [(slots[p], sel[spos == p]) for p in distinct(spos).tolist()]
    for slot, sub in groups:
        idx = index[sub]
        slot.memory.write_many(idx, pgpa[sub] & PAGE_MASK, view, poff[sub], plen[sub])
        if slot.dirty is not None:
            slot.dirty.update(idx.tolist())


def memory_growth_bound(vm: Vm, gpa: I64, length: I64) -> int:
    """At most how many bytes ``vm.memory_footprint`` grows by if the guest writes
    ``length[i]`` bytes at ``gpa[i]`` (any path): checked against a quota first."""
    if not gpa.size:
        return 0
    _, pgpa, plen, _ = split_writes(gpa, length)
    pend = pgpa + plen
    gfn = pgpa >> PAGE_SHIFT
    pos = vm.slots.find_many(gfn)
    slots = vm.slots.slots()
    grow = 0
    for p in distinct(pos[pos >= 0]).tolist():
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
