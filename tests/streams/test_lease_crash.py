"""A client killed with SIGKILL leaves no tracking behind: 10,000 gfns tracked under a TTL
lease are released once the TTL passes, and 10,000 gfns tracked under a Watch stream's
lease are released when the dead client's stream ends. Only that lease's references go:
the tenant's own references on the same gfns stay."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import DaemonProcess, start_daemon, with_parent
from tests.waiting import until

GFNS = 10_000
SHARED = 100  #: gfns 0..SHARED-1 are also tracked by the tenant itself
TTL_MS = 1500

#: The client: tracks GFNS gfns under a lease, says "ready LEASE" and waits to be killed.
#: argv: target, vm, "ttl" or "stream", ttl_ms, gfns.
CLIENT = r"""
import asyncio, sys
import grpc
from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg

async def main(target, vm, kind, ttl, gfns):
    ttl, gfns = int(ttl), int(gfns)
    async with grpc.aio.insecure_channel(target) as ch:
        track = pbg.TrackingServiceStub(ch)
        leases = pbg.LeaseServiceStub(ch)
        if kind == "ttl":
            lease_id = (await leases.CreateLease(
                pb.CreateLeaseRequest(ttl_ms=ttl, label="doomed"))).lease.id
        else:
            stream = pbg.WatchServiceStub(ch).Watch(pb.WatchRequest(vm=vm))
            lease_id = (await stream.read()).registered.lease_id
        await track.AddTracking(pb.TrackingChangeRequest(
            vm=vm, ranges=[pb.GfnRange(start=0, count=gfns)], lease_id=lease_id))
        print("ready", lease_id, flush=True)
        while True:  # keep the lease alive until killed
            if kind == "ttl":
                await leases.KeepAliveLease(pb.KeepAliveLeaseRequest(lease_id=lease_id))
                await asyncio.sleep(ttl / 4000)
            else:
                await stream.read()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("crash"))
    yield d
    assert d.stop() == 0


async def _setup(ch: grpc.aio.Channel, vm: str) -> None:
    await pbg.VmServiceStub(ch).CreateVm(pb.CreateVmRequest(name=vm))
    await pbg.MemoryServiceStub(ch).SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=vm, slot=0, npages=2 * GFNS)
    )
    await pbg.TrackingServiceStub(ch).AddTracking(
        pb.TrackingChangeRequest(vm=vm, ranges=[pb.GfnRange(start=0, count=SHARED)])
    )


async def _tracked(ch: grpc.aio.Channel, vm: str) -> int:
    return (await pbg.VmServiceStub(ch).GetVm(pb.GetVmRequest(vm=vm))).vm.tracked_gfns


def _spawn(target: str, vm: str, kind: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        with_parent([sys.executable, "-c", CLIENT, target, vm, kind, str(TTL_MS), str(GFNS)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"client failed: {line!r} {err}")
    return proc, line.split()[1]


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no goodbye, no RevokeLease, no stream cancel
    proc.communicate(timeout=10)
    assert proc.returncode == -9


async def _later_than(value: Awaitable[int], bound: int) -> int:
    """``value`` if it is past ``bound``, else 0."""
    got = await value
    return got if got > bound else 0


async def _check_released(ch: grpc.aio.Channel, vm: str, lease_id: str) -> None:
    """Only the tenant's own references are left, and the lease is gone."""
    assert await _tracked(ch, vm) == SHARED
    state = await pbg.TrackingServiceStub(ch).QueryTracking(
        pb.QueryTrackingRequest(vm=vm, ranges=[pb.GfnRange(start=0, count=2 * SHARED)],
                                include_owners=True)
    )
    for g in state.gfns:
        if g.gfn < SHARED:
            assert g.counter == 1 and [o.kind for o in g.owners] == [pb.OWNER_KIND_TENANT]
        else:
            assert g.counter == 0 and not g.owners and not g.write_protected
    leases = (await pbg.LeaseServiceStub(ch).ListLeases(pb.ListLeasesRequest())).leases
    assert lease_id not in {le.id for le in leases}


async def test_sigkilled_client_under_ttl_lease_leaves_nothing_after_the_ttl(
    daemon: DaemonProcess,
) -> None:
    """10,000 gfns under a kept-alive TTL lease stay tracked while the client lives; after
    SIGKILL they are all released once the TTL has passed, and not long after."""
    vm = "crash-ttl"
    async with grpc.aio.insecure_channel(daemon.tcp) as ch:
        await _setup(ch, vm)
        proc, lease_id = await asyncio.to_thread(_spawn, daemon.tcp, vm, "ttl")
        leases = pbg.LeaseServiceStub(ch)
        try:

            async def expires_ns() -> int:
                listed = (await leases.ListLeases(pb.ListLeasesRequest())).leases
                return next(le.expires_at_ns for le in listed if le.id == lease_id)

            first = await expires_ns()
            # Keep-alives work: the lease lives on past its first expiry.
            expires = await until(
                lambda: _later_than(expires_ns(), first + TTL_MS * 1_000_000),
                "keep-alives to carry the lease past its first TTL",
            )
            assert await _tracked(ch, vm) == GFNS
        finally:
            await asyncio.to_thread(_kill, proc)

        async def released() -> bool:
            return await _tracked(ch, vm) == SHARED

        await until(released, "the lease to expire and release its tracking")
        # Not before the TTL ran out: a keep-alive after the listing only moves it later.
        assert time.time_ns() >= expires - 10_000_000
        await _check_released(ch, vm, lease_id)


async def test_sigkilled_client_under_stream_lease_leaves_nothing_when_the_stream_ends(
    daemon: DaemonProcess,
) -> None:
    """10,000 gfns under a Watch stream's lease are released as soon as the daemon sees
    the killed client's connection end; the stream is gone from the notifiers."""
    vm = "crash-stream"
    async with grpc.aio.insecure_channel(daemon.tcp) as ch:
        await _setup(ch, vm)
        proc, lease_id = await asyncio.to_thread(_spawn, daemon.tcp, vm, "stream")
        try:
            assert await _tracked(ch, vm) == GFNS
            listed = await pbg.WatchServiceStub(ch).ListNotifiers(
                pb.ListNotifiersRequest(vm=vm))
            assert [n.lease_id for n in listed.notifiers] == [lease_id]
        finally:
            await asyncio.to_thread(_kill, proc)

        async def released() -> bool:
            return await _tracked(ch, vm) == SHARED

        await until(released, "the dead client's stream lease to release its tracking")
        await _check_released(ch, vm, lease_id)
        listed = await pbg.WatchServiceStub(ch).ListNotifiers(pb.ListNotifiersRequest(vm=vm))
        assert not listed.notifiers
