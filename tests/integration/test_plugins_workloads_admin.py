"""PluginService, WorkloadService and AdminService against a real daemon.

The shadow-MMU and vGPU plugins and some workloads are written alongside this suite:
a kind the daemon does not offer yet must be refused with INVALID_ARGUMENT naming it
(tested), and its other tests are skipped with that reason.
"""

from __future__ import annotations

import math

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.integration.support import Api, expect_error, new_name, snapshot
from tests.waiting import until

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PLUGIN_KINDS = [pb.PLUGIN_KIND_SHADOW_MMU, pb.PLUGIN_KIND_VGPU]


async def attach_or_skip(api: Api, vm: str, kind: int) -> pb.PluginStatus:
    """Attach ``kind``; if the daemon has no such plugin, check the refusal changed
    nothing and skip the test."""
    before = await snapshot(api, vm)
    try:
        r = await api.plugin.AttachPlugin(pb.AttachPluginRequest(vm=vm, kind=kind))  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        if exc.code() == INVALID and "unknown plugin" in details:
            assert await snapshot(api, vm) == before
            label = pb.PluginKind.Name(pb.PluginKind.ValueType(kind))
            pytest.skip(f"{label} is not in this daemon's PLUGINS: {details}")
        raise
    return r.status


@pytest.mark.parametrize("kind", PLUGIN_KINDS, ids=pb.PluginKind.Name)
async def test_attach_list_detach_plugin(api: Api, vm: str, kind: int) -> None:
    """An attached plugin is listed (ListPlugins, GetVm, ListNotifiers); a second attach
    is ALREADY_EXISTS; detach releases its references; a second detach is NOT_FOUND."""
    status = await attach_or_skip(api, vm, kind)
    assert status.kind == kind
    listed = (await api.plugin.ListPlugins(pb.ListPluginsRequest(vm=vm))).plugins
    assert [p.kind for p in listed] == [kind]
    assert list((await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.plugins) == [kind]
    notifiers = (await api.watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))).notifiers
    assert [n.kind for n in notifiers] == [pb.NOTIFIER_KIND_PLUGIN]
    audit = await api.plugin.AuditPlugin(pb.AuditPluginRequest(vm=vm, kind=kind))  # type: ignore[arg-type]
    assert audit.mismatch_count == 0
    before = await snapshot(api, vm)
    await expect_error(
        api.plugin.AttachPlugin(pb.AttachPluginRequest(vm=vm, kind=kind)),  # type: ignore[arg-type]
        grpc.StatusCode.ALREADY_EXISTS, "already attached",
    )
    assert await snapshot(api, vm) == before
    r = await api.plugin.DetachPlugin(pb.DetachPluginRequest(vm=vm, kind=kind))  # type: ignore[arg-type]
    assert r.released_references == status.tracked_gfns or r.released_references >= 0
    assert not (await api.plugin.ListPlugins(pb.ListPluginsRequest(vm=vm))).plugins
    assert not (await api.watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))).notifiers
    await expect_error(
        api.plugin.DetachPlugin(pb.DetachPluginRequest(vm=vm, kind=kind)),  # type: ignore[arg-type]
        grpc.StatusCode.NOT_FOUND, "not attached",
    )


@pytest.mark.parametrize("kind", PLUGIN_KINDS, ids=pb.PluginKind.Name)
async def test_attach_plugin_refuses_unknown_options(api: Api, vm: str, kind: int) -> None:
    """An unknown option key is INVALID_ARGUMENT naming it; the plugin is not attached."""
    before = await snapshot(api, vm)
    details = await expect_error(
        api.plugin.AttachPlugin(
            pb.AttachPluginRequest(vm=vm, kind=kind, options={"no_such_option": "1"})  # type: ignore[arg-type]
        ),
        INVALID,
    )
    assert "no_such_option" in details or "unknown plugin" in details
    assert await snapshot(api, vm) == before


@pytest.mark.parametrize("kind", [0, 3, 2**31 - 1, -1])
async def test_plugin_calls_refuse_unknown_kinds(api: Api, vm: str, kind: int) -> None:
    """UNSPECIFIED and unknown plugin kinds are INVALID_ARGUMENT naming the field for
    attach, detach and audit; nothing changes."""
    before = await snapshot(api, vm)
    for call in (
        api.plugin.AttachPlugin(pb.AttachPluginRequest(vm=vm, kind=kind)),  # type: ignore[arg-type]
        api.plugin.DetachPlugin(pb.DetachPluginRequest(vm=vm, kind=kind)),  # type: ignore[arg-type]
        api.plugin.AuditPlugin(pb.AuditPluginRequest(vm=vm, kind=kind)),  # type: ignore[arg-type]
    ):
        await expect_error(call, INVALID, "kind")
    assert await snapshot(api, vm) == before


async def test_plugin_calls_on_unknown_vm_or_unattached_plugin(api: Api, vm: str) -> None:
    """An unknown VM is NOT_FOUND; a plugin call before attaching is NOT_FOUND (or
    FAILED_PRECONDITION for the plugin-specific calls)."""
    for call in (
        api.plugin.AttachPlugin(pb.AttachPluginRequest(vm="ghost-vm", kind=pb.PLUGIN_KIND_VGPU)),
        api.plugin.ListPlugins(pb.ListPluginsRequest(vm="ghost-vm")),
        api.plugin.DetachPlugin(pb.DetachPluginRequest(vm="ghost-vm", kind=pb.PLUGIN_KIND_VGPU)),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, "ghost-vm")
    await expect_error(
        api.plugin.AuditPlugin(pb.AuditPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_VGPU)),
        grpc.StatusCode.NOT_FOUND, "not attached",
    )


# ----------------------------------------------------------------------------- workloads


async def start_or_skip(api: Api, req: pb.StartWorkloadRequest) -> pb.WorkloadStatus:
    """Start a workload; skip when the daemon does not offer its kind (after checking
    the refusal is INVALID_ARGUMENT and changes nothing)."""
    before = await snapshot(api, req.vm)
    try:
        return (await api.workload.StartWorkload(req)).workload
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        if exc.code() == INVALID and "unknown workload" in details:
            assert await snapshot(api, req.vm) == before
            pytest.skip(f"{pb.WorkloadKind.Name(req.kind)} is not in WORKLOADS: {details}")
        raise


async def wait_state(api: Api, run_id: str, state: int) -> pb.WorkloadStatus:
    async def reached() -> pb.WorkloadStatus | None:
        w = (await api.workload.GetWorkload(pb.GetWorkloadRequest(id=run_id))).workload
        return w if w.state == state else None

    return await until(reached, f"workload {run_id} to reach state {state}")


async def test_random_writes_workload_runs_to_its_count(api: Api, vm: str) -> None:
    """A counted workload finishes with exactly that many writes, is listed, and
    stopping it afterwards keeps FINISHED."""
    req = pb.StartWorkloadRequest(vm=vm, kind=pb.WORKLOAD_KIND_RANDOM_WRITES, count=300, seed=7,
                                  tracked_fraction=0.5, options={"pages": "64"})
    started = await start_or_skip(api, req)
    assert started.id and started.vm == vm and started.config.kind == req.kind
    done = await wait_state(api, started.id, pb.WORKLOAD_STATE_FINISHED)
    assert done.writes == 300
    assert done.writes_by_path.fast + done.writes_by_path.emulated >= 300
    listed = (await api.workload.ListWorkloads(pb.ListWorkloadsRequest(vm=vm))).workloads
    assert started.id in {w.id for w in listed}
    stopped = (await api.workload.StopWorkload(pb.StopWorkloadRequest(id=started.id))).workload
    assert stopped.state == pb.WORKLOAD_STATE_FINISHED


@pytest.mark.parametrize(
    "kind",
    [pb.WORKLOAD_KIND_RANDOM_WRITES, pb.WORKLOAD_KIND_GPU_PPGTT,
     pb.WORKLOAD_KIND_GUEST_PAGETABLES, pb.WORKLOAD_KIND_KERNEL_BUILD],
    ids=pb.WorkloadKind.Name,
)
async def test_workload_runs_until_stopped(api: Api, kind: int) -> None:
    """An unbounded, rate-limited workload runs until StopWorkload, which answers
    STOPPED with its figures."""
    vm = new_name()
    await api.vm.CreateVm(pb.CreateVmRequest(name=vm))
    try:
        await api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=vm, slot=0, npages=4096))
        await run_until_stopped(api, vm, kind)
    finally:
        await api.vm.DeleteVm(pb.DeleteVmRequest(vm=vm))


async def run_until_stopped(api: Api, vm: str, kind: int) -> None:
    started = await start_or_skip(api, pb.StartWorkloadRequest(vm=vm, kind=kind, rate=500, seed=1))  # type: ignore[arg-type]

    async def wrote() -> pb.WorkloadStatus | None:
        w = (await api.workload.GetWorkload(pb.GetWorkloadRequest(id=started.id))).workload
        assert w.state == pb.WORKLOAD_STATE_RUNNING, w.error
        return w if w.writes > 0 else None

    running = await until(wrote, "the workload's first writes")
    stopped = (await api.workload.StopWorkload(pb.StopWorkloadRequest(id=started.id))).workload
    assert stopped.state == pb.WORKLOAD_STATE_STOPPED
    assert stopped.writes >= running.writes > 0 and stopped.elapsed_ms >= running.elapsed_ms


BAD_WORKLOAD = [
    ({"kind": 0}, "kind"),
    ({"kind": 99}, "kind"),
    ({"rate": -1.0}, "rate"),
    ({"rate": math.nan}, "rate"),
    ({"rate": math.inf}, "rate"),
    ({"rate": 1e300}, "rate"),
    ({"tracked_fraction": 1.5}, "tracked_fraction"),
    ({"tracked_fraction": -0.1}, "tracked_fraction"),
    ({"tracked_fraction": math.nan}, "tracked_fraction"),
    ({"count": 2**64 - 1}, "count"),
    ({"vcpus": 9}, "vcpus"),
    ({"vcpus": 2**32 - 1}, "vcpus"),
    ({"options": {"no_such_option": "1"}}, "no_such_option"),
    ({"options": {"pages": "many"}}, "pages"),
    ({"options": {"pages": "0"}}, "pages"),
]


@pytest.mark.parametrize(("fields", "needle"), BAD_WORKLOAD)
async def test_start_workload_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, object], needle: str
) -> None:
    """Each malformed StartWorkload field is INVALID_ARGUMENT naming it; no workload
    starts and the VM is untouched."""
    req = pb.StartWorkloadRequest(vm=vm, kind=pb.WORKLOAD_KIND_RANDOM_WRITES, count=10)
    for key, value in fields.items():
        if key == "options":
            req.options.update(value)  # type: ignore[call-overload]
        else:
            setattr(req, key, value)
    before = await snapshot(api, vm)
    runs = (await api.workload.ListWorkloads(pb.ListWorkloadsRequest())).workloads
    details = await expect_error(api.workload.StartWorkload(req), INVALID)
    if "unknown workload" not in details:
        assert needle in details, details
    assert await snapshot(api, vm) == before
    after = (await api.workload.ListWorkloads(pb.ListWorkloadsRequest())).workloads
    assert [w.id for w in after] == [w.id for w in runs]


async def test_workload_calls_refuse_missing_and_unknown_ids(api: Api) -> None:
    """Empty ids are INVALID_ARGUMENT, unknown ids and VMs NOT_FOUND."""
    await expect_error(api.workload.GetWorkload(pb.GetWorkloadRequest()), INVALID, "id")
    await expect_error(api.workload.StopWorkload(pb.StopWorkloadRequest()), INVALID, "id")
    await expect_error(api.workload.GetWorkload(pb.GetWorkloadRequest(id="w999999")),
                       grpc.StatusCode.NOT_FOUND, "w999999")
    await expect_error(api.workload.StopWorkload(pb.StopWorkloadRequest(id="\x00" * 10)),
                       grpc.StatusCode.NOT_FOUND)
    await expect_error(api.workload.ListWorkloads(pb.ListWorkloadsRequest(vm="ghost-vm")),
                       grpc.StatusCode.NOT_FOUND, "ghost-vm")
    await expect_error(
        api.workload.StartWorkload(pb.StartWorkloadRequest(
            vm="ghost-vm", kind=pb.WORKLOAD_KIND_RANDOM_WRITES)),
        grpc.StatusCode.NOT_FOUND, "ghost-vm",
    )


# --------------------------------------------------------------------------------- admin


async def test_get_server_info(api: Api) -> None:
    """GetServerInfo names the version, caller, limits, quotas and VM defaults."""
    info = await api.admin.GetServerInfo(pb.GetServerInfoRequest())
    assert info.version and info.tenant == "default" and info.role == "admin"
    lim = info.limits
    assert lim.max_message_bytes >= lim.max_write_bytes > 0
    assert lim.min_heartbeat_interval_ms <= lim.default_heartbeat_interval_ms
    assert lim.default_heartbeat_interval_ms <= lim.max_heartbeat_interval_ms
    assert lim.default_queue_limit <= lim.max_queue_limit
    assert 0 < lim.min_lease_ttl_ms < lim.max_lease_ttl_ms
    assert info.quotas.vms > 0 and info.started_at_ns > 0
    d = info.default_vm_options
    assert d.dma_policy == pb.DMA_POLICY_BYPASS and d.semantics == pb.SEMANTICS_2016
    assert d.cost.mmio_exit_cycles == 5000 and d.limits.gfn_bits == 40


async def test_get_stats_counts_writes(api: Api, vm: str) -> None:
    """GetStats counts writes by path, cycles and bytes; "" lists every VM."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x100]))
    await api.mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
        vm=vm, gpa=[0x100 << 12, 0x101 << 12, 0x300 << 12], vcpu=[2], length=[4, 4, 4],
        data=b"x" * 12))
    s = (await api.admin.GetStats(pb.GetStatsRequest(vm=vm))).vms[0]
    assert s.vm == vm and s.guest_writes == 3
    assert (s.writes.mmio_exit, s.writes.fast, s.writes.emulated) == (1, 1, 1)
    assert s.bytes_written == 8 and s.emulations == 1 and s.head_seq == 1
    assert s.cycles.total == s.cycles.mmio_exit + s.cycles.fast + s.cycles.emulated + s.cycles.dma
    assert s.cycles.total == 5000 + 1500 and s.tracked_gfns == 1
    assert math.isclose(s.simulated_seconds, s.cycles.total / 3.3e9, rel_tol=1e-6)
    every = (await api.admin.GetStats(pb.GetStatsRequest())).vms
    assert vm in [v.vm for v in every]
    assert [v.vm for v in every] == sorted(v.vm for v in every)
    await expect_error(api.admin.GetStats(pb.GetStatsRequest(vm="ghost-vm")),
                       grpc.StatusCode.NOT_FOUND, "ghost-vm")
