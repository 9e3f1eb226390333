"""The guest-OS workloads: guest-pagetables and kernel-build, under the shadow MMU."""

from __future__ import annotations

from typing import Any

import pytest

from pagetrackd.domain import InvalidArgument, Vm, WriteEvent, WriteResult
from pagetrackd.plugins.shadow_mmu import ShadowMmu
from pagetrackd.workloads import WORKLOADS
from pagetrackd.workloads.guest_pagetables import GuestPageTables
from pagetrackd.workloads.kernel_build import KernelBuild, compare


class Recorder:
    """An external notifier recording every event."""

    name = "recorder"
    external = True

    def __init__(self) -> None:
        self.events: list[tuple[int, int, int, bytes]] = []

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        self.events.append((event.seq, event.vcpu, event.gpa, event.data))

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        return None


class RecordingVm(Vm):
    """A VM that remembers every guest write made to it."""

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        self.log: list[tuple[int, int, bytes]] = []

    def write(self, vcpu: int, gpa: int, data: bytes) -> WriteResult:
        self.log.append((vcpu, gpa, bytes(data)))
        return super().write(vcpu, gpa, data)


def run(kind: str, seed: int, options: dict[str, Any], *, chunk: int, vm: Vm | None = None):
    vm = vm or Vm(f"{kind}-{seed}", vcpus=4)
    workload = WORKLOADS[kind](seed, options)
    workload.setup(vm)
    while workload.step(vm, chunk):
        pass
    return vm, workload


def test_workloads_are_registered_by_kind() -> None:
    """WORKLOADS holds both guest-OS kinds."""
    assert WORKLOADS["guest-pagetables"] is GuestPageTables
    assert WORKLOADS["kernel-build"] is KernelBuild


def test_audit_stays_clean_under_guest_pagetables_with_random_guest_writes() -> None:
    """Address-space churn plus stray writes into any guest page (page tables
    included): every periodic audit and the final one find zero mismatches."""
    options = {"writes": 2500, "stray_fraction": 0.3, "audit_every": 15}
    vm, wl = run("guest-pagetables", 11, options, chunk=256)
    report = wl.report()
    assert report["writes"] == 2500 and report["stray_writes"] > 50
    assert report["audits"] > 10 and report["audit_mismatches"] == 0
    assert report["forks"] > 0 and report["exits"] > 0 and report["cow_breaks"] > 0
    assert report["emulations"] > 0 and report["shadow_faults"] > 0
    assert report["shadow_flooded"] + report["shadow_misaligned"] > 0
    assert isinstance(wl.mmu, ShadowMmu)
    final = wl.mmu.audit()
    assert final.checked > 0 and final.clean


def test_same_seed_gives_the_same_writes_and_events_whatever_the_step_sizes() -> None:
    """Determinism: equal seeds give equal events, memory effects and shadow state,
    whether stepped one write at a time or in big chunks; another seed differs."""
    options = {"writes": 1200, "stray_fraction": 0.05}
    runs = []
    for seed, chunk in ((5, 1), (5, 997), (6, 997)):
        vm = Vm("det", vcpus=4)
        rec = Recorder()
        vm.register_notifier(rec)
        _, wl = run("guest-pagetables", seed, options, chunk=chunk, vm=vm)
        assert wl.mmu is not None
        runs.append((rec.events, vm.seq, wl.report(), wl.mmu.status()))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]
    assert len(runs[0][0]) > 100


def test_kernel_build_makes_the_same_writes_with_and_without_tracking() -> None:
    """tracking only changes how writes are handled, never which: same sequence, but
    only the tracked run emulates and takes shadow faults."""
    logs = {}
    reports = {}
    for tracking in (True, False):
        vm = RecordingVm("kb", vcpus=4)
        _, wl = run(
            "kernel-build", 3, {"writes": 3000, "tracking": tracking}, chunk=512, vm=vm
        )
        logs[tracking] = vm.log
        reports[tracking] = wl.report()
    assert logs[True] == logs[False] and len(logs[True]) == 3000
    on, off = reports[True], reports[False]
    assert on["tracking"] == "shadow_mmu" and off["tracking"] == "none"
    assert on["data_writes"] > on["table_writes"] > 0
    assert on["emulations"] > 0 and off["emulations"] == 0 and off["fast_writes"] == 3000
    assert on["shadow_faults"] > 0 and "shadow_faults" not in off
    assert on["cycles"] == on["write_cycles"] + on["fault_cycles"] > 0
    assert off["cycles"] == 0


def test_kernel_build_compare_puts_both_runs_side_by_side() -> None:
    """compare(): the tracked run costs extra emulations and cycles."""
    out = compare(9, {"jobs": 2}, writes=2000)
    assert out["tracked"]["writes"] == out["untracked"]["writes"] == 2000
    assert out["extra_emulations"] > 0 and out["extra_cycles"] > 0
    assert out["extra_cpu_seconds"] > 0


def test_kernel_build_tracked_fraction_tracks_data_frames_too() -> None:
    """tracked_fraction: some faulted-in data frames are tracked by the workload, so
    data writes are emulated even without the shadow MMU."""
    vm, wl = run(
        "kernel-build", 4, {"writes": 2000, "tracking": False, "tracked_fraction": 0.5},
        chunk=512,
    )
    assert wl.report()["emulations"] > 0


def test_workload_reuses_an_attached_shadow_mmu() -> None:
    """A shadow MMU already attached (through the API) is used, not doubled."""
    vm = Vm("reuse", vcpus=2)
    vm.set_memslot(0, 0x40000, 1 << 16)
    mmu = ShadowMmu()
    mmu.attach(vm)
    wl = GuestPageTables(1, {"writes": 200})
    wl.setup(vm)
    while wl.step(vm, 64):
        pass
    assert wl.mmu is mmu and not wl.mmu_attached_here
    assert len(vm.notifiers) == 1
    assert int(mmu.status()["faults"]) > 0


def test_options_are_checked_and_parsed_from_strings() -> None:
    """Unknown keys and bad values raise InvalidArgument; API strings are parsed."""
    with pytest.raises(InvalidArgument, match="bogus"):
        GuestPageTables(1, {"bogus": 1})
    with pytest.raises(InvalidArgument, match="stray_fraction"):
        GuestPageTables(1, {"stray_fraction": 2.0})
    with pytest.raises(InvalidArgument, match="tracking"):
        KernelBuild(1, {"tracking": "maybe"})
    wl = KernelBuild(1, {"writes": "100", "tracking": "false", "jobs": "2"})
    assert wl.opts["writes"] == 100 and wl.opts["tracking"] is False and len(wl.jobs) == 2
    vm, done = run("kernel-build", 1, {"writes": "100", "tracking": "false"}, chunk=30)
    assert done.report()["writes"] == 100
