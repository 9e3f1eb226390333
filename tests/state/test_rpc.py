"""SnapshotVm and RestoreVm through a real daemon."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.state.daemon import Daemon, start_daemon
from tests.state.scenario import PAGE, build_vm, fingerprint


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("rpc"))
    build_vm(d)
    yield d
    d.stop()


def _snapshot(d: Daemon, vm: str = "vm1", **kw: Any) -> tuple[bytes, list[pb.SnapshotChunk]]:
    chunks = list(d.stub("AdminService").SnapshotVm(pb.SnapshotVmRequest(vm=vm, **kw)))
    return b"".join(c.data for c in chunks), chunks


def _restore(d: Daemon, data: bytes, vm: str = "", replace: bool = False) -> pb.Vm:
    def requests() -> Iterator[pb.RestoreVmRequest]:
        yield pb.RestoreVmRequest(vm=vm, replace=replace, data=data[:5000])
        for off in range(5000, len(data), 7000):
            yield pb.RestoreVmRequest(data=data[off : off + 7000])

    vm_: pb.Vm = d.stub("AdminService").RestoreVm(requests()).vm
    return vm_


def _without_leases(tracking: dict[int, Any]) -> dict[int, Any]:
    out = {}
    for gfn, (counter, owners, wp, lp) in tracking.items():
        kept = [o for o in owners if o[0] != pb.OWNER_KIND_LEASE]
        dropped = sum(o[2] for o in owners if o[0] == pb.OWNER_KIND_LEASE)
        if counter - dropped:
            out[gfn] = (counter - dropped, kept, wp, lp)
    return out


def test_snapshot_streams_checked_chunks(daemon: Daemon) -> None:
    """Chunks are in order, the last carries size, sha256, format version and head seq."""
    data, chunks = _snapshot(daemon, include_memory=True, chunk_bytes=4096)
    assert len(chunks) > 1
    assert [c.offset for c in chunks] == [
        sum(len(x.data) for x in chunks[:i]) for i in range(len(chunks))
    ]
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last.total_bytes == len(data)
    assert last.sha256 == hashlib.sha256(data).digest()
    assert last.format_version == 1
    head = daemon.stub("VmService").GetVm(pb.GetVmRequest(vm="vm1")).vm.head_seq
    assert last.head_seq == head


def test_round_trip_under_a_new_name(daemon: Daemon) -> None:
    """Restoring a snapshot as another VM gives the same memslots, memory, options,
    plugin shadow and tracking; lease references are not restored (leases belong to
    live clients)."""
    data, _ = _snapshot(daemon, include_memory=True)
    vm = _restore(daemon, data, vm="copy")
    assert vm.name == "copy"
    a, b = fingerprint(daemon, "vm1"), fingerprint(daemon, "copy")
    lease_only = len(a["tracking"]) - len(_without_leases(a["tracking"]))
    assert lease_only == 1  # gfn 7 is held by the lease alone
    assert [(r.slot, r.base_gfn, r.npages, r.readonly) for r in b["regions"]] == [
        (r.slot, r.base_gfn, r.npages, r.readonly) for r in a["regions"]
    ]
    assert b["memory"] == a["memory"]
    assert b["plugins"] == a["plugins"]
    assert b["tracking"] == _without_leases(a["tracking"])
    assert b["vm"].options == a["vm"].options
    assert b["vm"].head_seq == a["vm"].head_seq


def test_restore_refuses_an_existing_vm_unless_replace(daemon: Daemon) -> None:
    """ALREADY_EXISTS without replace; with replace the VM is swapped for the snapshot."""
    data, _ = _snapshot(daemon)
    _restore(daemon, data, vm="twice")
    with pytest.raises(grpc.RpcError) as err:
        _restore(daemon, data, vm="twice")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    daemon.stub("MemoryService").SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm="twice", slot=9, base_gfn=0x40000, npages=1)
    )
    vm = _restore(daemon, data, vm="twice", replace=True)
    assert vm.memslot_count == 3


def test_without_memory_guest_memory_restores_as_zeros(daemon: Daemon) -> None:
    """include_memory=false leaves memory out; it reads as zeros after a restore."""
    data, _ = _snapshot(daemon, include_memory=False)
    full, _ = _snapshot(daemon, include_memory=True)
    assert len(data) < len(full)
    _restore(daemon, data, vm="nomem")
    got = daemon.stub("MemoryService").ReadGuest(
        pb.ReadGuestRequest(vm="nomem", gpa=50 * PAGE, length=16)
    )
    assert got.data == bytes(16)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda b: b[: len(b) - 100], "truncated"),
        (lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:], "sha256 mismatch"),
        (lambda b: b"XXXXXXXX" + b[8:], "not a pagetrack VM snapshot"),
        (lambda b: b[:8] + b"\x02" + b[9:], "format_version 2 is not supported"),
        (lambda b: b"", "truncated"),
    ],
)
def test_restore_rejects_damaged_data(daemon: Daemon, damage: Any, words: str) -> None:
    """Damaged data is INVALID_ARGUMENT with a message naming the problem; nothing is
    created."""
    data, _ = _snapshot(daemon)
    with pytest.raises(grpc.RpcError) as err:
        _restore(daemon, damage(data), vm="broken")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (err.value.details() or "")
    names = [v.name for v in daemon.stub("VmService").ListVms(pb.ListVmsRequest()).vms]
    assert "broken" not in names


def test_snapshot_of_unknown_vm_is_not_found(daemon: Daemon) -> None:
    """SnapshotVm of a VM that does not exist is NOT_FOUND."""
    with pytest.raises(grpc.RpcError) as err:
        _snapshot(daemon, vm="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
