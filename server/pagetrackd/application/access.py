"""Guest memory use cases: memslots, dirty logs, guest writes, reads and DMA.

Each checks what needs the VM (its gfn space, the tenant's memory quota), waits for
block-policy streams before a write, and returns a typed result; the transport only
checks request shapes and converts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import numpy.typing as npt

from pagetrackd.application import slices
from pagetrackd.domain import InvalidArgument, SlotFlags, TenantId, Vm, WritePath
from pagetrackd.domain.arrays import uniform
from pagetrackd.domain.types import PAGE_SIZE, Memslot, SlotChange

if TYPE_CHECKING:
    from pagetrackd.application.engine import Engine
    from pagetrackd.domain.batch import BatchResult

A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class MemslotView:
    """A memslot with how many of its gfns are tracked and dirty."""

    info: Memslot
    tracked: int
    dirty: int = 0


@dataclass(frozen=True, slots=True)
class RegionUpdate:
    """What SetMemoryRegion did; ``region`` is the slot as it was for a delete."""

    change: SlotChange
    region: MemslotView | None
    old_base_gfn: int
    at_seq: int


@dataclass(frozen=True, slots=True)
class DirtyLog:
    """One memslot's dirty bitmap (read and cleared)."""

    info: Memslot
    bitmap: bytes
    dirty_count: int


@dataclass(frozen=True, slots=True)
class GuestRead:
    """Bytes read; ``mmio`` lists the (gpa, length) ranges outside every memslot, read
    as zeros."""

    data: bytes
    mmio: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class DmaPieceOutcome:
    """One page piece of a DMA write and what became of it."""

    gpa: int
    length: int
    outcome: str  #: "applied", "bypassed" (tracked, nobody told) or "notified"
    seq: int | None  #: the event's seq when it was notified


def set_memory_region(
    engine: Engine, tenant: TenantId, name: str, slot: int, base_gfn: int, npages: int,
    *, readonly: bool, log_dirty_pages: bool,
) -> RegionUpdate:
    """Create, move, resize or (npages 0) delete a memslot, within the guest_pages quota."""
    entry = engine.vm(tenant, name)
    vm = entry.vm
    old = vm.slots.by_id.get(slot)
    if npages > vm.limits.gfn_limit:  # before the quota, which it would pass
        raise InvalidArgument(f"npages {npages} exceeds the {vm.limits.gfn_bits}-bit gfn space")
    if npages and (old is None or old.info.npages != npages):
        engine.check_guest_pages(entry.tenant, npages)
    flags = SlotFlags.NONE
    if readonly:
        flags |= SlotFlags.READONLY
    if log_dirty_pages:
        flags |= SlotFlags.LOG_DIRTY_PAGES
    old_base = old.info.base_gfn if old is not None else 0
    # DELETE reports the slot as it was, so keep its description before it goes.
    old_region = MemslotView(old.info, old.tracking.counters.nonzero) if old else None
    change = vm.set_memslot(slot, base_gfn, npages, flags)
    new = vm.slots.by_id.get(slot)
    region = MemslotView(new.info, new.tracking.counters.nonzero) if new else old_region
    return RegionUpdate(change, region, old_base, vm.seq)


def memory_regions(engine: Engine, tenant: TenantId, name: str) -> list[MemslotView]:
    """The VM's memslots."""
    vm = engine.vm(tenant, name).vm
    return [
        MemslotView(s.info, s.tracking.counters.nonzero, len(s.dirty) if s.dirty else 0)
        for s in vm.slots.slots()
    ]


def dirty_log(engine: Engine, tenant: TenantId, name: str, slot: int) -> DirtyLog:
    """Read and clear a memslot's dirty log."""
    vm = engine.vm(tenant, name).vm
    bitmap = vm.get_dirty_log(slot)
    info = vm.slots.by_id[slot].info
    count = int(np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8)).sum())
    return DirtyLog(info, bitmap, count)


async def guest_access(
    engine: Engine, tenant: TenantId, name: str, access: Callable[[Vm], A],
    gpa: int, length: int, max_write_bytes: int,
) -> tuple[A, int]:
    """One guest access that may store ``length`` bytes at ``gpa``: checked against the
    guest memory quota, charged to the tenant's write rate (given back if refused),
    after block-policy streams have room. Returns its result and the simulated cycles
    it cost."""
    entry = engine.vm(tenant, name)
    if 0 < length <= max_write_bytes and 0 <= gpa < 1 << 63 and not entry.vm.holds(gpa, length):
        engine.check_memory(entry, [gpa], [length])
    if engine.must_admit(entry):  # a block-policy stream is full: wait for room
        await engine.admit(entry)
    vm = entry.vm
    before = sum(vm.stats.cycles)
    result = access(vm)  # the VM's quota guard charges the write rate
    return result, sum(vm.stats.cycles) - before


async def write_batch(
    engine: Engine, tenant: TenantId, name: str, gpa: npt.NDArray[np.uint64],
    vcpus: Sequence[int], length: npt.NDArray[np.int64], data: bytes,
    max_write_bytes: int,
) -> tuple[BatchResult, int]:
    """A batch of guest writes (``gpa`` as uint64, so no gpa wraps negative before it is
    checked; ``vcpus`` one per write, or one for all); returns the batch's result and
    the simulated cycles it cost."""
    entry = engine.vm(tenant, name)
    top = int(gpa.max())
    if top >= entry.vm.limits.gfn_limit << 12:
        raise InvalidArgument(
            f"gpa {top:#x} is outside the {entry.vm.limits.gfn_bits + 12}-bit guest"
            " physical address space"
        )
    n = len(gpa)
    if len(vcpus) == 1:
        vcpu = np.full(n, vcpus[0], dtype=np.int64)
    elif len(vcpus) == n:
        vcpu = np.array(vcpus, dtype=np.int64)
    else:
        raise InvalidArgument(
            f"vcpu has {len(vcpus)} entries; give one per write ({n}) or exactly one"
        )
    g64 = gpa.astype(np.int64)
    same = uniform(length)  # usually: one comparison instead of a min and a max
    lo, hi = (same, same) if same is not None else (int(length.min()), int(length.max()))
    if lo > 0 and hi <= max_write_bytes:
        await slices.check_memory(engine, entry, g64, length)
    if engine.must_admit(entry):  # a block-policy stream is full: wait for room
        await engine.admit(entry)
    vm = entry.vm
    before = sum(vm.stats.cycles)
    # Written in slices when large (calls on the VM wait meanwhile); the VM's quota
    # guard charges the write rate.
    result = await slices.write_batch(entry, g64, vcpu, length, data)
    return result, sum(vm.stats.cycles) - before


def read_guest(
    engine: Engine, tenant: TenantId, name: str, gpa: int, length: int, max_bytes: int
) -> GuestRead:
    """Read guest memory page by page: RAM from the VM, ranges outside every memslot
    (MMIO) as zeros, listed in ``mmio``."""
    vm = engine.vm(tenant, name).vm
    end = gpa + length
    if not 1 <= length <= max_bytes:
        raise InvalidArgument(f"length {length}: read 1..{max_bytes} bytes at a time")
    if end > vm.limits.gfn_limit << 12:
        raise InvalidArgument(
            f"gpa {gpa:#x}+{length} is outside the {vm.limits.gfn_bits + 12}-bit"
            " guest physical address space"
        )
    out = bytearray()
    mmio: list[list[int]] = []
    while gpa < end:
        plen = min(PAGE_SIZE - (gpa & (PAGE_SIZE - 1)), end - gpa)
        if vm.slots.find(gpa >> 12) is not None:
            out += vm.read(gpa, plen)
        else:
            out += bytes(plen)
            if mmio and mmio[-1][0] + mmio[-1][1] == gpa:
                mmio[-1][1] += plen
            else:
                mmio.append([gpa, plen])
        gpa += plen
    return GuestRead(bytes(out), tuple((a, n) for a, n in mmio))


def dma_write(
    engine: Engine, tenant: TenantId, name: str, gpa: int, data: bytes, max_write_bytes: int
) -> tuple[list[DmaPieceOutcome], int]:
    """A device write under the VM's DMA policy; returns each piece's outcome and the
    simulated cycles."""
    entry = engine.vm(tenant, name)
    vm = entry.vm
    if 0 < len(data) <= max_write_bytes and gpa < 1 << 62:
        engine.check_memory(entry, [gpa], [len(data)])
    before = vm.stats.dma_cycles
    result = vm.dma_write(gpa, data)
    bypass = vm.dma_policy.value == "bypass"
    pieces = []
    for p in result.pieces:
        if p.path is WritePath.EMULATED:
            outcome = "notified"
        elif bypass and vm.is_tracked(p.gpa >> 12):
            outcome = "bypassed"
        else:
            outcome = "applied"
        pieces.append(DmaPieceOutcome(p.gpa, p.length, outcome, p.seq))
    return pieces, vm.stats.dma_cycles - before
