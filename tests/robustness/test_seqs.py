"""A seq is never handed out twice, also across a SIGKILL: the daemon reserves seqs on
disk before handing them out, and a resume across what a crash lost gets a RESTART gap
with the exact range. Each daemon run has its own incarnation id."""

from __future__ import annotations

from pathlib import Path

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemons
from tests.robustness.support import tracked_vm, watch_until, write_batch


def test_sigkill_then_new_writes_never_reuse_a_seq(daemons: Daemons, tmp_path: Path) -> None:
    """Today's bug: after SIGKILL the daemon came back at the seq of its last save and
    gave the seqs a client had already seen to new, different events."""
    state = tmp_path / "state"
    d = daemons.start("--save-interval", "3600", state_dir=state)
    tracked_vm(d)
    assert d.stop() == 0  # the VM is on disk, at seq 0
    d = daemons.start("--save-interval", "3600", state_dir=state)
    mem = d.stub("MemoryService")
    last = 0
    for i in range(20):
        _, last = write_batch(mem, "vm1", 100, start=i * 100)
    assert last == 2000
    _, seen = watch_until(d, "vm1", 1, 2000)  # a client has seen seqs 1..2000
    assert seen[-1].seq[-1] == 2000
    d.kill()

    d = daemons.start("--save-interval", "3600", state_dir=state)
    head = d.stub("VmService").GetVm(pb.GetVmRequest(vm="vm1")).vm.head_seq
    assert head >= 2000, f"the daemon came back at seq {head}, below seqs already seen"
    first, _ = write_batch(d.stub("MemoryService"), "vm1", 10, value=7)
    assert first > 2000
    # The client resumes where it stopped: it learns that 2001..head are lost, then
    # gets the new events.
    _, got = watch_until(d, "vm1", 2001, first)
    assert got[0] == pb.Gap(first_seq=2001, last_seq=head, count=head - 2000,
                            reason=pb.GAP_REASON_RESTART)
    assert got[1].seq[0] == first
    # From before the crash: everything saved (nothing after seq 0) and then the gap.
    _, got = watch_until(d, "vm1", 1, first)
    assert got[0] == pb.Gap(first_seq=1, last_seq=head, count=head,
                            reason=pb.GAP_REASON_RESTART)


def test_each_run_has_its_own_incarnation(daemons: Daemons, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ids: list[str] = []
    for _ in range(3):
        d = daemons.start(state_dir=state)
        if not ids:
            tracked_vm(d)
        stream = d.stub("WatchService").Watch(pb.WatchRequest(vm="vm1"), timeout=10)
        reg = next(stream).registered
        stream.cancel()
        info = d.stub("AdminService").GetServerInfo(pb.GetServerInfoRequest())
        assert reg.incarnation and reg.incarnation == info.incarnation
        ids.append(reg.incarnation)
        assert d.stop() == 0
    assert len(set(ids)) == 3


def test_clean_restart_continues_at_the_next_seq(daemons: Daemons, tmp_path: Path) -> None:
    """A SIGTERM saves everything and gives back the unused reservation: no gap."""
    state = tmp_path / "state"
    d = daemons.start(state_dir=state)
    tracked_vm(d)
    _, last = write_batch(d.stub("MemoryService"), "vm1", 50)
    assert d.stop() == 0
    d = daemons.start(state_dir=state)
    first, _ = write_batch(d.stub("MemoryService"), "vm1", 5)
    assert first == last + 1
