"""The demo set-up behind ``pagetrackd --demo`` and ``make run``: one VM with RAM, an
MMIO hole, a set of write-tracked pages and a steady write workload."""

from __future__ import annotations

import numpy as np

from pagetrackd.application import Engine, VmEntry
from pagetrackd.domain import NotFound, SlotFlags, TenantId

DEMO_VM = "demo"
DEMO_TENANT = TenantId("default")


def setup_demo(engine: Engine, tenant: TenantId = DEMO_TENANT, rate: float = 2000.0) -> VmEntry:
    """Create the ``demo`` VM: 256 MiB of RAM at gfn 0 (dirty-logged) with 1 in 8 of its
    first 4096 pages write-tracked, a 16 MiB READONLY ROM at 4 GiB, and a random-writes
    workload at ``rate`` writes/s over 16 MiB of its own (slot 30, gfn 0x400000) with an
    eighth of those pages tracked, so events flow. A ``demo`` VM loaded from the state
    directory is kept as it is; only the workload starts."""
    try:
        entry = engine.vm(tenant, DEMO_VM)
    except NotFound:
        entry = engine.create_vm(tenant, DEMO_VM, vcpus=4)
        vm = entry.vm
        vm.set_memslot(0, 0, 65536, SlotFlags.LOG_DIRTY_PAGES)
        vm.set_memslot(1, 0x100000, 4096, SlotFlags.READONLY)
        vm.track_add(np.arange(0, 4096, 8, dtype=np.int64))
    engine.start_workload(
        entry, "random-writes", seed=1, rate=rate, count=0, duration_s=0,
        options={"pages": 4096, "tracked_fraction": 0.125, "vcpus": 4},
    )
    return entry
