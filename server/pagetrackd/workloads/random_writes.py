"""``random-writes``: uniform 8-byte guest writes over a slot, a chosen fraction of it tracked.

The tracked pages are picked once from the seed and tracked by the tenant. Writes are
generated in fixed blocks from a numpy generator seeded with the seed, so the sequence
(page, offset, bytes, vCPU) does not depend on how the runner sizes its steps.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from pagetrackd.domain import PAGE_SHIFT, InvalidArgument, Vm, WritePath
from pagetrackd.domain.cost import CostModel
from pagetrackd.domain.types import TENANT_OWNER
from pagetrackd.workloads.gpu_ppgtt import ensure_slot, parse_options

__all__ = ["RandomWritesWorkload"]

#: writes generated per block
BLOCK = 4096

_DEFAULTS: dict[str, Any] = {
    "pages": 4096,  # pages of the slot written to
    "tracked_fraction": 0.1,  # share of those pages write-tracked (owner "tenant")
    "slot": 30,
    "base_gfn": 0x400000,
    "count": 0,  # total writes, 0 = until stopped
    "vcpus": 0,  # vCPUs used, 0 = all of the VM's
}


class RandomWritesWorkload:
    """Uniform 8-byte aligned writes; ``tracked_fraction`` of the pages are tracked."""

    kind = "random-writes"

    def __init__(self, seed: int, options: Mapping[str, Any]) -> None:
        o = parse_options(self.kind, options, _DEFAULTS)
        if not 1 <= o["pages"] <= 1 << 24:
            raise InvalidArgument("random-writes: pages must be 1..2^24")
        if not 0.0 <= o["tracked_fraction"] <= 1.0:
            raise InvalidArgument("random-writes: tracked_fraction must be between 0 and 1")
        if o["count"] < 0 or o["vcpus"] < 0 or o["base_gfn"] < 0:
            raise InvalidArgument("random-writes: count, vcpus and base_gfn must be >= 0")
        self.seed = seed
        self.o = o
        self.rng = np.random.default_rng(seed)
        self.tracked_pages = 0
        self._vcpus = 1
        self._cost = CostModel()
        self._block: tuple[Any, Any, bytes] | None = None
        self._pos = 0
        self.writes = 0
        self.paths = [0, 0, 0]
        self.elapsed = 0.0

    def setup(self, vm: Vm) -> None:
        """Create the slot and track the chosen pages for the tenant."""
        o = self.o
        ensure_slot(vm, o["slot"], o["base_gfn"], o["pages"])
        n = int(round(o["pages"] * o["tracked_fraction"]))
        chosen = np.sort(self.rng.permutation(o["pages"])[:n]).astype(np.int64)
        if n:
            vm.track_add(chosen + o["base_gfn"], owner=TENANT_OWNER)
        self.tracked_pages = n
        self._vcpus = min(vm.vcpus, o["vcpus"]) if o["vcpus"] else vm.vcpus
        self._cost = vm.cost

    def _next_block(self) -> tuple[Any, Any, bytes]:
        rng = self.rng
        page = rng.integers(0, self.o["pages"], BLOCK, dtype=np.int64)
        off = rng.integers(0, 512, BLOCK, dtype=np.int64) * 8
        vcpu = rng.integers(0, self._vcpus, BLOCK, dtype=np.int64)
        data = rng.bytes(8 * BLOCK)
        gpa = ((page + self.o["base_gfn"]) << PAGE_SHIFT) + off
        return gpa, vcpu, data

    def step(self, vm: Vm, max_writes: int) -> int:
        """Apply up to ``max_writes`` writes."""
        t0 = time.perf_counter()
        count = self.o["count"]
        done = 0
        while done < max_writes:
            if count and self.writes >= count:
                break
            if self._block is None:
                self._block = self._next_block()
                self._pos = 0
            gpa, vcpu, data = self._block
            take = min(BLOCK - self._pos, max_writes - done)
            if count:
                take = min(take, count - self.writes)
            a, b = self._pos, self._pos + take
            result = vm.write_batch(
                gpa[a:b], vcpu[a:b], np.full(take, 8, dtype=np.int64), data[8 * a : 8 * b]
            )
            for p in range(3):
                self.paths[p] += result.counts[p]
            self._pos = b
            self.writes += take
            done += take
            if self._pos == BLOCK:
                self._block = None
        self.elapsed += time.perf_counter() - t0
        return done

    def report(self) -> dict[str, int | float | str]:
        """Writes by path, tracked pages, rate and the cost comparison."""
        cost = self._cost
        tracked = self.paths[WritePath.EMULATED]
        rate = self.writes / self.elapsed if self.elapsed else 0.0
        tracked_rate = tracked / self.elapsed if self.elapsed else 0.0
        return {
            "kind": self.kind,
            "seed": self.seed,
            "pages": self.o["pages"],
            "tracked_pages": self.tracked_pages,
            "writes": self.writes,
            "tracked_writes": tracked,
            "fast_writes": self.paths[WritePath.FAST],
            "mmio_exits": self.paths[WritePath.MMIO_EXIT],
            "elapsed_s": round(self.elapsed, 6),
            "writes_per_s": round(rate, 1),
            "tracked_writes_per_s": round(tracked_rate, 1),
            "cycles_emulated": tracked * cost.emulate_cycles,
            "cycles_userspace_exit": tracked * cost.mmio_exit_cycles,
            "cpu_fraction_emulated": cost.cpu_fraction(cost.emulate_cycles, tracked_rate),
            "cpu_fraction_userspace": cost.cpu_fraction(cost.mmio_exit_cycles, tracked_rate),
        }
