"""Odd values in every field of every request never reach UNKNOWN or INTERNAL, and a
refused request changes nothing.

Requests are generated from the proto descriptors: for each RPC, a sensible base
request, then one variant per field (nested one level) set to an extreme: 2^64-1, 2^63,
2^32-1, empty and huge strings, NUL bytes, NaN and infinities, unknown enum numbers,
odd map entries, columns of another length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.integration.support import SERVER_FAULTS, Api, new_name, notifiers_gone, snapshot

F = FieldDescriptor
SLOT0 = 0x100 << 12

SCALARS: dict[int, list[Any]] = {
    F.TYPE_UINT64: [2**64 - 1, 2**63, 2**52 - 1, 2**40],
    F.TYPE_UINT32: [2**32 - 1, 2**31, 65536],
    F.TYPE_INT64: [-(2**63), 2**63 - 1, -1],
    F.TYPE_INT32: [-(2**31), 2**31 - 1, -1],
    F.TYPE_DOUBLE: [math.nan, math.inf, -math.inf, -1.0, 1e308],
    F.TYPE_FLOAT: [math.nan, math.inf, -1.0],
    F.TYPE_BOOL: [True],
    F.TYPE_STRING: ["", "x" * 5000, "\x00", "ünï-cödé", "../../etc/passwd", " "],
    F.TYPE_BYTES: [b"", b"\x00" * 5000, b"\xff"],
    F.TYPE_ENUM: [99, -1, 2**31 - 1],
}
MAPS: list[dict[str, str]] = [
    {"": ""}, {"x" * 300: "\x00"}, {"pages": "-1"}, {"vcpus": "99999999999999999999999"},
    {"flood_threshold": "nan"}, {"count": "inf"}, {"seed": "1e400"},
]

#: Base requests: valid enough that the variants reach deep validation.
BASES: dict[str, Callable[[str], Message]] = {
    "CreateVm": lambda vm: pb.CreateVmRequest(name=new_name("odd")),
    "DeleteVm": lambda vm: pb.DeleteVmRequest(vm="ghost-vm"),
    "SetMemoryRegion": lambda vm: pb.SetMemoryRegionRequest(vm=vm, slot=7, base_gfn=0x5000,
                                                            npages=1),
    "GetDirtyLog": lambda vm: pb.GetDirtyLogRequest(vm=vm, slot=0),
    "WriteGuest": lambda vm: pb.WriteGuestRequest(vm=vm, vcpu=1, gpa=SLOT0, data=b"w"),
    "WriteGuestBatch": lambda vm: pb.WriteGuestBatchRequest(
        vm=vm, gpa=[SLOT0, SLOT0 + 8], vcpu=[0, 1], length=[4, 4], data=b"abcdefgh"),
    "CompareExchangeGuest": lambda vm: pb.CompareExchangeGuestRequest(
        vm=vm, vcpu=1, gpa=SLOT0, expected=bytes(8), desired=b"exchange"),
    "ReadGuest": lambda vm: pb.ReadGuestRequest(vm=vm, gpa=SLOT0, length=8),
    "DmaWrite": lambda vm: pb.DmaWriteRequest(vm=vm, gpa=SLOT0, data=b"dma"),
    "AddTracking": lambda vm: pb.TrackingChangeRequest(vm=vm, gfns=[0x101]),
    "RemoveTracking": lambda vm: pb.TrackingChangeRequest(vm=vm, gfns=[0x100]),
    "QueryTracking": lambda vm: pb.QueryTrackingRequest(vm=vm, gfns=[0x100]),
    "CreateLease": lambda vm: pb.CreateLeaseRequest(ttl_ms=60000),
    "AttachPlugin": lambda vm: pb.AttachPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_VGPU),
    "DetachPlugin": lambda vm: pb.DetachPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_UNSPECIFIED),
    "AuditPlugin": lambda vm: pb.AuditPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_VGPU),
    "SetShadowRoot": lambda vm: pb.SetShadowRootRequest(vm=vm, cr3=SLOT0),
    "TranslateShadow": lambda vm: pb.TranslateShadowRequest(vm=vm, gva=0x1000),
    "BuildPpgtt": lambda vm: pb.BuildPpgttRequest(vm=vm, root_gpa=SLOT0 + 0x8000),
    "SubmitVgpu": lambda vm: pb.SubmitVgpuRequest(vm=vm, ppgtt_id=1, gpu_addrs=[0]),
    "DestroyPpgtt": lambda vm: pb.DestroyPpgttRequest(vm=vm, ppgtt_id=1),
    "StartWorkload": lambda vm: pb.StartWorkloadRequest(
        vm=vm, kind=pb.WORKLOAD_KIND_RANDOM_WRITES, count=10, options={"pages": "16"}),
}


Setter = Callable[[Any], None]


def _update_map(name: str, value: dict[str, str]) -> Setter:
    return lambda msg: getattr(msg, name).update(value)


def _set(name: str, value: Any) -> Setter:
    return lambda msg: setattr(msg, name, value)


def _replace(name: str, values: list[Any]) -> Setter:
    def apply(msg: Any) -> None:
        field = getattr(msg, name)
        del field[:]
        field.extend(values)

    return apply


def _nested(name: str, inner: Setter, repeated: bool) -> Setter:
    if repeated:
        return lambda msg: inner(getattr(msg, name).add())
    return lambda msg: inner(getattr(msg, name))


def variants(desc: Descriptor, depth: int = 0) -> Iterator[tuple[str, Setter]]:
    """(label, setter) for one extreme value of each field, nested one level."""
    for f in desc.fields:
        sub = f.message_type
        if sub is not None and sub.GetOptions().map_entry:
            for m in MAPS:
                yield f"{f.name}={m!r:.40}", _update_map(f.name, m)
        elif sub is not None:
            if depth >= 1:
                continue
            for label, setter in variants(sub, depth + 1):
                yield f"{f.name}.{label}", _nested(f.name, setter, f.is_repeated)
        else:
            for v in SCALARS[f.type]:
                if f.is_repeated:
                    yield f"{f.name}=[{v!r:.20}]", _replace(f.name, [v])
                    yield f"{f.name}=[{v!r:.20}]*3", _replace(f.name, [v] * 3)
                else:
                    yield f"{f.name}={v!r:.30}", _set(f.name, v)
            if f.is_repeated:
                yield f"{f.name}=[]", _replace(f.name, [])


def unary_methods() -> list[tuple[str, str]]:
    """(service attribute on Api, method name) of every unary-unary RPC."""
    attr = {
        "VmService": "vm", "MemoryService": "mem", "TrackingService": "track",
        "LeaseService": "lease", "WatchService": "watch", "PluginService": "plugin",
        "WorkloadService": "workload", "AdminService": "admin",
    }
    out = []
    for service in pb.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            if not m.client_streaming and not m.server_streaming:
                out.append((attr[service.name], m.name))
    return out


async def cleanup(api: Api, method: str, request: Message, reply: Any) -> None:
    """Undo what a successful odd request started that would outlive the test."""
    if method == "CreateVm":
        await api.vm.DeleteVm(pb.DeleteVmRequest(vm=request.name))  # type: ignore[attr-defined]
    elif method == "StartWorkload":
        await api.workload.StopWorkload(pb.StopWorkloadRequest(id=reply.workload.id))
    elif method == "CreateLease":
        await api.lease.RevokeLease(pb.RevokeLeaseRequest(lease_id=reply.lease.id))


@pytest.mark.parametrize(("service", "method"), unary_methods(), ids=lambda x: str(x))
async def test_odd_values_are_client_errors_and_change_nothing(
    api: Api, vm: str, service: str, method: str
) -> None:
    """Every extreme value in every field of this RPC ends in a client status code
    (never UNKNOWN or INTERNAL); when refused, the VM and the leases are unchanged."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x100, 0x102]))
    stub = getattr(getattr(api, service), method)
    desc = pb.DESCRIPTOR.services_by_name[
        {"vm": "VmService", "mem": "MemoryService", "track": "TrackingService",
         "lease": "LeaseService", "watch": "WatchService", "plugin": "PluginService",
         "workload": "WorkloadService", "admin": "AdminService"}[service]
    ].methods_by_name[method]
    request_cls = getattr(pb, desc.input_type.name)
    base = BASES.get(method, lambda v: request_cls(**({"vm": v} if "vm" in
                                                      desc.input_type.fields_by_name else {})))
    faults = []
    before = await snapshot(api, vm)
    for label, setter in [("base", lambda m: None), *variants(desc.input_type)]:
        request = base(vm)
        setter(request)
        try:
            reply = await stub(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in SERVER_FAULTS:
                faults.append(f"{method}({label}) -> {exc.code().name}: {exc.details()}")
                continue
            after = await snapshot(api, vm)
            if after != before:
                changed = sorted(k for k in after if after[k] != before[k])
                faults.append(f"{method}({label}) -> {exc.code().name} changed {changed}")
                before = after
            continue
        await cleanup(api, method, request, reply)
        before = await snapshot(api, vm)  # a valid odd request may change state
    assert not faults, "\n".join(faults)


async def test_watch_odd_values_are_client_errors(api: Api, vm: str) -> None:
    """Watch with an extreme value in any field either registers or fails with a
    client status code, leaving no notifier or lease behind when it fails."""
    faults = []
    before = await snapshot(api, vm)
    for label, setter in variants(pb.WatchRequest.DESCRIPTOR):
        request = pb.WatchRequest(vm=vm)
        setter(request)
        call = api.watch.Watch(request)
        try:
            first: Any = await call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() in SERVER_FAULTS:
                faults.append(f"Watch({label}) -> {exc.code().name}: {exc.details()}")
            elif await snapshot(api, vm) != before:
                faults.append(f"Watch({label}) -> {exc.code().name} left state behind")
            continue
        assert first.WhichOneof("kind") == "registered", (label, first)
        # A write through the accepted filter must not break anything either.
        await api.mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
            vm=vm, gpa=[SLOT0, SLOT0 + 2 * 4096], vcpu=[0], length=[1, 1], data=b"ab"))
        await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0, data=b"c"))
        call.cancel()
        assert await notifiers_gone(api, vm), label
        stats = (await api.admin.GetStats(pb.GetStatsRequest(vm=vm))).vms[0]
        if stats.notifier_errors:
            faults.append(f"Watch({label}) made a notifier fail on a write")
            break
        before = await snapshot(api, vm)
    assert not faults, "\n".join(faults)
