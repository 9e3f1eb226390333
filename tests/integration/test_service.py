"""The daemon as a service: health, reflection, the unix socket, and shutdown with a
live stream."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.integration.conftest import DaemonProcess
from tests.integration.support import (
    Api,
    connect,
    expect_error,
    new_name,
    open_watch,
    split_events,
    tracked_writes,
)
from tests.rich_status import details_of

SERVICES = [f"pagetrack.v1.{s}" for s in pb.DESCRIPTOR.services_by_name]
SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_health_overall_and_per_service(api: Api) -> None:
    """grpc.health.v1 answers SERVING overall and for each pagetrack service, and
    NOT_FOUND for a service it does not have."""
    assert (await api.health.Check(health_pb2.HealthCheckRequest())).status == SERVING
    for name in SERVICES:
        r = await api.health.Check(health_pb2.HealthCheckRequest(service=name))
        assert r.status == SERVING, name
    await expect_error(
        api.health.Check(health_pb2.HealthCheckRequest(service="pagetrack.v1.NoSuch")),
        grpc.StatusCode.NOT_FOUND,
    )


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_every_service(api: Api, version: str) -> None:
    """Server reflection answers as grpc.reflection.v1 (what current grpcurl and grpc-js
    ask first) and as v1alpha: it lists our services, health and both reflection services,
    and serves the file that defines a service, so stock tools need no proto files. v1's
    messages are v1alpha's under a new package, so v1alpha's classes speak v1 on the wire."""
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    call = api.channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="pagetrack.v1.VmService"),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=f"grpc.reflection.{version}.ServerReflection"
        ),
        reflection_pb2.ServerReflectionRequest(file_by_filename="pagetrack/v1/pagetrack.proto"),
    ]))
    replies: list[Any] = [r async for r in call]
    assert len(replies) == 4
    names = {s.name for s in replies[0].list_services_response.service}
    assert set(SERVICES) <= names
    assert {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    for reply in (replies[1], replies[3]):
        files = [descriptor_pb2.FileDescriptorProto.FromString(f)
                 for f in reply.file_descriptor_response.file_descriptor_proto]
        ours = next(f for f in files if f.name == "pagetrack/v1/pagetrack.proto")
        assert ours.package == "pagetrack.v1"
        assert "VmService" in {s.name for s in ours.service}
    own = descriptor_pb2.FileDescriptorProto.FromString(
        replies[2].file_descriptor_response.file_descriptor_proto[0]
    )
    assert own.package == f"grpc.reflection.{version}"
    info = own.service[0].method[0]
    assert (info.name, info.input_type) == (
        "ServerReflectionInfo", f".grpc.reflection.{version}.ServerReflectionRequest"
    )


async def test_unix_socket_serves_the_api(api: Api, unix_api: Api) -> None:
    """Over the unix socket: create a VM, set a slot, track, watch, write a batch and
    see every event; state is shared with the TCP listener."""
    name = new_name()
    await unix_api.vm.CreateVm(pb.CreateVmRequest(name=name))
    try:
        await unix_api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=name, slot=0, npages=16))
        await unix_api.track.AddTracking(pb.TrackingChangeRequest(vm=name, gfns=[1]))
        w = await open_watch(unix_api, pb.WatchRequest(vm=name, max_batch_delay_ms=0))
        r = await tracked_writes(unix_api, name, [4096 + 8 * i for i in range(50)], b"unix")
        assert (r.first_seq, r.last_seq) == (1, 50)
        events = [e for b in await w.events_until(50) for e in split_events(b)]
        assert [e[0] for e in events] == list(range(1, 51)) and events[7][5] == b"unix"
        assert (await api.vm.GetVm(pb.GetVmRequest(vm=name))).vm.head_seq == 50  # via TCP
        await expect_error(
            unix_api.mem.WriteGuest(pb.WriteGuestRequest(vm=name, vcpu=99, gpa=4096, data=b"x")),
            grpc.StatusCode.INVALID_ARGUMENT, "vcpu 99",
        )
        h = await unix_api.health.Check(health_pb2.HealthCheckRequest())
        assert h.status == SERVING
        w.call.cancel()
    finally:
        await unix_api.vm.DeleteVm(pb.DeleteVmRequest(vm=name))


async def test_sigterm_ends_streams_with_unavailable_and_exits_zero() -> None:
    """On SIGTERM, with a Watch stream open: health turns NOT_SERVING, the stream ends
    with UNAVAILABLE and a message saying how to resume, and the process exits 0."""
    d = DaemonProcess("--grace", "1")
    d.start()
    api = connect(d.tcp)
    try:
        name = new_name()
        await api.vm.CreateVm(pb.CreateVmRequest(name=name))
        await api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=name, slot=0, npages=4))
        await api.track.AddTracking(pb.TrackingChangeRequest(vm=name, gfns=[0]))
        w = await open_watch(api, pb.WatchRequest(vm=name, max_batch_delay_ms=0))
        await tracked_writes(api, name, [0, 8])
        await w.events_until(2)
        health = api.health.Watch(health_pb2.HealthCheckRequest())
        assert (await health.read()).status == SERVING
        d.terminate()
        assert (await asyncio.wait_for(health.read(), 5)).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        try:
            while (msg := await w.next(5.0)) is not None:
                assert msg.WhichOneof("kind") in ("progress", "events"), msg
            raise AssertionError("the stream ended OK instead of UNAVAILABLE")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert "shutting down" in (exc.details() or "")
            assert "2" in (exc.details() or "")  # the last seq delivered, to resume from
            info = details_of(exc)["google.rpc.ErrorInfo"]
            assert (info.reason, info.domain) == ("SHUTTING_DOWN", "pagetrack.dev")
        health.cancel()
        code = await asyncio.get_running_loop().run_in_executor(None, d.wait)
        assert code == 0, d.log()[-3000:]
        events = [r.get("event") for r in d.log_records()]
        assert "daemon.stopped" in events
        assert not [r for r in d.log_records() if r.get("level") == "error"]
        d.cleanup()
    finally:
        await api.channel.close()
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
