"""A guest OS model: frames, x86-64 page tables built with guest writes, processes.

Everything here happens *inside the guest*: page tables are created, changed and torn
down by guest writes (``vm.write``), so when the shadow MMU write-tracks a table the
write is trapped, emulated and reaches the plugin exactly as in KVM. The kernel
reaches physical memory through its direct map (2 MiB / 1 GiB pages over all RAM, as
Linux's ``__PAGE_OFFSET`` map), which is what makes the shadow MMU split large pages
over frames that hold page tables.

Two ways to use it:

* tests call :class:`GuestOs` (:mod:`.guest_kernel`) / :class:`AddressSpace`
  (:mod:`.guest_mm`), re-exported here, with the default *immediate* emitter: every
  write is made at once;
* workloads (:class:`GuestOsWorkload`) plan operations into a queue of actions and
  run them in ``step``, so the sequence of writes and events depends only on the
  seed, never on how the runner slices the steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from pagetrackd.domain import (
    PAGE_SHIFT,
    PAGE_SIZE,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Vm,
)
from pagetrackd.limits import MAX_VCPUS
from pagetrackd.plugins.shadow_mmu import ShadowMmu
from pagetrackd.plugins.x86_paging import PTE_RW
from pagetrackd.workloads.guest_kernel import DIRECT_MAP, USER_REGIONS, GuestOs
from pagetrackd.workloads.guest_mm import AddressSpace, Process
from pagetrackd.workloads.options import OptionSpec, parse_options

# ====================================================================== workloads

_WRITE, _TOUCH, _ROOT, _UNPROTECT, _AUDIT, _TRACK, _UNTRACK = range(7)


#: options every guest-OS workload takes
COMMON_OPTIONS: Final[dict[str, OptionSpec]] = {
    "writes": OptionSpec("int", 0, 0, 1 << 62),  # stop after this many writes; 0 = never
    "vcpus": OptionSpec("int", 2, 0, MAX_VCPUS),  # 0 = 1
    "slot": OptionSpec("int", 0, 0, 508),
    "base_gfn": OptionSpec("int", 0x40000, 0, 1 << 39),
    "pages": OptionSpec("int", 1 << 16, 1024, 1 << 24),
    "flood_threshold": OptionSpec("int", 3, 1, 1000),
    "audit_every": OptionSpec("int", 0, 0, 1 << 30),  # ops between audits; 0 = never
}


class GuestOsWorkload:
    """Base of the guest-OS workloads: options, setup, the action queue and step.

    Subclasses plan one operation at a time in :meth:`plan_op`, using only the
    seeded generator and the guest's own bookkeeping; nothing planned depends on
    what the shadow MMU does, so the same seed gives the same writes with or
    without it.
    """

    kind = "guest-os"
    OPTIONS: dict[str, OptionSpec] = COMMON_OPTIONS

    def __init__(self, seed: int, options: Mapping[str, Any]) -> None:
        self.seed = seed
        self.opts = parse_options(self.kind, self.OPTIONS, options)
        self.rng = np.random.default_rng(seed)
        self.vcpus = max(1, int(self.opts["vcpus"]))
        self.limit = int(self.opts["writes"])
        self._queue: deque[tuple[int, int, Any, Any]] = deque()
        self._vm: Vm | None = None
        self.mmu: ShadowMmu | None = None
        self.mmu_attached_here = False
        self.os: GuestOs | None = None
        self.processes: list[Process] = []
        self._next_pid = 1
        self._running: dict[int, AddressSpace | None] = {}  # vcpu -> mm, at plan time
        self._plan_vcpu = 0
        self._ops = 0
        self._planned = 0  #: writes planned so far
        self._kdata: int | None = None
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "writes", "table_writes", "data_writes", "kernel_writes", "stray_writes",
                "touches", "guest_faults", "root_switches", "forks", "execs", "exits",
                "cow_breaks", "unprotects", "audits", "audit_mismatches", "ops",
            ),
            0,
        )
        self._base_stats: tuple[list[int], list[int]] = ([0, 0, 0], [0, 0, 0])
        self._base_mmu: dict[str, int | str] = {}

    # -------------------------------------------------------------- setup

    def want_mmu(self) -> bool:
        """Whether this run uses the shadow MMU (and so tracks guest tables)."""
        return True

    def setup(self, vm: Vm) -> None:
        """Create the memslot if missing, find or attach the shadow MMU, boot the
        guest kernel (direct map) and plan the first processes."""
        if self.vcpus > vm.vcpus:
            raise InvalidArgument(f"{self.kind}: {self.vcpus} vcpus asked, the VM has {vm.vcpus}")
        slot_id = int(self.opts["slot"])
        existing = next((s for s in vm.memslots() if s.slot_id == slot_id), None)
        if existing is None:
            vm.set_memslot(slot_id, int(self.opts["base_gfn"]), int(self.opts["pages"]))
            base, npages = int(self.opts["base_gfn"]), int(self.opts["pages"])
        else:
            base, npages = existing.base_gfn, existing.npages
        self._vm = vm
        if self.want_mmu():
            for node in vm.notifiers.nodes():
                if isinstance(node.notifier, ShadowMmu):
                    self.mmu = node.notifier
                    break
            else:
                self.mmu = ShadowMmu()
                self.mmu.attach(vm, flood_threshold=int(self.opts["flood_threshold"]))
                self.mmu_attached_here = True
            self._base_mmu = self.mmu.status()
        self._base_stats = (list(vm.stats.pieces), list(vm.stats.cycles))
        try:
            self.os = GuestOs(
                vm, base, npages, write=self._emit_write, touch=self._emit_touch,
                direct_map=True,
            )
            for vcpu in range(self.vcpus):
                self._queue.append((_ROOT, vcpu, self.os.swapper_cr3, None))
                self._running[vcpu] = None
            self.boot()
        except BaseException:
            # A refused start changes nothing: undo the MMU and the slot made above
            # (booting only plans writes, so guest memory is untouched).
            if self.mmu is not None and self.mmu_attached_here:
                self.mmu.detach()
                self.mmu, self.mmu_attached_here = None, False
            if existing is None:
                vm.set_memslot(slot_id, base, 0)
            raise

    def boot(self) -> None:
        """Plan what the guest does right after boot (subclasses start processes)."""

    # -------------------------------------------------------------- planning helpers

    def _emit_write(self, gpa: int, data: bytes, tag: str) -> None:
        self._planned += 1
        self._queue.append((_WRITE, self._plan_vcpu, gpa, (data, tag)))

    def _emit_touch(self, gva: int, write: bool) -> None:
        self._queue.append((_TOUCH, self._plan_vcpu, gva, write))

    def emit_audit(self) -> None:
        """Plan an audit of the shadow MMU at this point of the stream."""
        self._queue.append((_AUDIT, 0, 0, None))

    def emit_unprotect(self, gfn: int) -> None:
        """Plan an unprotect of ``gfn`` (emulation gave up; R4.10)."""
        self._queue.append((_UNPROTECT, self._plan_vcpu, gfn, None))

    def emit_track(self, gfn: int, on: bool) -> None:
        """Plan a tenant-style tracking reference add (or remove) on a data frame."""
        self._queue.append((_TRACK if on else _UNTRACK, 0, gfn, None))

    @property
    def guest(self) -> GuestOs:
        """The guest OS model (after setup)."""
        if self.os is None:
            raise FailedPrecondition(f"{self.kind}: setup() has not run")
        return self.os

    def run_on(self, vcpu: int, mm: AddressSpace | None) -> None:
        """Schedule ``mm`` (None: the kernel's own ``swapper_pg_dir``) on ``vcpu``: a
        CR3 load if it is not already running there."""
        self._plan_vcpu = vcpu
        if self._running.get(vcpu) is not mm:
            self._running[vcpu] = mm
            cr3 = self.guest.swapper_cr3 if mm is None else mm.cr3
            self._queue.append((_ROOT, vcpu, cr3, None))

    def forget_mm(self, mm: AddressSpace) -> None:
        """``mm`` is gone: vCPUs that ran it switch to the kernel's address space."""
        current = self._plan_vcpu
        for vcpu, running in list(self._running.items()):
            if running is mm:
                self.run_on(vcpu, None)
        self._plan_vcpu = current

    def new_process(self, mm: AddressSpace) -> Process:
        """Register a process for ``mm``."""
        proc = Process(self._next_pid, mm)
        self._next_pid += 1
        self.processes.append(proc)
        return proc

    def exit_process(self, proc: Process) -> None:
        """Tear the process's address space down (on the vCPU planning now)."""
        self.processes.remove(proc)
        self.run_on(self._plan_vcpu, proc.mm)  # exit_mmap runs in the dying task
        proc.mm.destroy()
        self.forget_mm(proc.mm)
        self.counts["exits"] += 1

    def demand_fault(self, mm: AddressSpace, gva: int, write: bool) -> bool:
        """The guest touches ``gva``: a user access through the MMU; if the guest has
        no mapping it takes the fault and maps a fresh zeroed frame (clear_page through
        the direct map, then set_pte), and the access is retried. A write to a COW
        page copies it first. False if the access cannot be satisfied."""
        os = self.guest
        found = mm.find(gva)
        self._emit_touch(gva, write)
        self.counts["touches"] += 1
        if found is None:
            self.counts["guest_faults"] += 1
            gfn = os.get_frame()
            if gfn is None:
                return False
            self.new_frame(gfn)
            os.kwrite(gfn << PAGE_SHIFT, bytes(PAGE_SIZE), "kernel")
            mm.map(gva & ~(PAGE_SIZE - 1), gfn, 1, writable=True)
            self._emit_touch(gva, write)
            return True
        base, leaf = found
        if write and not leaf.entry & PTE_RW:
            if not leaf.cow:
                return False  # SIGSEGV: mprotect'ed read-only
            self.counts["guest_faults"] += 1
            self.counts["cow_breaks"] += 1
            if os.refs.get(leaf.gfn, 1) == 1:
                mm.set_writable(base, True)  # last user: just make it writable again
                leaf.cow = False
            else:
                new = os.get_frame()
                if new is None:
                    return False
                os.kwrite(new << PAGE_SHIFT, self.rng.bytes(64) * (PAGE_SIZE // 64), "kernel")
                mm.unmap(base)
                os.put_frame(leaf.gfn, leaf.level)
                mm.map(base, new, 1, writable=True)
            self._emit_touch(gva, write)
        return True

    def new_frame(self, gfn: int) -> None:
        """Hook: a demand fault is about to map the fresh frame ``gfn``."""

    def data_write(self, mm: AddressSpace, gva: int, nbytes: int) -> None:
        """The process stores ``nbytes`` at ``gva`` (within its page), after the access."""
        found = mm.find(gva)
        if found is None:
            return
        base, leaf = found
        gpa = (leaf.gfn << PAGE_SHIFT) + (gva - base)
        nbytes = min(nbytes, PAGE_SIZE - (gpa & (PAGE_SIZE - 1)))
        self._emit_write(gpa, self.rng.bytes(nbytes), "data")

    def random_user_gva(self, region: int | None = None) -> int:
        """A page-aligned gva in one of the user regions."""
        r = int(self.rng.integers(len(USER_REGIONS))) if region is None else region
        base, pages = USER_REGIONS[r]
        return base + (int(self.rng.integers(pages)) << PAGE_SHIFT)

    def plan_op(self) -> None:
        """Plan one operation (subclasses)."""
        raise NotImplementedError

    def _kernel_scribble(self) -> None:
        """A kernel store to its own per-CPU data (a frame taken at boot)."""
        os = self.guest
        if self._kdata is None:
            self._kdata = os.get_frame()
            if self._kdata is None:
                raise ResourceExhausted(f"{self.kind}: guest out of memory")
        offset = (self._plan_vcpu * 64) % PAGE_SIZE
        os.kwrite((self._kdata << PAGE_SHIFT) + offset, self.rng.bytes(8), "kernel")

    # -------------------------------------------------------------- running

    def step(self, vm: Vm, max_writes: int) -> int:
        """Run planned actions until ``max_writes`` writes were made (planning more as
        the queue drains); 0 when the write limit is reached."""
        if self._vm is None:
            raise FailedPrecondition(f"{self.kind}: setup() has not run")
        done = 0
        queue = self._queue
        counts = self.counts
        mmu = self.mmu
        while True:
            if self.limit and counts["writes"] >= self.limit:
                return done
            if not queue:
                self._ops += 1
                counts["ops"] += 1
                planned = self._planned
                self.plan_op()
                if self._planned == planned:
                    # Nothing to write this time (a read, a refused access): the kernel
                    # updates its own bookkeeping, so every operation writes.
                    self._kernel_scribble()
                every = int(self.opts["audit_every"])
                if every and self._ops % every == 0:
                    self.emit_audit()
                continue
            action, vcpu, a, b = queue[0]
            if action == _WRITE:
                if done >= max_writes:
                    return done
                queue.popleft()
                data, tag = b
                vm.write(vcpu, a, data)
                done += 1
                counts["writes"] += 1
                counts[f"{tag}_writes"] += 1
                continue
            queue.popleft()
            if action == _TOUCH:
                if mmu is not None:
                    mmu.translate(a, write=b, vcpu=vcpu)
            elif action == _ROOT:
                counts["root_switches"] += 1
                if mmu is not None:
                    mmu.call("set_root", cr3=a, vcpu=vcpu)
            elif action == _TRACK:
                vm.track_add([a], owner=f"workload:{self.kind}")
            elif action == _UNTRACK:
                vm.track_remove([a], owner=f"workload:{self.kind}")
            elif mmu is None:
                continue
            elif action == _UNPROTECT:
                mmu.unprotect(a, vcpu=vcpu)
                counts["unprotects"] += 1
            elif action == _AUDIT:
                report = mmu.audit()
                counts["audits"] += 1
                counts["audit_mismatches"] += len(report.mismatches)

    def report(self) -> dict[str, int | float | str]:
        """Writes by kind and path, guest activity, shadow-MMU figures, cycles."""
        out: dict[str, int | float | str] = dict(self.counts)
        out["processes"] = len(self.processes)
        vm = self._vm
        if vm is None:
            return out
        p0, c0 = self._base_stats
        pieces = [a - b for a, b in zip(vm.stats.pieces, p0, strict=True)]
        cycles = [a - b for a, b in zip(vm.stats.cycles, c0, strict=True)]
        out["mmio_exits"], out["fast_writes"], out["emulations"] = pieces
        write_cycles = sum(cycles)
        out["write_cycles"] = write_cycles
        fault_cycles = 0
        if self.mmu is not None and self.mmu.status().get("attached"):
            now = self.mmu.status()
            for key in (
                "faults", "hits", "emulated_faults", "guest_faults", "shadow_pages_created",
                "zapped", "flooded", "misaligned", "unprotected", "evicted", "sptes_zapped",
            ):
                out[f"shadow_{key}"] = int(now[key]) - int(self._base_mmu.get(key, 0))
            out["shadow_pages"] = now["shadow_pages"]
            # A shadow fault that ends in emulation is already charged as the emulated
            # write; the others are exits of their own (in-kernel, like an emulation).
            exits = int(out["shadow_faults"]) - int(out["shadow_emulated_faults"])
            fault_cycles = exits * vm.cost.emulate_cycles
        out["fault_cycles"] = fault_cycles
        out["cycles"] = write_cycles + fault_cycles
        out["cpu_seconds"] = (write_cycles + fault_cycles) / vm.cost.host_hz
        out["tracking"] = "shadow_mmu" if self.mmu is not None else "none"
        return out


__all__ = [
    "COMMON_OPTIONS",
    "DIRECT_MAP",
    "AddressSpace",
    "GuestOs",
    "GuestOsWorkload",
    "OptionSpec",
    "Process",
]
