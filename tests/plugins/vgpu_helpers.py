"""Helpers for the vGPU tests: a hand-built PPGTT in guest memory and an event sink."""

from __future__ import annotations

from pagetrackd.domain import PAGE_SHIFT, DmaPolicy, Semantics, Vm, WriteEvent
from pagetrackd.plugins.vgpu import PTE_PRESENT, PTE_RW, Vgpu, level_shift, va_index

TABLE_BASE = 0x100  # slot 0: page tables
DATA_BASE = 0x1000  # slot 1: data pages
PML4, PDP, PD, PT = 0x100, 0x101, 0x102, 0x103
PT2 = 0x104  # a second page table, unlinked at first
VA0 = 0  # PT maps va 0 .. 2 MiB


def pte(gfn: int, flags: int = PTE_PRESENT | PTE_RW) -> int:
    """A gen8 entry naming ``gfn``."""
    return (gfn << PAGE_SHIFT) | flags


def entry_gpa(table_gfn: int, index: int) -> int:
    """Guest physical address of entry ``index`` of a table page."""
    return (table_gfn << PAGE_SHIFT) + 8 * index


def put(vm: Vm, table_gfn: int, index: int, value: int) -> None:
    """One 8-byte guest write of an entry."""
    vm.write(0, entry_gpa(table_gfn, index), value.to_bytes(8, "little"))


def put_half(vm: Vm, table_gfn: int, index: int, value: int, high: bool) -> None:
    """One 4-byte guest write of half an entry."""
    data = value.to_bytes(8, "little")
    off = 4 if high else 0
    vm.write(0, entry_gpa(table_gfn, index) + off, data[off : off + 4])


def make_vm(
    leaves: int = 8,
    dma_policy: DmaPolicy = DmaPolicy.BYPASS,
    semantics: Semantics = Semantics.V2016,
) -> Vm:
    """A VM with a 4-level PPGTT at PML4 mapping va page i -> DATA_BASE + i for i < leaves
    (written before any vGPU sees it, so by fast-path writes)."""
    vm = Vm("gpu", dma_policy=dma_policy, semantics=semantics)
    vm.set_memslot(0, TABLE_BASE, 64)
    vm.set_memslot(1, DATA_BASE, 1024)
    put(vm, PML4, 0, pte(PDP))
    put(vm, PDP, 0, pte(PD))
    put(vm, PD, 0, pte(PT))
    for i in range(leaves):
        put(vm, PT, i, pte(DATA_BASE + i))
    return vm


def attach(vm: Vm, **options: object) -> Vgpu:
    """Attach a vGPU and shadow the PPGTT at PML4 (ppgtt 0)."""
    vgpu = Vgpu()
    vgpu.attach(vm, **options)
    vgpu.call("build_ppgtt", root_gpa=PML4 << PAGE_SHIFT)
    return vgpu


def va_of(vpn: int) -> int:
    """GPU va of page ``vpn`` under the hand-built tables (only PT, vpn < 512)."""
    return vpn << PAGE_SHIFT


def frame_of(vgpu: Vgpu, va: int) -> tuple[int, bool]:
    """(host frame, scratch?) that the shadow gives for ``va``."""
    out = vgpu.call("translate", va=va, ppgtt=0)
    return out["host_frame"], out["scratch"]


def gfn_of(vgpu: Vgpu, va: int) -> int:
    """The guest gfn behind the host frame the shadow gives for ``va`` (-1: scratch)."""
    return int(vgpu.call("translate", va=va, ppgtt=0)["guest_gfn"])


class Sink:
    """A plain notifier that keeps every event."""

    name = "sink"
    external = True

    def __init__(self) -> None:
        self.events: list[tuple[int, int, int, bytes, int]] = []

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        self.events.append((event.seq, event.vcpu, event.gpa, event.data, int(event.source)))

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        pass


def memory_image(vm: Vm) -> dict[int, bytes]:
    """Every written guest page, by gfn."""
    out = {}
    for slot in vm.slots.slots():
        for index in slot.memory.written_pages():
            gfn = slot.base_gfn + index
            out[gfn] = vm.read(gfn << PAGE_SHIFT, 1 << PAGE_SHIFT)
    return out


__all__ = [
    "DATA_BASE", "PD", "PDP", "PML4", "PT", "PT2", "Sink", "attach", "entry_gpa", "frame_of",
    "gfn_of", "level_shift", "make_vm", "memory_image", "put", "put_half", "pte", "va_index",
    "va_of",
]
