"""Guest access of a VM, one access at a time: writes split into pieces that exit as
MMIO, land natively or are emulated and notified (R4), LOCK CMPXCHG, reads and DMA.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.errors import (
    DmaRejected,
    FailedPrecondition,
    InvalidArgument,
)
from pagetrackd.domain.events import WriteEvent, guest_event
from pagetrackd.domain.memslots import Slot
from pagetrackd.domain.types import (
    NO_VCPU,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    CmpxchgResult,
    DmaPolicy,
    Source,
    WritePath,
    WritePiece,
    WriteResult,
)
from pagetrackd.domain.vmstate import VmState

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

# Enum members as module constants: a class attribute lookup on an Enum costs ~70 ns.
_FAST = WritePath.FAST
_EMULATED = WritePath.EMULATED

# Fast constructors for the frozen value objects of the single-write path (see
# events.guest_event); the field lists are checked so a change to a class fails at import.
_new = object.__new__
assert [f.name for f in fields(WritePiece)] == ["gpa", "length", "path", "seq"]
assert [f.name for f in fields(WriteResult)] == ["pieces"]
_wp_gpa, _wp_length, _wp_path, _wp_seq = (
    WritePiece.__dict__[f.name].__set__ for f in fields(WritePiece)
)
_wr_pieces = WriteResult.__dict__["pieces"].__set__


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


class GuestAccess(VmState):
    """A VM's single guest accesses."""

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
            self.on_change(cast("Vm", self))
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
            self.on_change(cast("Vm", self))
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
            event = guest_event(seq, vcpu, gpa, bytes(desired))
            told = notifiers.dispatch_write(cast("Vm", self), event)
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
            event = guest_event(seq, vcpu, gpa, bytes(data), untracked)
            # A notifier may write: count after.
            told = notifiers.dispatch_write(cast("Vm", self), event)
            stats.notifications += told
            stats.notifier_errors = notifiers.errors
        return _piece(gpa, n, _EMULATED, seq)

    def holds(self, gpa: int, length: int) -> bool:
        """Whether guest memory holds the bytes ``[gpa, gpa + length)`` already, inside
        one page of a slot: a write there stores into them and grows nothing, so it
        needs no memory quota check. False when unsure (the caller checks then)."""
        offset = gpa & PAGE_MASK
        if offset + length > PAGE_SIZE:
            return False
        gfn = gpa >> PAGE_SHIFT
        slot = self.slots.find(gfn)
        return slot is not None and slot.memory.holds(
            gfn - slot.info.base_gfn, offset, offset + length
        )

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
            self.on_change(cast("Vm", self))
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
                # (count after: nested writes)
                told = self.notifiers.dispatch_write(cast("Vm", self), event)
                self.stats.notifications += told
                self.stats.notifier_errors = self.notifiers.errors
                pieces.append(WritePiece(g, plen, WritePath.EMULATED, self.seq))
            else:
                pieces.append(WritePiece(g, plen, WritePath.FAST))
        return WriteResult(tuple(pieces))
