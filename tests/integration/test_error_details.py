"""Errors a program can act on (AIP-193), through a real daemon and the Python client:
each kind of error carries its google.rpc.Status details and the client exposes them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

import pagetrack
from pagetrack import AsyncClient, FieldViolation, QuotaViolation, ResourceInfo
from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.auth import hash_token
from tests.daemon_process import DaemonProcess, start_daemon
from tests.integration.support import new_name
from tests.rich_status import DOMAIN, check_details

TOKENS = {"alice-key": ("alice", "tenant"), "bob-key": ("bob", "tenant")}
E = TypeVar("E", bound=pagetrack.PageTrackError)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon with two tenants: alice may have 3 VMs, bob writes at most 100/s."""
    tmp = tmp_path_factory.mktemp("errors")
    tokens = tmp / "tokens.toml"
    tokens.write_text("".join(
        f'[[token]]\nsha256 = "{hash_token(t)}"\ntenant = "{n}"\nrole = "{r}"\n\n'
        for t, (n, r) in TOKENS.items()
    ))
    config = tmp / "config.toml"
    config.write_text(
        f'tokens_file = "{tokens}"\n'
        "[tenant_quotas.alice]\nvms = 3\n[tenant_quotas.bob]\nwrite_rate = 100\n"
    )
    d = start_daemon(tmp, "--config", str(config))
    yield d
    assert d.stop() == 0


def _client(daemon: DaemonProcess, token: str | None = "alice-key") -> AsyncClient:
    return AsyncClient(daemon.tcp, token=token, timeout=30)


async def _raises(cls: type[E], call: Awaitable[Any], reason: str) -> E:
    """Await ``call``; it must raise ``cls`` with ``reason`` in our domain."""
    with pytest.raises(cls) as info:
        await call
    err = info.value
    assert (err.reason, err.domain) == (reason, DOMAIN), f"{err.code} {err.reason}: {err}"
    return err


async def test_invalid_argument_names_the_field(daemon: DaemonProcess) -> None:
    """INVALID_ARGUMENT carries a BadRequest naming the field at fault and why, also
    for nested fields and on a stream."""
    async with _client(daemon) as pt:
        err = await _raises(pagetrack.InvalidArgument, pt.create_vm("Bad_Name"), "INVALID_FIELD")
        assert err.field_violations == (FieldViolation("name", err.message, "INVALID_FIELD"),)
        assert err.metadata["field"] == "name"
        err = await _raises(pagetrack.InvalidArgument, pt.create_vm(new_name(), gfn_bits=99),
                            "INVALID_FIELD")
        assert [v.field for v in err.field_violations] == ["options.limits.gfn_bits"]
        assert "12..40" in err.field_violations[0].description
        vm = new_name()
        await pt.create_vm(vm)
        await pt.set_memory_region(vm, 0, 0x100, 16)
        err = await _raises(pagetrack.InvalidArgument, pt.write(vm, 0x100000, b"x", vcpu=99),
                            "INVALID_FIELD")
        assert [v.field for v in err.field_violations] == ["vcpu"]
        err = await _raises(pagetrack.InvalidArgument, pt.set_memory_region(vm, 1, 0x108, 16),
                            "MEMSLOT_OVERLAP")
        assert len(err.field_violations) == 1
        stream = pt.watch(vm, max_batch_delay_ms=10**6, resume=False)
        err = await _raises(pagetrack.InvalidArgument, anext(stream), "INVALID_FIELD")
        assert [v.field for v in err.field_violations] == ["max_batch_delay_ms"]
        await stream.aclose()
        await pt.delete_vm(vm)


async def test_not_found_says_what_and_which(daemon: DaemonProcess) -> None:
    """NOT_FOUND carries a ResourceInfo with the kind of thing and the name as given."""
    async with _client(daemon) as pt:
        err = await _raises(pagetrack.NotFound, pt.get_vm("no-such-vm"), "VM_NOT_FOUND")
        assert err.resource_info == ResourceInfo("vm", "no-such-vm", err.message)
        vm = new_name()
        await pt.create_vm(vm)
        try:
            cases: list[tuple[Awaitable[Any], str, ResourceInfo]] = [
                (pt.get_dirty_log(vm, 7), "MEMSLOT_NOT_FOUND", ResourceInfo("memslot", "7")),
                (pt.revoke_lease("no-lease"), "LEASE_NOT_FOUND",
                 ResourceInfo("lease", "no-lease")),
                (pt.get_workload("no-workload"), "WORKLOAD_NOT_FOUND",
                 ResourceInfo("workload", "no-workload")),
                (pt.detach_plugin(vm, "vgpu"), "PLUGIN_NOT_ATTACHED",
                 ResourceInfo("plugin", "vgpu")),
                (pt.unwatch(vm, 999), "NOTIFIER_NOT_FOUND", ResourceInfo("notifier", "999")),
            ]
            for call, reason, want in cases:
                err = await _raises(pagetrack.NotFound, call, reason)
                assert err.resource_info is not None
                got = err.resource_info
                assert (got.resource_type, got.resource_name) == (want.resource_type,
                                                                  want.resource_name)
        finally:
            await pt.delete_vm(vm)


async def test_another_tenants_vm_answers_byte_for_byte_like_a_missing_one(
    daemon: DaemonProcess,
) -> None:
    """Bob's errors naming a VM that does not exist and the same name once it is Alice's
    are identical: code, message and every byte of the status details."""
    name = new_name("secret")
    alice, bob = (("authorization", "Bearer alice-key"),), (("authorization", "Bearer bob-key"),)

    async def answers(ch: grpc.aio.Channel) -> list[tuple[Any, ...]]:
        vms, track = pbg.VmServiceStub(ch), pbg.TrackingServiceStub(ch)
        out = []
        for call in (
            vms.GetVm(pb.GetVmRequest(vm=name), metadata=bob),
            vms.DeleteVm(pb.DeleteVmRequest(vm=name), metadata=bob),
            track.AddTracking(pb.TrackingChangeRequest(vm=name, gfns=[1]), metadata=bob),
            pbg.WatchServiceStub(ch).Watch(pb.WatchRequest(vm=name), metadata=bob).read(),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            err = info.value
            assert check_details(err, None) is None
            out.append((err.code(), err.details(), tuple(err.trailing_metadata() or ())))
        return out

    async with grpc.aio.insecure_channel(daemon.tcp) as ch:
        missing = await answers(ch)
        await pbg.VmServiceStub(ch).CreateVm(pb.CreateVmRequest(name=name), metadata=alice)
        theirs = await answers(ch)
        await pbg.VmServiceStub(ch).DeleteVm(pb.DeleteVmRequest(vm=name), metadata=alice)
    assert missing == theirs
    assert all(code == grpc.StatusCode.NOT_FOUND for code, _, _ in missing)
    assert all(any(k == "grpc-status-details-bin" for k, _ in md) for _, _, md in missing)


async def test_quota_failure_and_retry_info(daemon: DaemonProcess) -> None:
    """A count quota names tenant, quota and limit and has no RetryInfo; the write-rate
    quota says how long to wait, and after that wait the same batch passes (a batch over
    the rate, which no wait lets through, gets no RetryInfo)."""
    async with _client(daemon) as pt:
        names = [new_name() for _ in range(4)]
        for name in names[:3]:
            await pt.create_vm(name)
        try:
            err = await _raises(pagetrack.ResourceExhausted, pt.create_vm(names[3]),
                                "QUOTA_EXCEEDED")
            assert err.quota_violations == (
                QuotaViolation("tenant:alice", err.message, "vms", 3),
            )
            assert err.retry_delay is None
        finally:
            for name in names[:3]:
                await pt.delete_vm(name)
    async with _client(daemon, "bob-key") as pt:
        vm = new_name()
        await pt.create_vm(vm)
        await pt.set_memory_region(vm, 0, 0, 16)
        refused: pagetrack.ResourceExhausted | None = None
        for _ in range(100):  # a full second's worth each time: refused within a few
            try:
                await pt.write_batch(vm, [0] * 100, [b"a"] * 100)
            except pagetrack.ResourceExhausted as exc:
                refused = exc
                break
        assert refused is not None
        assert (refused.reason, refused.domain) == ("QUOTA_EXCEEDED", DOMAIN)
        assert [(v.subject, v.quota_id, v.limit) for v in refused.quota_violations] == [
            ("tenant:bob", "write_rate", 100)
        ]
        assert refused.retry_delay is not None and 0 < refused.retry_delay <= 1.0
        # The behaviour under test: after the wait the daemon named, the batch fits.
        await asyncio.sleep(refused.retry_delay)
        result = await pt.write_batch(vm, [0] * 100, [b"b"] * 100)
        assert result.writes == 100
        # More than a second's worth never fits: no RetryInfo then.
        err = await _raises(pagetrack.ResourceExhausted,
                            pt.write_batch(vm, [0] * 150, [b"c"] * 150), "QUOTA_EXCEEDED")
        assert err.retry_delay is None and err.quota_violations[0].limit == 100
        await pt.delete_vm(vm)


async def test_counter_overflow_is_a_quota_failure(daemon: DaemonProcess) -> None:
    """A track counter at 65535 refuses one more reference with a QuotaFailure naming the
    counter limit."""
    async with _client(daemon) as pt:
        vm = new_name()
        await pt.create_vm(vm)
        await pt.set_memory_region(vm, 0, 0, 4)
        await pt.add_tracking(vm, [1] * 65535)
        err = await _raises(pagetrack.ResourceExhausted, pt.add_tracking(vm, [1]),
                            "TRACK_COUNTER_OVERFLOW")
        assert [(v.quota_id, v.limit) for v in err.quota_violations] == [("track_counter", 65535)]
        await pt.delete_vm(vm)


async def test_precondition_conflict_range_and_auth_reasons(daemon: DaemonProcess) -> None:
    """FAILED_PRECONDITION, ALREADY_EXISTS, OUT_OF_RANGE (with the oldest seq held),
    UNAUTHENTICATED and PERMISSION_DENIED each carry their own reason."""
    async with _client(daemon) as pt:
        vm = new_name()
        await pt.create_vm(vm, history_events=4)
        try:
            await pt.set_memory_region(vm, 0, 0, 16)
            await _raises(pagetrack.FailedPrecondition, pt.add_tracking(vm, [100]),
                          "GFN_NOT_IN_MEMSLOT")
            await _raises(pagetrack.FailedPrecondition, pt.remove_tracking(vm, [1]),
                          "GFN_NOT_TRACKED")
            await _raises(pagetrack.AlreadyExists, pt.create_vm(vm), "VM_ALREADY_EXISTS")
            await pt.add_tracking(vm, [0])
            await pt.write_batch(vm, [8 * i for i in range(10)], [b"x"] * 10)
            stream = pt.watch(vm, start_seq=1, allow_compacted=False, resume=False)
            err = await _raises(pagetrack.OutOfRange, anext(stream), "HISTORY_COMPACTED")
            assert err.metadata["oldest_seq"] == "7" and err.oldest_seq == 7
            await stream.aclose()
            stream = pt.watch(vm, start_seq=99, resume=False)
            await _raises(pagetrack.OutOfRange, anext(stream), "OUT_OF_RANGE")
            await stream.aclose()
            await _raises(pagetrack.PermissionDenied, pt.list_vms(all_tenants=True),
                          "ROLE_NOT_PERMITTED")
        finally:
            await pt.delete_vm(vm)
    async with _client(daemon, None) as pt:
        await _raises(pagetrack.Unauthenticated, pt.list_vms(), "TOKEN_INVALID")
    async with _client(daemon, "wrong-key") as pt:
        await _raises(pagetrack.Unauthenticated, pt.list_vms(), "TOKEN_INVALID")


def test_sync_client_exposes_the_same_details(daemon: DaemonProcess, tmp_path: Path) -> None:
    """The blocking Client's exceptions carry the details too."""
    with pagetrack.Client(daemon.tcp, token="alice-key") as pt:
        with pytest.raises(pagetrack.NotFound) as info:
            pt.get_vm("no-such-vm")
    assert info.value.reason == "VM_NOT_FOUND"
    assert info.value.resource_info == ResourceInfo("vm", "no-such-vm", info.value.message)
