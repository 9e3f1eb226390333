"""The state directory: what a SIGTERM or SIGKILL restart keeps, and bad files refused."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.state.daemon import Daemon, start_daemon
from tests.state.scenario import PAGE, build_vm, fingerprint


def _state_args(state: Path, interval: float = 3600) -> tuple[str, ...]:
    return ("--state-dir", str(state), "--save-interval", str(interval))


def _dirty_pages(d: Daemon, vm: str, slot: int) -> list[int]:
    log = d.stub("MemoryService").GetDirtyLog(pb.GetDirtyLogRequest(vm=vm, slot=slot))
    bits = np.unpackbits(np.frombuffer(log.bitmap, dtype=np.uint8), bitorder="little")
    return [int(i) for i in np.flatnonzero(bits)]


def test_sigterm_restart_restores_everything(tmp_path: Path) -> None:
    """After SIGTERM and a restart, memslots, counters with owners, options, memory,
    leases, plugin state, statistics and the dirty log are as they were, and the seq
    continues from where it stopped."""
    state = tmp_path / "state"
    d = start_daemon(tmp_path, *_state_args(state))
    try:
        info = build_vm(d)
        before = fingerprint(d)
    finally:
        assert d.stop() == 0
    assert (state / "vms" / "default" / "vm1.ptvm").is_file()
    head = before["vm"].head_seq
    assert head > 0
    assert any(
        o[1] == info["lease"] for v in before["tracking"].values() for o in v[1]
    ), "the scenario holds lease references"

    d = start_daemon(tmp_path, *_state_args(state))
    try:
        after = fingerprint(d)
        assert after == before
        assert _dirty_pages(d, "vm1", 0) == [2, 3, 50, 100, 101, 102, 103]
        r = d.stub("MemoryService").WriteGuest(
            pb.WriteGuestRequest(vm="vm1", vcpu=0, gpa=1 * PAGE, data=b"z")
        )
        assert r.pieces[0].seq == head + 1
        # The lease still holds its references and can still be kept alive.
        d.stub("LeaseService").KeepAliveLease(pb.KeepAliveLeaseRequest(lease_id=info["lease"]))
    finally:
        assert d.stop() == 0


def test_resume_across_a_restart(tmp_path: Path) -> None:
    """A client resuming at the next seq gets the new events with no gap; one resuming
    from before the restart gets OUT_OF_RANGE, or a COMPACTED gap if it allows it."""
    state = tmp_path / "state"
    d = start_daemon(tmp_path, *_state_args(state))
    try:
        build_vm(d)
        head = d.stub("VmService").GetVm(pb.GetVmRequest(vm="vm1")).vm.head_seq
    finally:
        assert d.stop() == 0
    d = start_daemon(tmp_path, *_state_args(state))
    try:
        watch = d.stub("WatchService")
        stream = watch.Watch(pb.WatchRequest(vm="vm1", start_seq=head + 1, max_batch_delay_ms=1))
        assert next(stream).WhichOneof("kind") == "registered"
        d.stub("MemoryService").WriteGuest(
            pb.WriteGuestRequest(vm="vm1", vcpu=0, gpa=2 * PAGE, data=b"after")
        )
        for msg in stream:
            kind = msg.WhichOneof("kind")
            assert kind in ("events", "progress"), msg
            if kind == "events":
                assert list(msg.events.seq) == [head + 1]
                break
        stream.cancel()
        with pytest.raises(grpc.RpcError) as err:
            next(iter(watch.Watch(pb.WatchRequest(vm="vm1", start_seq=1))))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        stream = watch.Watch(pb.WatchRequest(vm="vm1", start_seq=1, allow_compacted=True))
        assert next(stream).WhichOneof("kind") == "registered"
        gap = next(stream)
        assert gap.WhichOneof("kind") == "gap"
        assert (gap.gap.first_seq, gap.gap.last_seq) == (1, head)
        assert gap.gap.reason == pb.GAP_REASON_COMPACTED
        stream.cancel()
    finally:
        assert d.stop() == 0


def test_sigkill_loses_at_most_the_last_interval(tmp_path: Path) -> None:
    """With a short save interval, a SIGKILL after a save loses nothing that was saved."""
    state = tmp_path / "state"
    d = start_daemon(tmp_path, *_state_args(state, 0.2))
    try:
        build_vm(d)
        before = fingerprint(d)
        time.sleep(1.0)  # several intervals: the state above is on disk
    finally:
        d.stop(signal.SIGKILL)
    d = start_daemon(tmp_path, *_state_args(state, 0.2))
    try:
        assert fingerprint(d) == before
    finally:
        assert d.stop() == 0


def test_bad_state_files_are_refused_and_moved_aside(tmp_path: Path) -> None:
    """A corrupt, a truncated and a foreign file are each refused with a message naming
    the file and the problem and renamed to .bad; the daemon starts with the valid VM."""
    state = tmp_path / "state"
    d = start_daemon(tmp_path, *_state_args(state))
    try:
        for name in ("vm-a", "vm-b", "vm-c"):
            build_vm(d, name)
    finally:
        assert d.stop() == 0
    vms = state / "vms" / "default"
    a = bytearray((vms / "vm-a.ptvm").read_bytes())
    a[len(a) // 2] ^= 0x40
    (vms / "vm-a.ptvm").write_bytes(bytes(a))
    b = (vms / "vm-b.ptvm").read_bytes()
    (vms / "vm-b.ptvm").write_bytes(b[: len(b) // 2])
    (vms / "vm-d.ptvm").write_bytes(b"not a snapshot at all")

    d = start_daemon(tmp_path, *_state_args(state))
    try:
        names = [v.name for v in d.stub("VmService").ListVms(pb.ListVmsRequest()).vms]
        assert names == ["vm-c"]
        log = d.log_text()
        refused = [ln for ln in log.splitlines() if "state.file_refused" in ln]
        assert len(refused) == 3
        for file, reason in (
            ("vm-a.ptvm", "sha256 mismatch"),
            ("vm-b.ptvm", "truncated"),
            ("vm-d.ptvm", "bad magic"),
        ):
            assert any(file in ln and reason in ln for ln in refused), (file, refused)
            assert (vms / (file + ".bad")).is_file()
            assert not (vms / file).exists()
    finally:
        assert d.stop() == 0
    # The bad files stay aside; the valid VM was saved again.
    assert sorted(p.name for p in vms.iterdir()) == [
        "vm-a.ptvm.bad", "vm-b.ptvm.bad", "vm-c.ptvm", "vm-d.ptvm.bad",
    ]


def test_deleted_vm_does_not_come_back(tmp_path: Path) -> None:
    """A VM deleted before shutdown is not loaded again."""
    state = tmp_path / "state"
    d = start_daemon(tmp_path, *_state_args(state, 0.1))
    try:
        build_vm(d, "gone")
        time.sleep(0.4)
        assert (state / "vms" / "default" / "gone.ptvm").exists()
        d.stub("VmService").DeleteVm(pb.DeleteVmRequest(vm="gone"))
    finally:
        assert d.stop() == 0
    assert not (state / "vms" / "default" / "gone.ptvm").exists()
