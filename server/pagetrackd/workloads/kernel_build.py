"""``kernel-build``: a kernel-build-like mix, with or without shadow-MMU tracking.

Modelled on the seed thread's measurement (a guest building the kernel; the seed
reported real 461.63 s vs 455.48 s and sys 1995.39 s vs 1922.57 s): ``make`` forks a
compiler job per source file; each job execs (a fresh address space mapping the
compiler's shared text), works on a private heap with mostly small data writes,
demand-faulting pages in, and exits, tearing its tables down.

With ``tracking=true`` the shadow MMU is attached: guest page-table writes are
trapped and emulated, and shadow page faults are exits. With ``tracking=false`` (the
TDP case) the same guest makes the same writes, all native. The same seed gives the
same writes either way, so two runs compare side by side (:func:`compare`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pagetrackd.domain import PAGE_SHIFT, PAGE_SIZE, Vm
from pagetrackd.workloads.guest_kernel import USER_REGIONS
from pagetrackd.workloads.guest_mm import AddressSpace, Process
from pagetrackd.workloads.guest_os import COMMON_OPTIONS, GuestOsWorkload
from pagetrackd.workloads.options import OptionSpec

_TEXT_REGION = 0
_HEAP_REGION = 1
#: sizes of a job's stores, bytes: mostly word stores, some memcpy bursts
_STORE_SIZES = (8, 8, 8, 8, 4, 16, 64, 256)


class KernelBuild(GuestOsWorkload):
    """``make -jN``: short-lived compiler jobs, mostly data writes, table churn.

    Options (besides the common ones): ``tracking`` (attach the shadow MMU, default
    true), ``jobs`` running at once, ``job_pages`` (heap working set per job),
    ``job_writes`` (data writes per job before it exits), ``text_pages`` (shared
    compiler text mapped by each job), ``tracked_fraction`` of newly faulted data
    frames that the workload also write-tracks (other tracking users).
    """

    kind = "kernel-build"
    OPTIONS = {
        **COMMON_OPTIONS,
        "tracking": OptionSpec("bool", True),
        "jobs": OptionSpec("int", 4, 1, 256),
        "job_pages": OptionSpec("int", 64, 1, 2048),
        "job_writes": OptionSpec("int", 2000, 1, 1 << 20),
        "text_pages": OptionSpec("int", 16, 1, 512),
        "tracked_fraction": OptionSpec("float", 0.0, 0.0, 1.0),
    }

    def __init__(self, seed: int, options: Mapping[str, Any]) -> None:
        super().__init__(seed, options)
        self.jobs: list[Process | None] = [None] * int(self.opts["jobs"])
        self.make: Process | None = None
        self.text: list[int] = []
        self._tracked: set[int] = set()

    def want_mmu(self) -> bool:
        """Only with ``tracking=true``."""
        return bool(self.opts["tracking"])

    def boot(self) -> None:
        """Fill the compiler's text in the page cache and start ``make``."""
        os = self.guest
        os.on_free = self._frame_freed
        self._plan_vcpu = 0
        for _ in range(int(self.opts["text_pages"])):
            gfn = os.get_frame()
            if gfn is None:
                break
            os.kwrite(gfn << PAGE_SHIFT, self.rng.bytes(64) * (PAGE_SIZE // 64), "kernel")
            self.text.append(gfn)
        make = self.new_process(AddressSpace(os))
        self.make = make
        self.run_on(0, make.mm)
        heap = USER_REGIONS[_HEAP_REGION][0]
        for i in range(8):
            if self.demand_fault(make.mm, heap + (i << PAGE_SHIFT), True):
                self.data_write(make.mm, heap + (i << PAGE_SHIFT), 64)

    def _frame_freed(self, gfn: int) -> None:
        if gfn in self._tracked:
            self._tracked.discard(gfn)
            self.emit_track(gfn, False)

    def new_frame(self, gfn: int) -> None:
        """A demand fault gave the job a fresh frame: maybe track it too."""
        if self.rng.random() < float(self.opts["tracked_fraction"]):
            self._tracked.add(gfn)
            self.emit_track(gfn, True)

    def plan_op(self) -> None:
        """One scheduling slice: a vCPU runs a job (starting one in an empty slot)."""
        rng = self.rng
        vcpu = int(rng.integers(self.vcpus))
        self._plan_vcpu = vcpu
        j = int(rng.integers(len(self.jobs)))
        proc = self.jobs[j]
        if proc is None:
            self.jobs[j] = self._start_job(vcpu)
            return
        mm = proc.mm
        self.run_on(vcpu, mm)
        text_base = USER_REGIONS[_TEXT_REGION][0]
        heap = USER_REGIONS[_HEAP_REGION][0]
        pages = int(self.opts["job_pages"])
        burst = int(rng.integers(1, 9))
        for _ in range(burst):
            if rng.random() < 0.15:
                page = int(rng.integers(len(self.text)))
                self._emit_touch(text_base + (page << PAGE_SHIFT), False)
                self.counts["touches"] += 1
                continue
            gva = heap + (int(rng.integers(pages)) << PAGE_SHIFT) + (int(rng.integers(512)) << 3)
            if self.demand_fault(mm, gva, True):
                self.data_write(mm, gva, int(rng.choice(_STORE_SIZES)))
        proc.writes_left -= burst
        if proc.writes_left <= 0:
            self.exit_process(proc)
            self.jobs[j] = None

    def _start_job(self, vcpu: int) -> Process:
        """``make`` forks, the child execs the compiler: the fork's copy is dropped for
        a fresh address space mapping the shared text read-only (fault-around)."""
        os = self.guest
        assert self.make is not None
        self.run_on(vcpu, self.make.mm)
        child = self.new_process(self.make.mm.fork())
        self.counts["forks"] += 1
        self.exit_process(child)
        self.counts["exits"] -= 1  # exec replaces the image; the job has not exited
        mm = AddressSpace(os)
        proc = self.new_process(mm)
        self.run_on(vcpu, mm)
        text_base = USER_REGIONS[_TEXT_REGION][0]
        for i, gfn in enumerate(self.text):
            os.share_frame(gfn)
            mm.map(text_base + (i << PAGE_SHIFT), gfn, writable=False)
        spread = int(self.opts["job_writes"]) // 4
        jitter = int(self.rng.integers(-spread, spread + 1))
        proc.writes_left = int(self.opts["job_writes"]) + jitter
        self.counts["execs"] += 1
        return proc


def compare(
    seed: int, options: Mapping[str, Any] | None = None, *, writes: int = 20_000
) -> dict[str, Any]:
    """Run the same kernel build twice on fresh VMs, with and without shadow-MMU
    tracking, and put the figures side by side (the seed's comparison)."""
    opts = dict(options or {})
    opts.setdefault("writes", writes)
    runs: dict[str, dict[str, int | float | str]] = {}
    for mode in ("tracked", "untracked"):
        wl = KernelBuild(seed, {**opts, "tracking": mode == "tracked"})
        vm = Vm(f"kernel-build-{mode}", vcpus=max(wl.vcpus, 1))
        wl.setup(vm)
        while wl.step(vm, 1 << 16):
            pass
        runs[mode] = wl.report()
    tracked, untracked = runs["tracked"], runs["untracked"]
    out: dict[str, Any] = {
        "tracked": tracked,
        "untracked": untracked,
        "extra_emulations": int(tracked["emulations"]) - int(untracked["emulations"]),
        "extra_cycles": int(tracked["cycles"]) - int(untracked["cycles"]),
        "extra_cpu_seconds": float(tracked["cpu_seconds"]) - float(untracked["cpu_seconds"]),
    }
    if int(untracked["cycles"]):
        out["cycles_ratio"] = int(tracked["cycles"]) / int(untracked["cycles"])
    return out
