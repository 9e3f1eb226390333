"""Refused calls change nothing: cases the RPC fuzzer (test_fuzz_rpcs.py) found, each
pinned down here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import DaemonProcess, start_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("refused"))
    yield d
    assert d.stop() == 0


async def _state(ch: grpc.aio.Channel, vm: str) -> tuple[Any, ...]:
    got = (await pbg.VmServiceStub(ch).GetVm(pb.GetVmRequest(vm=vm))).vm
    got.ClearField("created_at_ns")
    return (
        got,
        await pbg.PluginServiceStub(ch).ListPlugins(pb.ListPluginsRequest(vm=vm)),
        await pbg.WatchServiceStub(ch).ListNotifiers(pb.ListNotifiersRequest(vm=vm)),
        await pbg.MemoryServiceStub(ch).ListMemoryRegions(pb.ListMemoryRegionsRequest(vm=vm)),
        await pbg.TrackingServiceStub(ch).QueryTracking(
            pb.QueryTrackingRequest(vm=vm, only_tracked=True, include_owners=True)),
        await pbg.MemoryServiceStub(ch).ReadGuest(
            pb.ReadGuestRequest(vm=vm, gpa=0, length=16 * 4096)),
    )


@pytest.mark.parametrize(
    "kind", [pb.WORKLOAD_KIND_GUEST_PAGETABLES, pb.WORKLOAD_KIND_KERNEL_BUILD])
async def test_workload_refused_for_a_small_guest_leaves_no_shadow_mmu(
    daemon: DaemonProcess, kind: int
) -> None:
    """A guest OS workload on a 16-page guest runs out of guest memory while booting:
    RESOURCE_EXHAUSTED, and the shadow MMU its setup attached is gone again (it used to
    stay attached, tracking the guest's page tables, after the call was refused)."""
    vm = f"small-{kind}"
    async with grpc.aio.insecure_channel(daemon.tcp) as ch:
        await pbg.VmServiceStub(ch).CreateVm(pb.CreateVmRequest(name=vm))
        await pbg.MemoryServiceStub(ch).SetMemoryRegion(
            pb.SetMemoryRegionRequest(vm=vm, slot=0, npages=16))
        await pbg.TrackingServiceStub(ch).AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[5]))
        before = await _state(ch, vm)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await pbg.WorkloadServiceStub(ch).StartWorkload(
                pb.StartWorkloadRequest(vm=vm, kind=kind, count=10))  # type: ignore[arg-type]
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of memory" in (exc.value.details() or "")
        assert await _state(ch, vm) == before
        listed = await pbg.WorkloadServiceStub(ch).ListWorkloads(pb.ListWorkloadsRequest(vm=vm))
        assert not listed.workloads
