"""Workloads through the API on a real daemon: gpu-ppgtt with its vGPU and a live Watch.

StartWorkload runs the workload's setup, which attaches the vGPU itself; the daemon
takes that plugin in, so ListPlugins, AuditPlugin and AttachPlugin treat it like one
attached through the API. A Watch subscriber must receive every emulated write, and
the workload's figures must agree with GetStats.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import DaemonProcess, start_daemon

WRITES = 30_000
TABLE_BASE_GFN = 0x10000  # gpu-ppgtt's default table slot
TABLE_PAGES = 2048


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp: Path = tmp_path_factory.mktemp("ptw")
    d = start_daemon(tmp, "--log-level", "warning", listen=(f"unix:{tmp}/pt.sock",))
    yield d
    d.stop()


class Stubs:
    def __init__(self, ch: grpc.aio.Channel) -> None:
        self.vm = pbg.VmServiceStub(ch)
        self.memory = pbg.MemoryServiceStub(ch)
        self.tracking = pbg.TrackingServiceStub(ch)
        self.watch = pbg.WatchServiceStub(ch)
        self.plugin = pbg.PluginServiceStub(ch)
        self.work = pbg.WorkloadServiceStub(ch)
        self.admin = pbg.AdminServiceStub(ch)


@pytest.fixture
async def api(daemon: DaemonProcess) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(daemon.addresses[0]) as ch:
        yield Stubs(ch)


_names = iter(range(1_000_000))


async def new_vm(api: Stubs) -> str:
    name = f"wl-{next(_names)}"
    await api.vm.CreateVm(pb.CreateVmRequest(name=name))
    return name


async def run_to_end(api: Stubs, request: pb.StartWorkloadRequest) -> pb.WorkloadStatus:
    """Start a workload and poll it until it is no longer running."""
    run_id = (await api.work.StartWorkload(request)).workload.id
    for _ in range(1200):
        status = (await api.work.GetWorkload(pb.GetWorkloadRequest(id=run_id))).workload
        if status.state != pb.WORKLOAD_STATE_RUNNING:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"workload {run_id} still running after 60 s")


async def collect(stream: Any, head: list[int], out: dict[str, Any]) -> None:
    """Read a Watch stream until its events and gaps cover seqs 1..head[0] (head[0] is
    set once the run is over; progress messages wake the loop meanwhile)."""
    seqs: list[int] = []
    lost = 0
    while not head or len(seqs) + lost < head[0]:
        msg = await stream.read()
        if msg is grpc.aio.EOF:
            break
        kind = msg.WhichOneof("kind")
        if kind == "events":
            seqs.extend(msg.events.seq)
        elif kind == "gap":
            lost += msg.gap.count
    out["seqs"], out["lost"] = seqs, lost


async def test_gpu_ppgtt_through_the_api_with_a_watch_subscriber(api: Stubs) -> None:
    vm = await new_vm(api)
    stream: Any = api.watch.Watch(
        pb.WatchRequest(vm=vm, queue_limit=1 << 22, heartbeat_interval_ms=50)
    )
    first = await stream.read()
    assert first.WhichOneof("kind") == "registered" and first.registered.head_seq == 0
    head: list[int] = []
    got: dict[str, Any] = {}
    reader = asyncio.create_task(collect(stream, head, got))

    status = await run_to_end(api, pb.StartWorkloadRequest(
        vm=vm, kind=pb.WORKLOAD_KIND_GPU_PPGTT, count=WRITES, rate=0, seed=3,
    ))
    assert status.state == pb.WORKLOAD_STATE_FINISHED, status.error
    stats = (await api.admin.GetStats(pb.GetStatsRequest(vm=vm))).vms[0]
    head.append(stats.head_seq)
    await asyncio.wait_for(reader, 60)
    stream.cancel()

    # The workload's figures are the VM's: nothing else wrote to it.
    paths = status.writes_by_path
    assert status.writes == WRITES == stats.guest_writes
    assert paths.mmio_exit + paths.fast + paths.emulated == WRITES  # no write crosses a page
    assert (paths.emulated, paths.fast, paths.mmio_exit) == (
        stats.writes.emulated, stats.writes.fast, stats.writes.mmio_exit
    )
    assert paths.emulated == stats.emulations == stats.head_seq > WRITES // 2
    assert status.cycles.emulated == stats.cycles.emulated
    assert status.cycles.total == stats.cycles.total
    assert status.elapsed_ms > 0
    assert status.achieved_rate == pytest.approx(WRITES / (status.elapsed_ms / 1000), rel=0.05)
    assert stats.events_dropped == 0 and stats.notifier_errors == 0

    # The subscriber saw every emulated write, once, in order, and no gap.
    assert got["lost"] == 0
    assert got["seqs"] == list(range(1, stats.head_seq + 1))

    # The vGPU the workload attached is the VM's plugin now.
    plugins = (await api.plugin.ListPlugins(pb.ListPluginsRequest(vm=vm))).plugins
    assert [p.kind for p in plugins] == [pb.PLUGIN_KIND_VGPU]
    vgpu = plugins[0]
    assert vgpu.tracked_gfns == vgpu.counters["protected_gfns"] > 0
    assert vgpu.counters["writes"] == paths.emulated
    assert vgpu.counters["submissions"] > 0 and vgpu.counters["handler_errors"] == 0
    assert list((await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.plugins) == [
        pb.PLUGIN_KIND_VGPU
    ]
    audit = await api.plugin.AuditPlugin(pb.AuditPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_VGPU))
    assert audit.mismatch_count == 0 and audit.checked_entries > 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.plugin.AttachPlugin(pb.AttachPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_VGPU))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already attached" in (err.value.details() or "")

    # A second run reuses the adopted vGPU; detaching it through the API works.
    again = await run_to_end(api, pb.StartWorkloadRequest(
        vm=vm, kind=pb.WORKLOAD_KIND_GPU_PPGTT, count=2000, rate=0, seed=4,
    ))
    assert again.state == pb.WORKLOAD_STATE_FINISHED, again.error
    detached = await api.plugin.DetachPlugin(
        pb.DetachPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_VGPU)
    )
    assert detached.released_references > 0
    assert not (await api.plugin.ListPlugins(pb.ListPluginsRequest(vm=vm))).plugins
    await api.vm.DeleteVm(pb.DeleteVmRequest(vm=vm))


async def test_audit_names_the_stale_ppgtt_entry_after_a_bypassing_dma(api: Stubs) -> None:
    """dma_policy=bypass (the default): a DMA into a shadowed table is not seen, and
    AuditPlugin reports that entry with its table gfn, index and both values."""
    vm = await new_vm(api)
    status = await run_to_end(api, pb.StartWorkloadRequest(
        vm=vm, kind=pb.WORKLOAD_KIND_GPU_PPGTT, count=3000, rate=0, seed=5,
    ))
    assert status.state == pb.WORKLOAD_STATE_FINISHED, status.error
    tracked = (await api.tracking.QueryTracking(pb.QueryTrackingRequest(
        vm=vm, ranges=[pb.GfnRange(start=TABLE_BASE_GFN, count=TABLE_PAGES)],
        only_tracked=True, include_owners=True,
    ))).gfns
    tables = [g.gfn for g in tracked if any("vgpu" in o.id for o in g.owners)]
    assert tables
    gfn = tables[-1]
    value = ((0x100000 + 77) << 12) | 0x3  # present, writable, a data page
    await api.memory.DmaWrite(
        pb.DmaWriteRequest(vm=vm, gpa=(gfn << 12) + 511 * 8, data=value.to_bytes(8, "little"))
    )
    audit = await api.plugin.AuditPlugin(pb.AuditPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_VGPU))
    assert audit.mismatch_count == 1
    m = audit.mismatches[0]
    assert (m.table, m.table_gfn, m.index, m.guest_entry) == ("ppgtt", gfn, 511, value)
    assert 1 <= m.level <= 4 and m.actual != m.expected and m.reason
    await api.vm.DeleteVm(pb.DeleteVmRequest(vm=vm))


async def test_tracked_fraction_is_ignored_by_workloads_without_it(api: Stubs) -> None:
    """gpu-ppgtt has no tracked fraction: the field is ignored, not an unknown option."""
    vm = await new_vm(api)
    status = await run_to_end(api, pb.StartWorkloadRequest(
        vm=vm, kind=pb.WORKLOAD_KIND_GPU_PPGTT, count=500, seed=1, tracked_fraction=0.5,
    ))
    assert status.state == pb.WORKLOAD_STATE_FINISHED, status.error
    assert "tracked_fraction" not in status.config.options
    await api.vm.DeleteVm(pb.DeleteVmRequest(vm=vm))


async def test_shadow_root_and_translation_use_the_requested_vcpu(api: Stubs) -> None:
    vm = await new_vm(api)
    await api.memory.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=vm, slot=0, npages=256))
    await api.plugin.AttachPlugin(pb.AttachPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_SHADOW_MMU))
    root = await api.plugin.SetShadowRoot(pb.SetShadowRootRequest(vm=vm, vcpu=3, cr3=0x5000))
    assert root.root_gfn == 5
    info = (await api.plugin.ListPlugins(pb.ListPluginsRequest(vm=vm))).plugins[0].info
    assert info["cr3"] == "vcpu3=0x5000"
    out = await api.plugin.TranslateShadow(pb.TranslateShadowRequest(vm=vm, vcpu=3, gva=0x1000))
    assert not out.present and out.fault
    for call in (
        api.plugin.SetShadowRoot(pb.SetShadowRootRequest(vm=vm, vcpu=8, cr3=0x5000)),
        api.plugin.TranslateShadow(pb.TranslateShadowRequest(vm=vm, vcpu=8, gva=0x1000)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "vcpu" in (err.value.details() or "")
    await api.vm.DeleteVm(pb.DeleteVmRequest(vm=vm))
