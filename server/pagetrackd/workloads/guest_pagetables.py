"""``guest-pagetables``: a guest OS creating, forking and tearing down address spaces.

Every page-table change is a guest write, so under the shadow MMU each one that lands
on a shadowed table is trapped, emulated and zaps shadow state; processes touch their
memory between changes (translations through the shadow, which refault what was
zapped and reset flood counts). Optional stray writes hit random guest bytes,
page tables included, to check that the shadow follows guest memory whatever it
holds (the audit must stay clean).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pagetrackd.domain import PAGE_SHIFT, PAGE_SIZE
from pagetrackd.plugins.x86_paging import PTE_RW, pages_per
from pagetrackd.workloads.guest_kernel import THP_REGION, USER_REGIONS
from pagetrackd.workloads.guest_mm import AddressSpace, Process
from pagetrackd.workloads.guest_os import COMMON_OPTIONS, GuestOsWorkload
from pagetrackd.workloads.options import OptionSpec

#: operation -> weight of being picked
_OPS: dict[str, float] = {
    "touch": 0.42,
    "map": 0.14,
    "unmap": 0.09,
    "mprotect": 0.07,
    "remap_halves": 0.04,
    "fork": 0.07,
    "exit": 0.07,
    "exec": 0.04,
    "thp": 0.03,
    "unprotect": 0.03,
}


class GuestPageTables(GuestOsWorkload):
    """Address-space churn: map, unmap, mprotect, fork (COW), exit, exec, huge pages.

    Options (besides the common ones): ``processes`` to start with, ``max_processes``,
    ``pages_per_process`` touched at start, ``stray_fraction`` of operations that are
    random writes anywhere in the slot, ``unprotect_fraction`` scaling how often a
    table write is one KVM cannot emulate (unprotect first, R4.10), ``large_pages``.
    """

    kind = "guest-pagetables"
    OPTIONS = {
        **COMMON_OPTIONS,
        "processes": OptionSpec("int", 4, 1, 256),
        "max_processes": OptionSpec("int", 8, 1, 1024),
        "pages_per_process": OptionSpec("int", 16, 0, 4096),
        "stray_fraction": OptionSpec("float", 0.0, 0.0, 1.0),
        "unprotect_fraction": OptionSpec("float", 1.0, 0.0, 1.0),
        "large_pages": OptionSpec("bool", True),
    }

    def __init__(self, seed: int, options: Mapping[str, Any]) -> None:
        super().__init__(seed, options)
        weights = dict(_OPS)
        if not self.opts["large_pages"]:
            weights["thp"] = 0.0
        weights["unprotect"] *= float(self.opts["unprotect_fraction"])
        total = sum(weights.values())
        self._op_names = list(weights)
        self._op_p = [w / total for w in weights.values()]

    def boot(self) -> None:
        """Start ``processes`` processes, each touching ``pages_per_process`` pages."""
        for i in range(int(self.opts["processes"])):
            self._spawn(i % self.vcpus)

    def _spawn(self, vcpu: int) -> Process:
        self._plan_vcpu = vcpu
        mm = AddressSpace(self.guest)
        proc = self.new_process(mm)
        self.run_on(vcpu, mm)
        for _ in range(int(self.opts["pages_per_process"])):
            gva = self.random_user_gva()
            if self.demand_fault(mm, gva, True):
                self.data_write(mm, gva, 8)
        self.counts["execs"] += 1
        return proc

    def plan_op(self) -> None:
        """Pick one operation by weight (or a stray write) and plan it."""
        rng = self.rng
        vcpu = int(rng.integers(self.vcpus))
        self._plan_vcpu = vcpu
        if rng.random() < float(self.opts["stray_fraction"]):
            self._stray()
            return
        op = self._op_names[int(rng.choice(len(self._op_names), p=self._op_p))]
        if not self.processes:
            op = "exec"
        getattr(self, f"_op_{op}")(vcpu)

    def _pick(self) -> Process:
        return self.processes[int(self.rng.integers(len(self.processes)))]

    def _pick_leaf(self, mm: AddressSpace, *, small: bool = True) -> int | None:
        gvas = [g for g, leaf in mm.leaves.items() if not small or leaf.level == 1]
        if not gvas:
            return None
        return gvas[int(self.rng.integers(len(gvas)))]

    def _stray(self) -> None:
        """A write of random bytes to a random place: half the time into a live page
        table (a guest bug, or memory the guest reuses), else anywhere in the slot."""
        os = self.guest
        if self.processes and self.rng.random() < 0.5:
            mm = self._pick().mm
            live = list(mm.tables)
            gfn = live[int(self.rng.integers(len(live)))]
        else:
            span = os.alloc.end_gfn - os.alloc.base_gfn
            gfn = os.alloc.base_gfn + int(self.rng.integers(span))
        nbytes = int(self.rng.choice([1, 2, 4, 8, 8, 16]))
        offset = int(self.rng.integers(PAGE_SIZE - nbytes + 1))
        os.kwrite((gfn << PAGE_SHIFT) + offset, self.rng.bytes(nbytes), "stray")

    # -------------------------------------------------------------- operations

    def _op_touch(self, vcpu: int) -> None:
        proc = self._pick()
        mm = proc.mm
        self.run_on(vcpu, mm)
        for _ in range(int(self.rng.integers(1, 5))):
            gva = self._pick_leaf(mm, small=False) if self.rng.random() < 0.8 else None
            if gva is None:
                gva = self.random_user_gva()
            gva += int(self.rng.integers(PAGE_SIZE)) & ~7
            write = bool(self.rng.random() < 0.6)
            if self.demand_fault(mm, gva, write) and write:
                self.data_write(mm, gva, int(self.rng.choice([1, 4, 8, 8, 64])))

    def _op_map(self, vcpu: int) -> None:
        proc = self._pick()
        self.run_on(vcpu, proc.mm)
        gva = self.random_user_gva()
        if self.demand_fault(proc.mm, gva, True):
            self.data_write(proc.mm, gva, 8)

    def _op_unmap(self, vcpu: int) -> None:
        proc = self._pick()
        mm = proc.mm
        self.run_on(vcpu, mm)
        gva = self._pick_leaf(mm, small=False)
        if gva is None:
            return
        leaf = mm.unmap(gva)
        self.guest.put_frame(leaf.gfn, leaf.level)
        self._emit_touch(gva, False)  # the next access faults into the guest

    def _op_mprotect(self, vcpu: int) -> None:
        proc = self._pick()
        mm = proc.mm
        self.run_on(vcpu, mm)
        gva = self._pick_leaf(mm)
        if gva is None or mm.leaves[gva].cow:
            return
        writable = not mm.leaves[gva].entry & PTE_RW
        mm.set_writable(gva, writable)
        self._emit_touch(gva, writable)

    def _op_remap_halves(self, vcpu: int) -> None:
        proc = self._pick()
        mm = proc.mm
        self.run_on(vcpu, mm)
        gva = self._pick_leaf(mm)
        if gva is None:
            return
        leaf = mm.leaves[gva]
        if leaf.cow or self.guest.refs.get(leaf.gfn, 0) != 1:
            return
        new = self.guest.get_frame()
        if new is None:
            return
        old = leaf.gfn
        mm.remap_halves(gva, new)
        self.guest.put_frame(old)
        self._emit_touch(gva, bool(leaf.entry & PTE_RW))

    def _op_fork(self, vcpu: int) -> None:
        if len(self.processes) >= int(self.opts["max_processes"]):
            self._op_exit(vcpu)
            return
        parent = self._pick()
        self.run_on(vcpu, parent.mm)
        child = self.new_process(parent.mm.fork())
        self.counts["forks"] += 1
        self.run_on(vcpu, child.mm)
        for _ in range(2):
            gva = self._pick_leaf(child.mm)
            if gva is not None and self.demand_fault(child.mm, gva, True):
                self.data_write(child.mm, gva, 8)

    def _op_exit(self, vcpu: int) -> None:
        if len(self.processes) <= 1:
            self._op_fork(vcpu) if self.processes else self._spawn(vcpu)
            return
        self.exit_process(self._pick())

    def _op_exec(self, vcpu: int) -> None:
        if len(self.processes) > 1:
            self.exit_process(self._pick())
        self._spawn(vcpu)

    def _op_thp(self, vcpu: int) -> None:
        proc = self._pick()
        mm = proc.mm
        self.run_on(vcpu, mm)
        base, pages = USER_REGIONS[THP_REGION]
        gva = base + (int(self.rng.integers(pages // pages_per(2))) << 21)
        if not mm.can_map(gva, 2):
            return
        gfn = self.guest.get_frame(2)
        if gfn is None:
            return
        self.guest.kwrite(gfn << PAGE_SHIFT, bytes(PAGE_SIZE), "kernel")
        mm.map(gva, gfn, 2)
        inner = gva + (int(self.rng.integers(pages_per(2))) << PAGE_SHIFT)
        self._emit_touch(inner, True)
        self.data_write(mm, inner, 8)

    def _op_unprotect(self, vcpu: int) -> None:
        """A PTE update KVM cannot emulate: unprotect the table's gfn (zapping its
        shadow pages), then the guest re-executes the write natively (R4.10)."""
        proc = self._pick()
        mm = proc.mm
        self.run_on(vcpu, mm)
        gva = self._pick_leaf(mm)
        if gva is None or mm.leaves[gva].cow:
            return
        self.emit_unprotect(mm.entry_gpa(gva, 1) >> PAGE_SHIFT)
        mm.set_writable(gva, not mm.leaves[gva].entry & PTE_RW)
