"""Recordings live in the state directory with their VM, go on across a restart, are
bounded by the tenant's recording_bytes quota, and a replayed close leaves no closed VM
registered."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemon, Daemons
from tests.robustness.support import write_batch


def _recorded_vm(d: Daemon, name: str = "rec", tenant: str | None = None) -> None:
    d.stub("VmService", tenant).CreateVm(
        pb.CreateVmRequest(name=name, options=pb.VmOptions(record=True)))
    d.stub("MemoryService", tenant).SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=0, npages=64))
    d.stub("TrackingService", tenant).AddTracking(
        pb.TrackingChangeRequest(vm=name, ranges=[pb.GfnRange(start=0, count=64)]))


def _recording(d: Daemon, name: str = "rec", tenant: str | None = None) -> bytes:
    chunks = d.stub("AdminService", tenant).GetRecording(pb.GetRecordingRequest(vm=name))
    return b"".join(c.data for c in chunks)


def _replay(d: Daemon, name: str, data: bytes) -> pb.Vm:
    vm: pb.Vm = d.stub("AdminService").ReplayVm(
        iter([pb.ReplayVmRequest(vm=name, data=data)])).vm
    return vm


def test_replayed_close_leaves_no_closed_vm(daemons: Daemons) -> None:
    """Today: the closed VM stayed registered and ListVms/GetStats failed with INTERNAL."""
    d = daemons.start()
    _recorded_vm(d)
    write_batch(d.stub("MemoryService"), "rec", 5)
    data = _recording(d) + json.dumps({"op": "close", "args": {}, "seq": 5}).encode() + b"\n"
    with pytest.raises(grpc.RpcError) as err:
        _replay(d, "copy", data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    names = [v.name for v in d.stub("VmService").ListVms(pb.ListVmsRequest()).vms]
    assert names == ["rec"]
    d.stub("AdminService").GetStats(pb.GetStatsRequest())


def test_recording_is_kept_with_its_vm_across_a_restart(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Today: the recording was gone after a restart, and its file stayed in /tmp."""
    state = tmp_path / "state"
    d = daemons.start(state_dir=state)
    _recorded_vm(d)
    write_batch(d.stub("MemoryService"), "rec", 20)
    assert d.stop() == 0
    assert (state / "recordings" / "default" / "rec.jsonl").is_file()
    d = daemons.start(state_dir=state)
    write_batch(d.stub("MemoryService"), "rec", 7, start=3)
    data = _recording(d)
    copy = _replay(d, "copy", data)
    rec = d.stub("VmService").GetVm(pb.GetVmRequest(vm="rec")).vm
    assert copy.head_seq == rec.head_seq == 27
    mem = d.stub("MemoryService")
    assert mem.ReadGuest(pb.ReadGuestRequest(vm="copy", gpa=0, length=64 * 4096)).data == (
        mem.ReadGuest(pb.ReadGuestRequest(vm="rec", gpa=0, length=64 * 4096)).data)
    d.stub("VmService").DeleteVm(pb.DeleteVmRequest(vm="rec"))
    assert not (state / "recordings" / "default" / "rec.jsonl").exists()


def test_recordings_are_bounded_by_the_quota(daemons: Daemons) -> None:
    d = daemons.start(tenants=("t",),
                      config={"tenant_quotas": {"t": {"recording_bytes": 4000}}})
    _recorded_vm(d, tenant="t")
    for i in range(20):
        write_batch(d.stub("MemoryService", "t"), "rec", 10, start=10 * i)
    with pytest.raises(grpc.RpcError) as err:
        _recording(d, tenant="t")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "recording_bytes" in (err.value.details() or "")
