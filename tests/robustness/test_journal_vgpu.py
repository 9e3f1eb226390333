"""With ``durability = "journal"`` the vGPU's operations that shadow a table tree a
table at a time (BuildPpgtt, AttachPlugin at a root, SubmitVgpu's flush) are journaled
like any other acknowledged change: after a SIGKILL the restart has the same PPGTTs
with the same shadow, and replays nothing twice."""

from __future__ import annotations

from pathlib import Path

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemon, Daemons
from tests.robustness.test_starve_plugins import ppgtt_writes

ARGS = ("--durability", "journal")
ROOT_A, ROOT_B = 0x100, 0x120  #: two trees that share no table
#: tables in ppgtt_writes(root, 2): PML4, PDP, 2 PDs, 2 x 512 PTs
TABLES = 1 + 1 + 2 + 2 * 512


def _vgpu(d: Daemon, vm: str) -> pb.PluginStatus:
    (status,) = d.stub("PluginService").ListPlugins(pb.ListPluginsRequest(vm=vm)).plugins
    assert isinstance(status, pb.PluginStatus)
    return status


def _vm_with_trees(d: Daemon, vm: str) -> None:
    d.stub("VmService").CreateVm(pb.CreateVmRequest(name=vm))
    d.stub("MemoryService").SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=vm, slot=0, base_gfn=0, npages=1 << 18))
    for root in (ROOT_A, ROOT_B):
        tree = ppgtt_writes(root, 2)
        tree.vm = vm
        d.stub("MemoryService").WriteGuestBatch(tree)


def test_ppgtt_builds_survive_sigkill(daemons: Daemons, tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = daemons.start(*ARGS, state_dir=state)
    plugins = d.stub("PluginService")
    _vm_with_trees(d, "built")
    plugins.AttachPlugin(pb.AttachPluginRequest(vm="built", kind=pb.PLUGIN_KIND_VGPU))
    a = plugins.BuildPpgtt(pb.BuildPpgttRequest(vm="built", root_gpa=ROOT_A << 12))
    b = plugins.BuildPpgtt(pb.BuildPpgttRequest(vm="built", root_gpa=ROOT_B << 12))
    assert a.shadow_tables == TABLES and b.shadow_tables == 2 * TABLES
    plugins.SubmitVgpu(pb.SubmitVgpuRequest(vm="built", ppgtt_id=a.ppgtt_id))
    _vm_with_trees(d, "attached")
    plugins.AttachPlugin(pb.AttachPluginRequest(
        vm="attached", kind=pb.PLUGIN_KIND_VGPU, options={"root_gpa": str(ROOT_A << 12)}))
    before = {vm: _vgpu(d, vm).counters for vm in ("built", "attached")}
    d.kill()

    d = daemons.start(*ARGS, state_dir=state)
    log = d.log_text()
    assert "journal.replay_failed" not in log and "state.plugin_not_restored" not in log, log
    for vm in ("built", "attached"):
        after = _vgpu(d, vm).counters
        for key in ("ppgtts", "shadow_tables", "shadow_entries", "submissions"):
            assert after[key] == before[vm][key], (vm, key, after[key], before[vm][key])
        audit = d.stub("PluginService").AuditPlugin(
            pb.AuditPluginRequest(vm=vm, kind=pb.PLUGIN_KIND_VGPU))
        assert audit.mismatch_count == 0
    assert d.stop() == 0


def test_a_restored_vgpu_survives_sigkill_once(daemons: Daemons, tmp_path: Path) -> None:
    """RestoreVm rebuilds a vGPU's PPGTTs a table at a time after the VM is registered;
    that rebuild is part of the restore, which the journal replays from the snapshot:
    after a SIGKILL the PPGTTs are there once, not twice."""
    state = tmp_path / "state"
    d = daemons.start(*ARGS, state_dir=state)
    plugins = d.stub("PluginService")
    _vm_with_trees(d, "src")
    plugins.AttachPlugin(pb.AttachPluginRequest(
        vm="src", kind=pb.PLUGIN_KIND_VGPU, options={"root_gpa": str(ROOT_A << 12)}))
    plugins.BuildPpgtt(pb.BuildPpgttRequest(vm="src", root_gpa=ROOT_B << 12))
    snap = b"".join(c.data for c in d.stub("AdminService").SnapshotVm(
        pb.SnapshotVmRequest(vm="src", include_memory=True)))
    d.stub("AdminService").RestoreVm(iter([pb.RestoreVmRequest(vm="copy", data=snap)]))
    before = _vgpu(d, "copy").counters
    assert before["ppgtts"] == 2 and before["shadow_tables"] == 2 * TABLES
    d.kill()

    d = daemons.start(*ARGS, state_dir=state)
    log = d.log_text()
    assert "journal.replay_failed" not in log and "state.plugin_not_restored" not in log, log
    after = _vgpu(d, "copy").counters
    for key in ("ppgtts", "shadow_tables", "shadow_entries"):
        assert after[key] == before[key], (key, after[key], before[key])
    assert d.stop() == 0
