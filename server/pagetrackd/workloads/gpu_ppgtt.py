"""``gpu-ppgtt``: a guest GPU driver building, updating and submitting PPGTTs under a vGPU.

The seed thread's graphics case: KVMGT write-protects every guest GPU page table, so
each PTE update traps, is emulated and reaches the vGPU synchronously, up to ~100k
times a second. Here a :class:`~pagetrackd.workloads.gpu_driver.GpuDriver` generates
the guest's side; writes between two submissions go to the VM in ``write_batch`` calls
(the vGPU is a per-event notifier, so the batch calls it after each emulated write, in
order), and each submission calls the vGPU's ``submit`` (flush pending entries, then
run). The vGPU is attached in :meth:`setup` if the VM has none.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from pagetrackd.domain import FailedPrecondition, InvalidArgument, NotFound, Vm, WritePath
from pagetrackd.domain.cost import CostModel
from pagetrackd.plugins.vgpu import PARTIAL_MODES, Vgpu, find_vgpu
from pagetrackd.workloads.gpu_driver import Control, GpuDriver, WriteChunk

__all__ = ["GpuPpgttWorkload", "parse_options"]

#: the seed's tracked-write rate for the graphics case
SEED_RATE = 100_000

_DEFAULTS: dict[str, Any] = {
    "ppgtts": 4,  # live GPU contexts, one PPGTT each
    "va_pages": 4096,  # pages in each context's GPU va window
    "initial_mappings": 256,  # pages bound in a new context before its first submission
    "updates_per_submit": 256,  # PTE updates between two submissions
    "split_fraction": 0.05,  # entries written as two 4-byte halves
    "violation_fraction": 0.0,  # bindings that name gfns outside the memslots
    "evict_fraction": 0.05,  # per submission: chance of unbinding a whole page table
    "churn_every": 64,  # destroy one context and create another every N submissions (0: never)
    "table_slot": 20,
    "table_base_gfn": 0x10000,
    "table_pages": 2048,
    "data_slot": 21,
    "data_base_gfn": 0x100000,
    "data_pages": 65536,
    "count": 0,  # total guest writes, 0 = until stopped
    "vcpus": 0,  # vCPUs used, 0 = all of the VM's
    "partial": "flush",  # the vGPU's partial-write mode when this workload attaches it
}


def parse_options(
    kind: str, options: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Defaults overridden by ``options``; unknown keys and wrong types raise InvalidArgument."""
    unknown = set(options) - set(defaults)
    if unknown:
        raise InvalidArgument(
            f"{kind}: unknown options {sorted(unknown)}; known: {sorted(defaults)}"
        )
    out = dict(defaults)
    for key, value in options.items():
        default = defaults[key]
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and isinstance(default, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int)
        elif isinstance(default, float):
            ok = isinstance(value, int | float)
            value = float(value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise InvalidArgument(
                f"{kind}: option {key} must be {type(default).__name__}, got {value!r}"
            )
        out[key] = value
    return out


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidArgument(message)


def ensure_slot(vm: Vm, slot_id: int, base_gfn: int, npages: int) -> None:
    """Create the memslot unless the same one already exists."""
    for slot in vm.memslots():
        if slot.slot_id == slot_id:
            if (slot.base_gfn, slot.npages) != (base_gfn, npages):
                raise InvalidArgument(
                    f"slot {slot_id} exists with {slot.npages} pages at gfn {slot.base_gfn:#x};"
                    f" the workload needs {npages} at {base_gfn:#x} (choose another slot id)"
                )
            return
    vm.set_memslot(slot_id, base_gfn, npages)


class GpuPpgttWorkload:
    """Driver-side PPGTT building, updating and command submission."""

    kind = "gpu-ppgtt"

    def __init__(self, seed: int, options: Mapping[str, Any]) -> None:
        o = parse_options(self.kind, options, _DEFAULTS)
        _check(1 <= o["ppgtts"] <= 64, "gpu-ppgtt: ppgtts must be 1..64")
        _check(16 <= o["va_pages"] <= 1 << 24, "gpu-ppgtt: va_pages must be 16..2^24")
        _check(0 <= o["initial_mappings"] < o["va_pages"],
               "gpu-ppgtt: initial_mappings must be 0..va_pages-1")
        _check(1 <= o["updates_per_submit"] <= 1 << 16,
               "gpu-ppgtt: updates_per_submit must be 1..65536")
        for key in ("split_fraction", "violation_fraction", "evict_fraction"):
            _check(0.0 <= o[key] <= 1.0, f"gpu-ppgtt: {key} must be between 0 and 1")
        _check(o["churn_every"] >= 0, "gpu-ppgtt: churn_every must be >= 0")
        _check(o["table_pages"] >= 8 and o["data_pages"] >= 1,
               "gpu-ppgtt: table_pages must be >= 8 and data_pages >= 1")
        _check(o["count"] >= 0 and o["vcpus"] >= 0, "gpu-ppgtt: count and vcpus must be >= 0")
        _check(o["partial"] in PARTIAL_MODES, f"gpu-ppgtt: partial must be one of {PARTIAL_MODES}")
        self.seed = seed
        self.o = o
        self.vgpu: Vgpu | None = None
        self.driver: GpuDriver | None = None
        self._cost = CostModel()
        self._vcpus = 1
        self._frames = 0
        self._pos = 0  #: writes of the queue's head chunk already applied
        self._arrays: tuple[Any, Any, Any, bytes] | None = None  #: head chunk as arrays
        self.writes = 0
        self.paths = [0, 0, 0]  #: pieces by WritePath
        self.submissions = 0
        self.batch_scratch = 0
        self.elapsed = 0.0

    # ------------------------------------------------------------------ protocol

    def setup(self, vm: Vm) -> None:
        """Create the table and data memslots, attach a vGPU unless one is attached."""
        o = self.o
        ensure_slot(vm, o["table_slot"], o["table_base_gfn"], o["table_pages"])
        ensure_slot(vm, o["data_slot"], o["data_base_gfn"], o["data_pages"])
        vgpu = find_vgpu(vm)
        if vgpu is None:
            vgpu = Vgpu()
            vgpu.attach(vm, partial=o["partial"])
        self.vgpu = vgpu
        self._cost = vm.cost
        self._vcpus = min(vm.vcpus, o["vcpus"]) if o["vcpus"] else vm.vcpus
        self.driver = GpuDriver(
            seed=self.seed,
            table_base_gfn=o["table_base_gfn"],
            table_pages=o["table_pages"],
            data_base_gfn=o["data_base_gfn"],
            data_pages=o["data_pages"],
            va_pages=o["va_pages"],
            split_fraction=o["split_fraction"],
            violation_fraction=o["violation_fraction"],
        )

    def step(self, vm: Vm, max_writes: int) -> int:
        """Apply up to ``max_writes`` driver writes; run the submissions that follow them."""
        driver = self.driver
        if driver is None:
            raise InvalidArgument("gpu-ppgtt: setup() must run before step()")
        t0 = time.perf_counter()
        count = self.o["count"]
        queue = driver.queue
        done = 0
        while done < max_writes and not (count and self.writes >= count):
            if not queue:
                self._frame(driver)
                continue
            item = queue[0]
            if isinstance(item, Control):
                self._control(vm, item)
                queue.popleft()
                continue
            done += self._apply(vm, item, max_writes - done, count)
            if self._pos == len(item.gpa):
                queue.popleft()
                self._pos = 0
                self._arrays = None
        # A submission right after the last applied write runs now, not next step.
        while queue:
            head = queue[0]
            if not isinstance(head, Control):
                break
            self._control(vm, head)
            queue.popleft()
        self.elapsed += time.perf_counter() - t0
        return done

    def report(self) -> dict[str, int | float | str]:
        """Writes by path, submissions, driver activity, rates and the cost comparison."""
        d = self.driver.stats if self.driver is not None else None
        cost = self._cost
        tracked = self.paths[WritePath.EMULATED]
        rate = self.writes / self.elapsed if self.elapsed else 0.0
        tracked_rate = tracked / self.elapsed if self.elapsed else 0.0
        out: dict[str, int | float | str] = {
            "kind": self.kind,
            "seed": self.seed,
            "writes": self.writes,
            "tracked_writes": tracked,
            "fast_writes": self.paths[WritePath.FAST],
            "mmio_exits": self.paths[WritePath.MMIO_EXIT],
            "submissions": self.submissions,
            "batch_scratch": self.batch_scratch,
            "frames": self._frames,
            "elapsed_s": round(self.elapsed, 6),
            "writes_per_s": round(rate, 1),
            "tracked_writes_per_s": round(tracked_rate, 1),
            "cycles_emulated": tracked * cost.emulate_cycles,
            "cycles_userspace_exit": tracked * cost.mmio_exit_cycles,
            "cpu_fraction_emulated": cost.cpu_fraction(cost.emulate_cycles, tracked_rate),
            "cpu_fraction_userspace": cost.cpu_fraction(cost.mmio_exit_cycles, tracked_rate),
            "cpu_fraction_userspace_at_100k": cost.cpu_fraction(cost.mmio_exit_cycles, SEED_RATE),
        }
        if d is not None:
            out.update(
                contexts_created=d.contexts_created,
                contexts_destroyed=d.contexts_destroyed,
                maps=d.maps,
                unmaps=d.unmaps,
                remaps=d.remaps,
                entry_writes=d.entry_writes,
                split_entries=d.split_entries,
                table_allocs=d.table_allocs,
                table_frees=d.table_frees,
                table_clears=d.table_clears,
                cmd_writes=d.cmd_writes,
                bad_gfns=d.bad_gfns,
            )
        return out

    # ------------------------------------------------------------------ internals

    def _apply(self, vm: Vm, chunk: WriteChunk, budget: int, count: int) -> int:
        if self._arrays is None:
            # Columns of Python ints made arrays: np.fromiter converts each for about
            # three quarters of what np.asarray costs, and lengths below 256 (all of them,
            # as a rule) go through bytes, which costs next to nothing.
            n = len(chunk.gpa)
            try:
                length = np.frombuffer(bytes(chunk.length), dtype=np.uint8).astype(np.int64)
            except ValueError:
                length = np.fromiter(chunk.length, np.int64, n)
            offs = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(length, out=offs[1:])
            self._arrays = (np.fromiter(chunk.gpa, np.int64, n), length, offs,
                            b"".join(chunk.data))
        gpa, length, offs, data = self._arrays
        a = self._pos
        take = min(len(chunk.gpa) - a, budget)
        if count:
            take = min(take, count - self.writes)
        b = a + take
        result = vm.write_batch(
            gpa[a:b], np.full(take, chunk.vcpu, dtype=np.int64), length[a:b],
            data[int(offs[a]) : int(offs[b])],
        )
        counts = result.counts
        paths = self.paths
        for p in range(3):
            paths[p] += counts[p]
        self._pos = b
        self.writes += take
        return take

    def _control(self, vm: Vm, item: Control) -> None:
        # The vGPU attached now: if it was detached and another attached, submissions
        # adopt the contexts' roots again (the vGPU shadows unknown roots on submit).
        vgpu = find_vgpu(vm)
        if vgpu is None:
            raise FailedPrecondition(
                f"gpu-ppgtt needs a vgpu plugin on VM {vm.name!r}; it was detached"
            )
        self.vgpu = vgpu
        if item.kind == "submit":
            res = vgpu.call("submit", root_gpa=item.root_gpa, batch_va=item.batch_va)
            self.submissions += 1
            self.batch_scratch += int(res["batch_scratch"])
            return
        try:
            vgpu.call("destroy_ppgtt", root_gpa=item.root_gpa)
        except NotFound:
            pass  # a vGPU attached after this context's last submission never saw it

    def _new_context(self, driver: GpuDriver) -> None:
        ctx = driver.new_context()
        for _ in range(self.o["initial_mappings"]):
            vpn = driver.random_unbound(ctx)
            if vpn is not None:
                driver.map(ctx, vpn)
        driver.submit(ctx)

    def _frame(self, driver: GpuDriver) -> None:
        """Generate one submission's worth of guest activity into the driver's queue."""
        o = self.o
        n = self._frames
        self._frames += 1
        rng = driver.rng
        driver.set_vcpu(n % self._vcpus)
        if n == 0:
            for _ in range(o["ppgtts"]):
                self._new_context(driver)
            driver.flush()
            return
        below = driver._below  # rng.randrange(k) for k > 0
        if o["churn_every"] and n % o["churn_every"] == 0:
            ids = sorted(driver.contexts)
            driver.destroy_context(driver.contexts[ids[below(len(ids))]])
            self._new_context(driver)
        ids = sorted(driver.contexts)
        ctx = driver.contexts[ids[below(len(ids))]]
        random = rng.random
        if random() < o["evict_fraction"]:
            vpn = driver.random_bound(ctx)
            if vpn is not None:
                driver.evict_table(ctx, vpn)
        driver.churn(ctx, o["updates_per_submit"], max(o["initial_mappings"], 2))
        driver.submit(ctx)
        driver.flush()
