"""The engine's per-tenant totals (memslot pages, tracked gfns, guest memory and track
pool bytes) that quota checks read must equal a plain sum over the tenant's VMs after any
mix of operations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.application import Engine, EngineConfig, Quotas
from pagetrackd.domain import PageTrackError
from pagetrackd.domain.types import TenantId

TENANTS = [TenantId("a"), TenantId("b")]
NAMES = ["v0", "v1"]

ops = st.lists(
    st.tuples(
        st.sampled_from(["create", "delete", "slot", "drop_slot", "track", "untrack", "lease",
                         "write", "batch", "dma"]),
        st.sampled_from(TENANTS), st.sampled_from(NAMES), st.integers(0, 1),
        st.integers(0, 63),
    ),
    min_size=4, max_size=40,
)


def brute(engine: Engine, tenant: TenantId) -> tuple[int, int, int, int]:
    vms = [e.vm for e in engine.list_vms(tenant)]
    return (
        sum(s.npages for vm in vms for s in vm.memslots()),
        sum(vm.tracked_count for vm in vms),
        sum(vm.memory_footprint for vm in vms),
        sum(vm.tracking_footprint for vm in vms),
    )


def counted(engine: Engine, tenant: TenantId) -> tuple[int, int, int, int]:
    pages, tracked = engine.usage(tenant)
    return pages, tracked, engine.memory_used(tenant), engine.tracking_used(tenant)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_usage_totals_follow_every_change(steps: list[tuple[str, TenantId, str, int, int]]) -> None:
    engine = Engine(EngineConfig(quotas=Quotas(vms=10)))
    lease = {t: engine.leases.create(t, 60_000) for t in TENANTS}
    for op, tenant, name, slot, gfn in steps:
        try:
            if op == "create":
                engine.create_vm(tenant, name)
                continue
            entry = engine.vm(tenant, name)
            vm = entry.vm
            if op == "delete":
                engine.delete_vm(tenant, name)
            elif op == "slot":
                vm.set_memslot(slot, slot * 64, 64 - slot * 16)
            elif op == "drop_slot":
                vm.set_memslot(slot, slot * 64, 0)
            elif op == "track":
                vm.track_add([gfn, gfn + 1])
            elif op == "untrack":
                vm.track_remove([gfn])
            elif op == "lease":
                vm.track_add([gfn], lease[tenant].owner)
            elif op == "write":
                vm.write(0, (gfn << 12) + 8 * slot, b"\x5a" * (8 + 100 * slot))
            elif op == "batch":
                vm.write_batch([gfn << 12, (gfn + 2) << 12], [0, 0], [8, 4000], b"\x01" * 4008)
            elif op == "dma":
                vm.dma_write((gfn << 12) + 64, b"\x02" * 16)
        except PageTrackError:
            pass
        for t in TENANTS:
            assert counted(engine, t) == brute(engine, t)
            assert engine._history_held.get(t, 0) == sum(
                e.hub.history.max_bytes for e in engine.list_vms(t)
            )
    for t in TENANTS:
        engine.leases.end(lease[t])
        assert counted(engine, t) == brute(engine, t)


def test_a_deleted_vm_leaves_the_totals() -> None:
    engine = Engine()
    t = TenantId("a")
    vm = engine.create_vm(t, "v").vm
    vm.set_memslot(0, 0, 100)
    vm.track_add([1, 2, 3])
    vm.write(0, 0x1000, b"\x5a" * 64)
    assert counted(engine, t) == brute(engine, t)
    assert engine.usage(t) == (100, 3) and engine.memory_used(t) > 0
    engine.delete_vm(t, "v")
    assert counted(engine, t) == (0, 0, 0, 0)
