"""End-to-end walk through the core: slot, tracking, a split write, a notifier."""

from __future__ import annotations

from pagetrackd.domain import Registry, TenantId, Vm, WriteEvent, WritePath


class Recorder:
    """A notifier that records what it is told."""

    name = "recorder"
    external = True

    def __init__(self) -> None:
        self.events: list[WriteEvent] = []
        self.regions: list[tuple[int, int]] = []

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        self.events.append(event)

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        self.regions.append((base_gfn, npages))


def test_split_write_from_a_tracked_page_emulates_and_notifies_both_pieces() -> None:
    """A write across a page boundary is split; it traps on the tracked page, so both
    pieces are emulated and notified, the untracked one flagged (R4.3)."""
    vm = Registry().create_vm(TenantId("t"), "vm1")
    vm.set_memslot(0, 0x100, 16)
    vm.track_add([0x101])
    rec = Recorder()
    vm.register_notifier(rec)
    result = vm.write(0, 0x101FFC, b"ABCDEFGH")
    assert [p.path for p in result.pieces] == [WritePath.EMULATED, WritePath.EMULATED]
    assert [(e.gpa, e.data, e.seq, e.untracked) for e in rec.events] == [
        (0x101FFC, b"ABCD", 1, False), (0x102000, b"EFGH", 2, True)
    ]
    assert vm.read(0x101FFC, 8) == b"ABCDEFGH"


def test_delete_vm_tells_notifiers_every_region_is_gone() -> None:
    """Deleting a VM reports each slot's range to its notifiers before freeing it."""
    reg = Registry()
    vm = reg.create_vm(TenantId("t"), "vm1")
    vm.set_memslot(0, 0x100, 16)
    vm.set_memslot(1, 0x200, 8)
    rec = Recorder()
    vm.register_notifier(rec)
    reg.delete_vm(TenantId("t"), "vm1")
    assert rec.regions == [(0x100, 16), (0x200, 8)]
    assert len(vm.notifiers) == 0
