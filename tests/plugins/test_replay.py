"""Record a VM's operations and replay them into a fresh VM (DESIGN §3 Record/replay)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from pagetrackd.domain import DmaPolicy, FailedPrecondition, InvalidArgument, SlotFlags, Vm
from pagetrackd.domain.types import TENANT_OWNER
from pagetrackd.plugins.vgpu import Vgpu, find_vgpu
from pagetrackd.replay import Recorder, ReplayDiverged, read_header, replay, vm_from_header
from pagetrackd.workloads.gpu_ppgtt import GpuPpgttWorkload

from .vgpu_helpers import Sink, memory_image

OPTS = {
    "ppgtts": 2,
    "initial_mappings": 48,
    "updates_per_submit": 48,
    "split_fraction": 0.25,
    "churn_every": 6,
    "evict_fraction": 0.2,
    "data_pages": 2048,
    "table_pages": 256,
}


def owners(vm: Vm) -> list[tuple[int, int, dict[str, int]]]:
    gfns = vm.tracked_gfns().tolist()
    return [(i.gfn, i.count, i.owners) for i in vm.track_query(gfns)]


def record_gpu_run(out: io.StringIO | Path, partial: str = "flush") -> tuple[Vm, Sink]:
    """A gpu-ppgtt run plus the other kinds of call, recorded."""
    vm = Vm("rec", vcpus=4, dma_policy=DmaPolicy.NOTIFY)
    sink = Sink()
    vm.register_notifier(sink)  # plain notifiers are not recorded
    with Recorder(vm, out) as rec:
        w = GpuPpgttWorkload(21, {**OPTS, "partial": partial})
        w.setup(vm)  # slots + a vGPU attached by the workload itself
        for n in (700, 1300, 2500, 500):
            w.step(vm, n)
        vm.track_add(np.array([0x100000, 0x100001]), owner=TENANT_OWNER)
        vm.write(1, 0x100000 << 12, b"tracked data")
        vm.cmpxchg(2, 0x100000 << 12, b"tracked ", b"exchange")  # exchanges: an event
        vm.cmpxchg(2, 0x100000 << 12, b"tracked ", b"missed!!")  # does not
        vm.dma_write(0x10000 << 12, (0x10001 << 12 | 3).to_bytes(8, "little"))  # into a table
        vm.set_memslot(5, 0x900000, 16, SlotFlags.LOG_DIRTY_PAGES)
        vm.write(0, 0x900003 << 12, b"dirty")
        vm.get_dirty_log(5)
        vgpu = find_vgpu(vm)
        assert vgpu is not None
        vgpu.call("flush")
        w.step(vm, 1000)
        assert rec.records > 10
    return vm, sink


def test_replay_reproduces_memory_events_and_shadow_exactly() -> None:
    buf = io.StringIO()
    vm, sink = record_gpu_run(buf)
    buf.seek(0)
    fresh = Vm("fresh", vcpus=4)
    fresh_sink = Sink()
    fresh.register_notifier(fresh_sink)
    result = replay(buf, fresh)
    assert result.vm is fresh and fresh.dma_policy is DmaPolicy.NOTIFY
    assert fresh.seq == vm.seq > 1000
    assert fresh_sink.events == sink.events  # (seq, vcpu, gpa, data, source) each
    assert memory_image(fresh) == memory_image(vm)
    assert owners(fresh) == owners(vm)
    assert fresh.memslots() == vm.memslots()
    a, b = find_vgpu(vm), result.plugins["vgpu"]
    assert isinstance(b, Vgpu) and a is not None
    assert a.audit() == b.audit()
    sa, sb = a.status(), b.status()
    sa.pop("vm")
    sb.pop("vm")
    assert sa == sb
    assert b.partial == "flush"
    assert a.call("ppgtts") == b.call("ppgtts")
    for pp in a.call("ppgtts")["ppgtts"]:
        for va in (1 << 32, (1 << 32) + 0x5000, (1 << 32) + 0x40000):
            out = a.call("translate", va=va, ppgtt=pp["ppgtt"])
            assert out == b.call("translate", va=va, ppgtt=pp["ppgtt"])


def test_only_outermost_calls_are_recorded() -> None:
    """The vGPU's own tracking (inside writes and calls) is replayed by the vGPU, not
    recorded: no track_add with its owner appears in the file."""
    buf = io.StringIO()
    record_gpu_run(buf, partial="halves")
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["format"] == "pagetrack-recording" and lines[0]["vm"]["vcpus"] == 4
    ops = [r["op"] for r in lines[1:]]
    assert ops[:3] == ["set_memslot", "set_memslot", "plugin_attach"]
    assert lines[3]["options"] == {"map": {"partial": "halves", "missing_table": "fail"}}
    assert {"write_batch", "plugin_call", "track_add", "dma_write", "get_dirty_log",
            "cmpxchg"} <= set(ops)
    owners_seen = {r["args"].get("owner") for r in lines[1:] if r["op"] == "track_add"}
    assert owners_seen == {TENANT_OWNER}


def test_replay_from_a_file_into_a_vm_made_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    vm, sink = record_gpu_run(path)
    header = read_header(path)
    assert header["vm"]["name"] == "rec"
    result = replay(path)
    assert result.vm.name == "rec" and result.vm is not vm
    assert memory_image(result.vm) == memory_image(vm)
    assert vm_from_header(header, "other").vcpus == 4


def test_stop_restores_the_vm_and_plugin_methods() -> None:
    vm = Vm("r")
    rec = Recorder(vm, io.StringIO())
    vgpu = Vgpu()
    vgpu.attach(vm)
    assert "write" in vm.__dict__ and "call" in vgpu.__dict__
    rec.stop()
    assert not {"write", "write_batch", "register_notifier"} & set(vm.__dict__)
    assert "call" not in vgpu.__dict__ and "detach" not in vgpu.__dict__


def test_failed_calls_are_not_recorded() -> None:
    buf = io.StringIO()
    vm = Vm("r")
    with Recorder(vm, buf) as rec:
        vm.set_memslot(0, 0x10, 4)
        with pytest.raises(InvalidArgument):
            vm.set_memslot(1, 0x11, 4)  # overlaps
        with pytest.raises(FailedPrecondition):
            vm.track_add([0x999])
        assert rec.records == 1


def test_attach_plugin_records_the_options_given() -> None:
    buf = io.StringIO()
    vm = Vm("r")
    with Recorder(vm, buf) as rec:
        vm.set_memslot(0, 0x100, 16)
        rec.attach_plugin(Vgpu(), partial="flush")
    records = [json.loads(x) for x in buf.getvalue().splitlines()[1:]]
    assert [r["op"] for r in records] == ["set_memslot", "plugin_attach"]
    buf.seek(0)
    vgpu = replay(buf).plugins["vgpu"]
    assert isinstance(vgpu, Vgpu) and vgpu.partial == "flush"


def test_recorder_needs_a_fresh_vm() -> None:
    vm = Vm("r")
    vm.set_memslot(0, 0x10, 4)
    with pytest.raises(FailedPrecondition):
        Recorder(vm, io.StringIO())
    other = Vm("s")
    Vgpu().attach(other)
    with pytest.raises(FailedPrecondition):
        Recorder(other, io.StringIO())


def test_replay_detects_divergence() -> None:
    buf = io.StringIO()
    vm = Vm("r")
    with Recorder(vm, buf):
        vm.set_memslot(0, 0x10, 4)
        vm.track_add([0x10])
        vm.write(0, 0x10 << 12, b"abcd")
    lines = buf.getvalue().splitlines()
    last = json.loads(lines[-1])
    last["seq"] = 7
    lines[-1] = json.dumps(last)
    with pytest.raises(ReplayDiverged):
        replay(io.StringIO("\n".join(lines)))


def test_replay_refuses_bad_input() -> None:
    with pytest.raises(InvalidArgument):
        replay(io.StringIO(""))
    with pytest.raises(InvalidArgument):
        replay(io.StringIO('{"format": "something-else"}\n'))
    vm = Vm("r")
    vm.set_memslot(0, 0x10, 4)
    buf = io.StringIO()
    with Recorder(Vm("q"), buf):
        pass
    buf.seek(0)
    with pytest.raises(FailedPrecondition):
        replay(buf, vm)
