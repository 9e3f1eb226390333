"""Memory of idle VMs: what 1,000 VMs with huge, sparsely tracked memslots cost.

Run from the repository root with the project's venv::

    .venv/bin/python bench/core_memory.py

Creates ``VMS`` VMs, each with one 4 GiB memslot (2**20 pages), 0.1% of its pages
write-tracked (scattered uniformly at random over the slot with a fixed seed, a fresh draw
per VM) and ``PAGES_WRITTEN`` pages written (one 8-byte write at a random 8-byte-aligned
offset of each of that many random pages). Prints the growth of the process's resident set
while the VMs are alive, next to what KVM-style dense ``uint16`` counters (one per page,
allocated up front) would cost for the same slots.
"""

from __future__ import annotations

import gc
import sys

import numpy as np

from pagetrackd.domain import Vm

VMS = 1000
SLOT_PAGES = 1 << 20  #: 4 GiB of 4 KiB pages
TRACKED_GFNS = SLOT_PAGES // 1000  #: 0.1% of the pages
PAGES_WRITTEN = 100
WRITE_LEN = 8
SEED = 20160224
MIB = 1 << 20


def rss_bytes() -> int:
    """The process's resident set size (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def make_vm(i: int, rng: np.random.Generator) -> Vm:
    vm = Vm(f"idle-{i}")
    vm.set_memslot(0, 0, SLOT_PAGES)
    tracked = rng.choice(SLOT_PAGES, size=TRACKED_GFNS, replace=False)
    if vm.track_add(tracked) != TRACKED_GFNS:
        raise SystemExit(f"vm {i}: not every drawn gfn became tracked")
    pages = rng.choice(SLOT_PAGES, size=PAGES_WRITTEN, replace=False)
    offsets = rng.integers(0, 4096 // WRITE_LEN, size=PAGES_WRITTEN) * WRITE_LEN
    values = rng.integers(1, 1 << 62, size=PAGES_WRITTEN, dtype=np.int64)
    for page, off, value in zip(pages.tolist(), offsets.tolist(), values.tolist(), strict=True):
        vm.write(0, (page << 12) + off, value.to_bytes(WRITE_LEN, "little"))
    return vm


def main() -> int:
    rng = np.random.default_rng(SEED)
    # Warm up allocator and import-time caches with one VM that is then dropped.
    make_vm(-1, np.random.default_rng(0)).close()
    gc.collect()
    before = rss_bytes()
    vms = [make_vm(i, rng) for i in range(VMS)]
    gc.collect()
    after = rss_bytes()
    # Sanity: every VM holds its tracking and its written pages.
    for vm in vms:
        if vm.tracked_count != TRACKED_GFNS:
            print(f"{vm.name}: {vm.tracked_count} tracked gfns", file=sys.stderr)
            return 1
        if sum(s.memory.pages for s in vm.slots.slots()) != PAGES_WRITTEN:
            print(f"{vm.name}: wrong number of written pages", file=sys.stderr)
            return 1
    dense = VMS * SLOT_PAGES * 2
    print(f"vms: {VMS}")
    print(f"tracked_gfns_per_vm: {TRACKED_GFNS}")
    print(f"pages_written_per_vm: {PAGES_WRITTEN}")
    print(f"dense_counters_mib: {dense / MIB:.0f}")
    print(f"idle_vms_rss_mib: {(after - before) / MIB:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
