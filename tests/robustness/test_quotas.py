"""Quotas hold on every path, not only the RPCs: workloads, ReplayVm and restore make
slots, tracking and writes through the same checks. A VM the daemon accepted is never
refused when it loads it again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemon, Daemons, wait_for
from tests.robustness.support import tracked_vm

QUOTAS = {"guest_pages": 4096, "tracked_gfns": 100, "write_rate": 100}


def _quota_daemon(daemons: Daemons, state: Path | None = None,
                  quotas: dict[str, int] | None = None) -> Daemon:
    return daemons.start(state_dir=state, tenants=("t",),
                         config={"tenant_quotas": {"t": quotas or QUOTAS}})


def _refused(call: Any, *args: Any) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    return err.value.details() or ""


def _regions(d: Daemon, vm: str) -> list[Any]:
    return list(d.stub("MemoryService", "t").ListMemoryRegions(
        pb.ListMemoryRegionsRequest(vm=vm)).regions)


def test_workload_cannot_make_a_slot_past_guest_pages(daemons: Daemons) -> None:
    """Today: a 200,000-page slot under a 4,096-page quota."""
    d = _quota_daemon(daemons)
    d.stub("VmService", "t").CreateVm(pb.CreateVmRequest(name="vm1"))
    msg = _refused(d.stub("WorkloadService", "t").StartWorkload, pb.StartWorkloadRequest(
        vm="vm1", kind=pb.WORKLOAD_KIND_RANDOM_WRITES, options={"pages": "200000"}))
    assert "guest pages" in msg
    assert _regions(d, "vm1") == []


def test_workload_cannot_track_past_tracked_gfns(daemons: Daemons) -> None:
    d = _quota_daemon(daemons)
    d.stub("VmService", "t").CreateVm(pb.CreateVmRequest(name="vm1"))
    msg = _refused(d.stub("WorkloadService", "t").StartWorkload, pb.StartWorkloadRequest(
        vm="vm1", kind=pb.WORKLOAD_KIND_RANDOM_WRITES, tracked_fraction=1.0,
        options={"pages": "2000"}))
    assert "tracked" in msg
    vm = d.stub("VmService", "t").GetVm(pb.GetVmRequest(vm="vm1")).vm
    assert vm.tracked_gfns == 0


def test_workload_writes_within_the_write_rate(daemons: Daemons) -> None:
    """Today: 50,900 writes/s past a 100 writes/s quota."""
    d = _quota_daemon(daemons)
    d.stub("VmService", "t").CreateVm(pb.CreateVmRequest(name="vm1"))
    w = d.stub("WorkloadService", "t")
    run = w.StartWorkload(pb.StartWorkloadRequest(
        vm="vm1", kind=pb.WORKLOAD_KIND_RANDOM_WRITES, duration_ms=1500,
        options={"pages": "1000"}))
    wid = run.workload.id
    status = wait_for(lambda: (s := w.GetWorkload(pb.GetWorkloadRequest(id=wid)))
                      and s.workload.state != pb.WORKLOAD_STATE_RUNNING and s,
                      what="the workload to end")
    writes = status.workload.writes
    # a 1 s burst (100) plus 100 writes/s over the 1.5 s it ran
    assert 0 < writes <= 100 + 100 * 1.5 + 10, writes


def test_replay_is_held_to_the_quotas(daemons: Daemons, tmp_path: Path) -> None:
    d = _quota_daemon(daemons)
    header = {"format": "pagetrack-recording", "version": 1, "vm": {
        "name": "x", "vcpus": 1, "dma_policy": "bypass", "semantics": "2016",
        "cost": {"mmio_exit_cycles": 5000, "emulate_cycles": 1500, "fast_cycles": 0,
                 "dma_cycles": 0, "host_hz": 3.3e9},
        "limits": {"max_slots": 509, "gfn_bits": 40, "max_write_bytes": 1 << 20}}}
    op = {"op": "set_memslot",
          "args": {"slot_id": 0, "base_gfn": 0, "npages": 200000, "flags": 0}, "seq": 0}
    data = (json.dumps(header) + "\n" + json.dumps(op) + "\n").encode()
    msg = _refused(d.stub("AdminService", "t").ReplayVm,
                   iter([pb.ReplayVmRequest(vm="r", data=data)]))
    assert "guest pages" in msg
    names = [v.name for v in d.stub("VmService", "t").ListVms(pb.ListVmsRequest()).vms]
    assert names == []


def test_a_vm_accepted_is_never_refused_at_load(daemons: Daemons, tmp_path: Path) -> None:
    """Even when the quotas were lowered before the restart."""
    state = tmp_path / "state"
    d = _quota_daemon(daemons, state)
    tracked_vm(d, pages=100, tenant="t")
    assert d.stop() == 0
    d = _quota_daemon(daemons, state, {"guest_pages": 10, "tracked_gfns": 10, "vms": 0})
    vm = d.stub("VmService", "t").GetVm(pb.GetVmRequest(vm="vm1")).vm
    assert vm.tracked_gfns == 100
    assert not list((state / "vms").glob("*/*.bad"))
    # ... but it does not grow past them
    _refused(d.stub("MemoryService", "t").SetMemoryRegion,
             pb.SetMemoryRegionRequest(vm="vm1", slot=1, base_gfn=1000, npages=5))
