"""What outlives a request is bounded and expires: ended workloads (and never a deleted
VM through them), leases, unauthenticated Health.Watch streams. Workload ids tell a
tenant nothing of the others'."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.starve_support import (
    ATTACKER,
    VICTIM,
    MiB,
    Tenant,
    daemon,
    refused,
)


async def _run_to_end(t: Tenant, vm: str, count: int = 16) -> str:
    """Start a short workload on ``vm`` and wait until it has ended; its id."""
    run = (await t.call(t.api.workload.StartWorkload, pb.StartWorkloadRequest(
        vm=vm, kind=pb.WORKLOAD_KIND_RANDOM_WRITES, count=count, seed=1))).workload.id
    for _ in range(1200):
        got = (await t.call(t.api.workload.GetWorkload, pb.GetWorkloadRequest(id=run))).workload
        if got.state != pb.WORKLOAD_STATE_RUNNING:
            return str(run)
        await asyncio.sleep(0.05)  # polling the daemon's state: a deadline bounds it
    raise AssertionError(f"workload {run} still running after 60 s")


async def test_ended_workloads_are_bounded_and_ids_are_unguessable(tmp_path: Path) -> None:
    """Today's code kept every ended workload (5,000 took 616 MiB) and numbered them
    with one counter for all tenants (tenant B's first id was w2)."""
    with daemon(tmp_path, "[tenant_quotas.attacker]\nfinished_workloads = 4\n") as d:
        att, vic = Tenant(d.tcp, ATTACKER), Tenant(d.tcp, VICTIM)
        vm = await att.new_vm(4096)
        ids = [await _run_to_end(att, vm) for _ in range(10)]
        listed = (await att.call(att.api.workload.ListWorkloads,
                                 pb.ListWorkloadsRequest())).workloads
        assert [w.id for w in listed] and {w.id for w in listed} <= set(ids[-4:])
        assert len(listed) == 4
        # Ids: no counter to read another tenant's activity from.
        theirs = await _run_to_end(vic, await vic.new_vm(4096))
        for run_id in [*ids, theirs]:
            assert re.fullmatch(r"w[0-9a-f]{12}", run_id), run_id
        assert len({int(i[1:], 16) for i in ids}) == 10
        await refused_lookup(att, theirs)
        await att.close()
        await vic.close()


async def refused_lookup(t: Tenant, run_id: str) -> None:
    try:
        await t.call(t.api.workload.GetWorkload, pb.GetWorkloadRequest(id=run_id))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return
    raise AssertionError("another tenant's workload was found")


async def test_a_deleted_vm_is_not_kept_alive_by_its_workloads(tmp_path: Path) -> None:
    """Today's code kept a deleted VM's ended workloads, and through them the VM and its
    memory (+431 MiB in the report). 96 MiB of guest memory must be given back."""
    with daemon(tmp_path) as d:
        att = Tenant(d.tcp, ATTACKER)
        vm = await att.new_vm(1 << 16)
        page = b"\x7e" * 4096
        for k in range(24):  # 24 x 4 MiB of whole pages
            gpas = [(k * 1024 + i) << 12 for i in range(1024)]
            await att.call(att.api.mem.WriteGuestBatch, pb.WriteGuestBatchRequest(
                vm=vm, gpa=gpas, vcpu=[0], length=[4096] * 1024, data=page * 1024))
        await _run_to_end(att, vm)
        full = d.rss_bytes()
        await att.call(att.api.vm.DeleteVm, pb.DeleteVmRequest(vm=vm))
        assert not (await att.call(att.api.workload.ListWorkloads,
                                   pb.ListWorkloadsRequest())).workloads
        freed = full - d.rss_bytes()
        print(f"rss_freed_mib: {freed / MiB:.0f}")
        assert freed > 64 * MiB, f"only {freed / MiB:.0f} MiB freed by deleting the VM"
        await att.close()


async def test_leases_have_a_quota(tmp_path: Path) -> None:
    """Today's code let one tenant hold 100k leases."""
    with daemon(tmp_path, "[tenant_quotas.attacker]\nleases = 8\n") as d:
        att = Tenant(d.tcp, ATTACKER)
        for _ in range(8):
            await att.call(att.api.lease.CreateLease, pb.CreateLeaseRequest(ttl_ms=60_000))
        await refused(att.call(att.api.lease.CreateLease, pb.CreateLeaseRequest(ttl_ms=60_000)),
                      "leases")
        # Another tenant is not held by the attacker's leases.
        vic = Tenant(d.tcp, VICTIM)
        await vic.call(vic.api.lease.CreateLease, pb.CreateLeaseRequest(ttl_ms=60_000))
        await att.close()
        await vic.close()


async def test_unauthenticated_health_watches_are_bounded(tmp_path: Path) -> None:
    """Health.Watch needs no token; today's code let 20,000 of them hold 219 MiB."""
    with daemon(tmp_path, "", "--health-watchers", "8") as d:
        anyone = Tenant(d.tcp, "")  # sends no valid token; health needs none
        streams = [anyone.api.health.Watch(health_pb2.HealthCheckRequest()) for _ in range(8)]
        for s in streams:
            first = await s.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
        extra = anyone.api.health.Watch(health_pb2.HealthCheckRequest())
        await refused(extra.read(), "health_watchers")
        for s in streams:
            s.cancel()
        await anyone.close()
