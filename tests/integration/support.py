"""Helpers for the integration tests: raw stubs, error checks, state snapshots, streams."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.waiting import HANG_S

#: Codes a client mistake must never get.
SERVER_FAULTS = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@dataclass
class Api:
    """One channel and a stub per service."""

    channel: grpc.aio.Channel
    vm: pbg.VmServiceAsyncStub
    mem: pbg.MemoryServiceAsyncStub
    track: pbg.TrackingServiceAsyncStub
    lease: pbg.LeaseServiceAsyncStub
    watch: pbg.WatchServiceAsyncStub
    plugin: pbg.PluginServiceAsyncStub
    workload: pbg.WorkloadServiceAsyncStub
    admin: pbg.AdminServiceAsyncStub
    health: Any  # grpc_health's stubs type only the sync stub


def connect(target: str, options: list[tuple[str, Any]] | None = None) -> Api:
    """Stubs for every service on a fresh insecure channel to ``target`` (with grpc
    channel ``options``)."""
    ch = grpc.aio.insecure_channel(target, options=options)
    return Api(  # the stubs' __new__ is typed to return the async stub for an aio channel
        ch,
        pbg.VmServiceStub(ch),
        pbg.MemoryServiceStub(ch),
        pbg.TrackingServiceStub(ch),
        pbg.LeaseServiceStub(ch),
        pbg.WatchServiceStub(ch),
        pbg.PluginServiceStub(ch),
        pbg.WorkloadServiceStub(ch),
        pbg.AdminServiceStub(ch),
        health_pb2_grpc.HealthStub(ch),
    )


def new_name(prefix: str = "t") -> str:
    """A VM name no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, *needles: str
) -> str:
    """Await ``call``, which must fail with ``code``; every needle must appear in the
    message (case-insensitive). Returns the message."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        assert exc.code() not in SERVER_FAULTS, f"server fault for a client mistake: {details}"
        assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {details}"
        for needle in needles:
            assert needle.lower() in details.lower(), f"{needle!r} not in message {details!r}"
        return details
    raise AssertionError(f"expected {code.name}, but the call succeeded")


async def expect_stream_error(
    call: Any, code: grpc.StatusCode, *needles: str
) -> str:
    """Read a server stream that must fail with ``code`` before sending anything."""

    async def first() -> None:
        msg = await call.read()
        raise AssertionError(f"expected {code.name}, got a message: {msg}")

    return await expect_error(first(), code, *needles)


async def snapshot(api: Api, vm: str, *, stats: bool = True) -> dict[str, Any]:
    """Everything observable about a VM (and the tenant's leases), to compare before and
    after a refused call: VM, memslots, tracking with owners, notifiers, plugins,
    counters, memory contents."""
    got = (await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm
    regions = (await api.mem.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm=vm))).regions
    tracking = await api.track.QueryTracking(
        pb.QueryTrackingRequest(vm=vm, only_tracked=True, include_owners=True)
    )
    notifiers = await api.watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))
    plugins = await api.plugin.ListPlugins(pb.ListPluginsRequest(vm=vm))
    leases = (await api.lease.ListLeases(pb.ListLeasesRequest())).leases
    lease_ids = sorted((le.id, le.references, le.label) for le in leases)
    memory = hashlib.sha256()
    for r in regions:
        for off in range(0, r.npages, 256):
            n = min(256, r.npages - off)
            data = await api.mem.ReadGuest(
                pb.ReadGuestRequest(vm=vm, gpa=(r.base_gfn + off) << 12, length=n << 12)
            )
            memory.update(data.data)
    out: dict[str, Any] = {
        "vm": got.SerializeToString(deterministic=True),
        "regions": [r.SerializeToString(deterministic=True) for r in regions],
        "tracking": tracking.SerializeToString(deterministic=True),
        "notifiers": notifiers.SerializeToString(deterministic=True),
        "plugins": plugins.SerializeToString(deterministic=True),
        "leases": lease_ids,
        "memory": memory.hexdigest(),
    }
    if stats:
        s = (await api.admin.GetStats(pb.GetStatsRequest(vm=vm))).vms[0]
        s.uptime_ms = 0
        out["stats"] = s.SerializeToString(deterministic=True)
    return out


async def vm_names(api: Api) -> list[str]:
    """Names of the tenant's VMs."""
    return [v.name for v in (await api.vm.ListVms(pb.ListVmsRequest())).vms]


@dataclass
class Watch:
    """A Watch stream being read, with what it delivered so far."""

    call: Any
    registered: pb.Registered = field(default_factory=pb.Registered)
    messages: list[pb.WatchResponse] = field(default_factory=list)

    async def next(self, wait_s: float = HANG_S) -> pb.WatchResponse | None:
        """The next message (None at the end of the stream)."""
        msg = await asyncio.wait_for(self.call.read(), wait_s)
        if msg is grpc.aio.EOF:
            return None
        assert isinstance(msg, pb.WatchResponse)
        self.messages.append(msg)
        return msg

    async def next_kind(self, wait_s: float = HANG_S, skip: tuple[str, ...] = ("progress",)
                        ) -> pb.WatchResponse | None:
        """The next message that is not of a kind in ``skip``."""
        while True:
            msg = await self.next(wait_s)
            if msg is None or msg.WhichOneof("kind") not in skip:
                return msg

    async def events_until(self, last_seq: int, wait_s: float = HANG_S) -> list[pb.EventBatch]:
        """Event batches up to and including the one holding ``last_seq`` (other kinds
        of message are kept in ``messages`` but not returned)."""
        out: list[pb.EventBatch] = []
        while True:
            msg = await self.next(wait_s)
            assert msg is not None, "stream ended before the expected events arrived"
            if msg.WhichOneof("kind") == "events":
                out.append(msg.events)
                if msg.events.seq[-1] >= last_seq:
                    return out

    def of_kind(self, kind: str) -> list[Any]:
        """The messages of one kind received so far (the inner messages)."""
        return [getattr(m, kind) for m in self.messages if m.WhichOneof("kind") == kind]


async def open_watch(api: Api, request: pb.WatchRequest, wait_s: float = HANG_S) -> Watch:
    """Start a Watch and read its Registered message."""
    w = Watch(api.watch.Watch(request))
    first = await w.next(wait_s)
    assert first is not None and first.WhichOneof("kind") == "registered", first
    w.registered = first.registered
    return w


def split_events(batch: pb.EventBatch) -> list[tuple[int, int, int, int, int, bytes]]:
    """(seq, gpa, length, vcpu, flags, data) per event of a columnar batch."""
    out = []
    pos = 0
    for i in range(len(batch.seq)):
        n = batch.length[i]
        data = batch.data[pos : pos + n] if batch.data else b""
        pos += n if batch.data else 0
        out.append((batch.seq[i], batch.gpa[i], n, batch.vcpu[i], batch.flags[i], data))
    return out


async def tracked_writes(
    api: Api, vm: str, gpas: list[int], payload: bytes = b"\xab" * 8, vcpu: int = 0
) -> pb.WriteGuestBatchResponse:
    """One WriteGuestBatch of ``len(gpas)`` writes of ``payload``."""
    return await api.mem.WriteGuestBatch(
        pb.WriteGuestBatchRequest(
            vm=vm, gpa=gpas, vcpu=[vcpu], length=[len(payload)] * len(gpas),
            data=payload * len(gpas),
        )
    )


async def notifiers_gone(api: Api, vm: str, wait_s: float = HANG_S) -> bool:
    """Whether the VM's notifier list empties within ``wait_s`` (a cancelled stream is
    cleaned up by the server shortly after the client lets go)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        if not (await api.watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm))).notifiers:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
