"""The journal replays every path that changes a VM, not only guest writes: workloads
with the plugins they attach, RestoreVm, deletes and a name used again."""

from __future__ import annotations

from pathlib import Path

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemon, Daemons, wait_for
from tests.robustness.support import tracked_vm, write_batch

ARGS = ("--durability", "journal", "--save-interval", "3600")


def _clean_replay(d: Daemon) -> None:
    log = d.log_text()
    assert "journal.replay_failed" not in log, log
    assert "journal.seq_differs" not in log, log


def _vm(d: Daemon, name: str) -> pb.Vm:
    vm: pb.Vm = d.stub("VmService").GetVm(pb.GetVmRequest(vm=name)).vm
    return vm


def test_workload_with_its_plugin_replays_exactly(daemons: Daemons, tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = daemons.start(*ARGS, state_dir=state)
    d.stub("VmService").CreateVm(pb.CreateVmRequest(name="gpu"))
    w = d.stub("WorkloadService")
    run = w.StartWorkload(pb.StartWorkloadRequest(
        vm="gpu", kind=pb.WORKLOAD_KIND_GPU_PPGTT, count=3000, seed=5))
    wait_for(lambda: w.GetWorkload(pb.GetWorkloadRequest(id=run.workload.id)).workload.state
             != pb.WORKLOAD_STATE_RUNNING, what="the workload to finish")
    before = _vm(d, "gpu")
    plugins = d.stub("PluginService").ListPlugins(pb.ListPluginsRequest(vm="gpu")).plugins
    assert d.stub("AdminService").GetServerInfo(pb.GetServerInfoRequest()).problems == []
    # The flusher writes what nobody waited for within a few tens of ms.
    wait_for(lambda: sum(p.stat().st_size for p in (state / "journal").glob("*.jnl"))
             > 100_000, what="the workload's writes in the journal")
    d.kill()
    d = daemons.start(*ARGS, state_dir=state)
    _clean_replay(d)
    after = _vm(d, "gpu")
    assert after.head_seq >= before.head_seq
    assert after.tracked_gfns == before.tracked_gfns
    again = d.stub("PluginService").ListPlugins(pb.ListPluginsRequest(vm="gpu")).plugins
    assert [(p.kind, p.tracked_gfns) for p in again] == [
        (p.kind, p.tracked_gfns) for p in plugins]


def test_restore_delete_and_a_name_used_again(daemons: Daemons, tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = daemons.start(*ARGS, state_dir=state)
    tracked_vm(d, "src")
    write_batch(d.stub("MemoryService"), "src", 40)
    snap = b"".join(c.data for c in d.stub("AdminService").SnapshotVm(
        pb.SnapshotVmRequest(vm="src", include_memory=True)))
    d.stub("AdminService").RestoreVm(iter([pb.RestoreVmRequest(vm="copy", data=snap)]))
    d.stub("VmService").DeleteVm(pb.DeleteVmRequest(vm="src"))
    tracked_vm(d, "src", pages=8)  # the same name, a new VM
    write_batch(d.stub("MemoryService"), "src", 3, pages=8)
    d.kill()

    d = daemons.start(*ARGS, state_dir=state)
    _clean_replay(d)
    assert _vm(d, "copy").head_seq == 40
    src = _vm(d, "src")
    assert src.head_seq >= 3 and src.tracked_gfns == 8
    names = [v.name for v in d.stub("VmService").ListVms(pb.ListVmsRequest()).vms]
    assert names == ["copy", "src"]
    assert d.stop() == 0


def test_journal_files_are_compacted_by_a_save_after_restarts(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Each run writes its own journal file; the first save that completes after the
    restarts deletes every file its VM files hold (the newest stays)."""
    state = tmp_path / "state"

    def files() -> int:
        return len(list((state / "journal").glob("*.jnl")))

    d = daemons.start(*ARGS, state_dir=state)
    tracked_vm(d)
    for _run in range(3):
        write_batch(d.stub("MemoryService"), "vm1", 10)
        d.kill()  # no save ran: the journal holds everything
        d = daemons.start(*ARGS, state_dir=state)
        _clean_replay(d)
    assert files() == 3
    write_batch(d.stub("MemoryService"), "vm1", 10)
    d.kill()

    d = daemons.start("--durability", "journal", "--save-interval", "0.2", state_dir=state)
    _clean_replay(d)
    wait_for(lambda: files() <= 1 or None, what="a save to compact the journal")
    assert _vm(d, "vm1").head_seq >= 40
    d.kill()
    d = daemons.start(*ARGS, state_dir=state)
    _clean_replay(d)
    assert _vm(d, "vm1").head_seq >= 40
    assert d.stop() == 0
