"""Record and replay through the daemon: a VM created with ``record`` runs the gpu-ppgtt
workload (vGPU attached by it), tenant tracking and a DMA; ReplayVm rebuilds it into a new
VM with the same memory, plugin shadow and event stream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pagetrack
from tests.daemon_process import DaemonProcess, start_daemon

TABLE_GFN = 0x10000  # gpu-ppgtt's table slot


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path, "--log-level", "warning")
    yield d
    assert d.stop() == 0


def _events(pt: pagetrack.Client, vm: str, head: int) -> list[tuple[int, int, bytes]]:
    out: list[tuple[int, int, bytes]] = []
    with pt.watch(vm, start_seq=1, resume=False) as stream:
        for msg in stream:
            if isinstance(msg, pagetrack.EventBatch):
                out += [(e.seq, e.gpa, bytes(e.data)) for e in msg.events()]
                if out[-1][0] >= head:
                    return out
            assert not isinstance(msg, pagetrack.Gap), msg
    return out


def test_recorded_vm_replays_to_the_same_state(daemon: DaemonProcess) -> None:
    """Memory, vGPU audit and every event (seq, gpa, bytes) match after ReplayVm."""
    with pagetrack.Client(daemon.tcp) as pt:
        pt.create_vm("rec", record=True, dma_policy="notify")
        w = pt.start_workload("rec", "gpu-ppgtt", count=3000, seed=5)
        while pt.get_workload(w.id).state == pagetrack.WorkloadState.RUNNING:
            time.sleep(0.05)
        pt.set_memory_region("rec", 9, 0x900000, 16)
        pt.add_tracking("rec", ranges=[(0x900000, 4)])
        pt.write("rec", 0x900000 << 12, b"guest")
        pt.dma_write("rec", (0x900001 << 12) + 8, b"device")
        head = pt.get_vm("rec").head_seq
        recording = pt.get_recording("rec")
        copy, records = pt.replay_vm(recording, "copy")
        assert records > 4 and copy.head_seq == head
        for gpa, n in (((TABLE_GFN << 12), 1 << 20), (0x900000 << 12, 8192)):
            assert pt.read("copy", gpa, n) == pt.read("rec", gpa, n)
        assert pt.audit_plugin("copy", "vgpu").mismatch_count == 0
        assert [p.kind for p in pt.list_plugins("copy")] == [p.kind for p in pt.list_plugins("rec")]
        assert _events(pt, "copy", head) == _events(pt, "rec", head)


def test_bad_recordings_are_refused_and_leave_nothing(daemon: DaemonProcess) -> None:
    """An unrecorded VM has no recording; garbage and cut-off recordings are refused and
    no VM is left behind."""
    with pagetrack.Client(daemon.tcp) as pt:
        pt.create_vm("plain")
        with pytest.raises(pagetrack.FailedPrecondition, match="not recorded"):
            pt.get_recording("plain")
        with pytest.raises(pagetrack.InvalidArgument):
            pt.replay_vm(b"not json\n", "x")
        pt.create_vm("rec", record=True)
        pt.set_memory_region("rec", 0, 0, 16)
        pt.write("rec", 0, b"abc")
        good = pt.get_recording("rec")
        with pytest.raises(pagetrack.InvalidArgument):
            pt.replay_vm(good[:-5], "x")
        assert [v.name for v in pt.list_vms()] == ["plain", "rec"]
        copy, _ = pt.replay_vm(good, "x")
        assert pt.read("x", 0, 3) == b"abc"
