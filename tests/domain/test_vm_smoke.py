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


def test_split_write_emulates_only_the_tracked_page() -> None:
    """A write across a page boundary is split; only the tracked half is notified."""
    vm = Registry().create_vm(TenantId("t"), "vm1")
    vm.set_memslot(0, 0x100, 16)
    vm.track_add([0x101])
    rec = Recorder()
    vm.register_notifier(rec)
    result = vm.write(0, 0x101FFC, b"ABCDEFGH")
    assert [p.path for p in result.pieces] == [WritePath.EMULATED, WritePath.FAST]
    assert [(e.gpa, e.data, e.seq) for e in rec.events] == [(0x101FFC, b"ABCD", 1)]
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
