"""Tenancy over a real daemon: tokens, isolation, quotas, safe defaults."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.auth import hash_token
from pagetrackd.startup import ExitStatus
from tests.daemon_process import BIN, start_daemon

TOKENS = {"alice-secret": ("alice", "tenant"), "bob-secret": ("bob", "tenant"),
          "root-secret": ("ops", "admin")}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A daemon with three tokens (alice, bob: tenants; ops: admin) and small quotas."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("".join(
        f'[[token]]\nsha256 = "{hash_token(t)}"\ntenant = "{n}"\nrole = "{r}"\n\n'
        for t, (n, r) in TOKENS.items()
    ))
    config = tmp_path / "config.toml"
    config.write_text(
        f'tokens_file = "{tokens}"\n'
        "[quotas]\nvms = 3\nwatchers = 2\n"
        "[tenant_quotas.bob]\nwrite_rate = 100\n"
    )
    daemon = start_daemon(tmp_path, "--config", str(config))
    yield daemon.tcp, tmp_path
    assert daemon.stop() == 0
    log = daemon.log.read_text()
    for secret in TOKENS:
        assert secret not in log, "a token reached the log"


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def channel(daemon: tuple[str, Path]) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(daemon[0]) as ch:
        yield ch


async def _code(coro: Any) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_missing_or_wrong_token_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    """No token and an unknown token both get UNAUTHENTICATED; health needs none."""
    vms = pbg.VmServiceStub(channel)
    assert await _code(vms.ListVms(pb.ListVmsRequest())) == grpc.StatusCode.UNAUTHENTICATED
    assert await _code(
        vms.ListVms(pb.ListVmsRequest(), metadata=_md("nope"))
    ) == grpc.StatusCode.UNAUTHENTICATED
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health: Any = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_other_tenants_vm_is_not_found_for_every_call(channel: grpc.aio.Channel) -> None:
    """Bob gets NOT_FOUND on every RPC that names Alice's VM, with the same message as a
    VM that does not exist, and Alice's VM is unchanged."""
    a, b = _md("alice-secret"), _md("bob-secret")
    vms = pbg.VmServiceStub(channel)
    mem = pbg.MemoryServiceStub(channel)
    trk = pbg.TrackingServiceStub(channel)
    wat = pbg.WatchServiceStub(channel)
    plg = pbg.PluginServiceStub(channel)
    wl = pbg.WorkloadServiceStub(channel)
    adm = pbg.AdminServiceStub(channel)
    await vms.CreateVm(pb.CreateVmRequest(name="secret-vm"), metadata=a)
    await mem.SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm="secret-vm", slot=0, npages=16, log_dirty_pages=True),
        metadata=a,
    )
    await trk.AddTracking(pb.TrackingChangeRequest(vm="secret-vm", gfns=[1]), metadata=a)
    calls: list[Any] = [
        vms.GetVm(pb.GetVmRequest(vm="secret-vm"), metadata=b),
        vms.DeleteVm(pb.DeleteVmRequest(vm="secret-vm"), metadata=b),
        vms.SetVmPolicy(pb.SetVmPolicyRequest(vm="secret-vm"), metadata=b),
        mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm="secret-vm", slot=0), metadata=b),
        mem.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm="secret-vm"), metadata=b),
        mem.GetDirtyLog(pb.GetDirtyLogRequest(vm="secret-vm", slot=0), metadata=b),
        mem.WriteGuest(pb.WriteGuestRequest(vm="secret-vm", gpa=4096, data=b"x"), metadata=b),
        mem.WriteGuestBatch(
            pb.WriteGuestBatchRequest(vm="secret-vm", gpa=[4096], vcpu=[0], length=[1],
                                      data=b"x"), metadata=b),
        mem.ReadGuest(pb.ReadGuestRequest(vm="secret-vm", gpa=4096, length=1), metadata=b),
        mem.DmaWrite(pb.DmaWriteRequest(vm="secret-vm", gpa=4096, data=b"x"), metadata=b),
        trk.AddTracking(pb.TrackingChangeRequest(vm="secret-vm", gfns=[2]), metadata=b),
        trk.RemoveTracking(pb.TrackingChangeRequest(vm="secret-vm", gfns=[1]), metadata=b),
        trk.QueryTracking(pb.QueryTrackingRequest(vm="secret-vm", gfns=[1]), metadata=b),
        wat.Unwatch(pb.UnwatchRequest(vm="secret-vm", notifier_id=1), metadata=b),
        wat.ListNotifiers(pb.ListNotifiersRequest(vm="secret-vm"), metadata=b),
        plg.AttachPlugin(pb.AttachPluginRequest(vm="secret-vm", kind=pb.PLUGIN_KIND_VGPU),
                         metadata=b),
        plg.ListPlugins(pb.ListPluginsRequest(vm="secret-vm"), metadata=b),
        wl.StartWorkload(
            pb.StartWorkloadRequest(vm="secret-vm", kind=pb.WORKLOAD_KIND_GPU_PPGTT), metadata=b
        ),
        wl.ListWorkloads(pb.ListWorkloadsRequest(vm="secret-vm"), metadata=b),
        adm.GetStats(pb.GetStatsRequest(vm="secret-vm"), metadata=b),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
        assert info.value.details() == "VM 'secret-vm' not found"
    stream: Any = wat.Watch(pb.WatchRequest(vm="secret-vm"), metadata=b)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await vms.ListVms(pb.ListVmsRequest(), metadata=b)
    assert [v.name for v in listed.vms] == []
    # Alice's VM is exactly as she left it.
    state = await trk.QueryTracking(
        pb.QueryTrackingRequest(vm="secret-vm", gfns=[1, 2]), metadata=a
    )
    assert [g.counter for g in state.gfns] == [1, 0]
    # Bob may make his own VM of the same name; the two never meet.
    await vms.CreateVm(pb.CreateVmRequest(name="secret-vm"), metadata=b)
    got = await vms.GetVm(pb.GetVmRequest(vm="secret-vm"), metadata=b)
    assert got.vm.tenant == "bob" and got.vm.tracked_gfns == 0


async def test_admin_lists_every_tenant_and_tenants_cannot(channel: grpc.aio.Channel) -> None:
    """all_tenants needs the admin role."""
    vms = pbg.VmServiceStub(channel)
    await vms.CreateVm(pb.CreateVmRequest(name="a1"), metadata=_md("alice-secret"))
    await vms.CreateVm(pb.CreateVmRequest(name="b1"), metadata=_md("bob-secret"))
    assert await _code(
        vms.ListVms(pb.ListVmsRequest(all_tenants=True), metadata=_md("alice-secret"))
    ) == grpc.StatusCode.PERMISSION_DENIED
    every = await vms.ListVms(pb.ListVmsRequest(all_tenants=True), metadata=_md("root-secret"))
    assert {(v.tenant, v.name) for v in every.vms} == {("alice", "a1"), ("bob", "b1")}


async def test_quotas_name_the_quota_and_its_value(channel: grpc.aio.Channel) -> None:
    """VM count, watchers and write rate are refused with RESOURCE_EXHAUSTED naming them."""
    a = _md("alice-secret")
    vms = pbg.VmServiceStub(channel)
    for i in range(3):
        await vms.CreateVm(pb.CreateVmRequest(name=f"v{i}"), metadata=a)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await vms.CreateVm(pb.CreateVmRequest(name="v3"), metadata=a)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 VMs" in (info.value.details() or "")
    wat = pbg.WatchServiceStub(channel)
    streams: list[Any] = [wat.Watch(pb.WatchRequest(vm="v0"), metadata=a) for _ in range(2)]
    for s in streams:
        assert (await s.read()).HasField("registered")
    third: Any = wat.Watch(pb.WatchRequest(vm="v0"), metadata=a)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await third.read()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 Watch streams" in (info.value.details() or "")
    for s in streams:
        s.cancel()
    # Bob's write_rate of 100/s: a burst of 100 passes, the next big batch is refused and
    # changes nothing.
    b = _md("bob-secret")
    await vms.CreateVm(pb.CreateVmRequest(name="w"), metadata=b)
    mem = pbg.MemoryServiceStub(channel)
    await mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm="w", slot=0, npages=16), metadata=b)
    ok = await mem.WriteGuestBatch(
        pb.WriteGuestBatchRequest(vm="w", gpa=[0] * 90, vcpu=[0], length=[1] * 90,
                                  data=b"a" * 90), metadata=b)
    assert ok.writes == 90
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mem.WriteGuestBatch(
            pb.WriteGuestBatchRequest(vm="w", gpa=[0] * 50, vcpu=[0], length=[1] * 50,
                                      data=b"b" * 50), metadata=b)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "write_rate" in (info.value.details() or "")
    data = await mem.ReadGuest(pb.ReadGuestRequest(vm="w", gpa=0, length=1), metadata=b)
    assert data.data == b"a"


def test_network_address_without_tokens_needs_insecure(tmp_path: Path) -> None:
    """Listening beyond loopback without tokens is refused unless --insecure is given."""
    out = subprocess.run(
        [str(BIN / "pagetrackd"), "--listen", "0.0.0.0:0"], capture_output=True, text=True,
        timeout=30, env={**os.environ, "PAGETRACK_LISTEN": ""},
    )
    assert out.returncode == ExitStatus.SETTING
    assert "--insecure" in out.stderr and "Traceback" not in out.stderr
    daemon = start_daemon(tmp_path, "--insecure", listen=("127.0.0.1:0", "0.0.0.0:0"))
    assert daemon.stop() == 0
    assert "daemon.insecure" in daemon.log.read_text()
