"""The state directory: what a SIGTERM or SIGKILL restart keeps, and bad files refused."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.state.daemon import Daemon, start_daemon
from tests.state.scenario import PAGE, build_vm, fingerprint
from tests.waiting import wait_until


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


def _replay(d: Daemon, start_seq: int, head: int) -> list[tuple[Any, ...]]:
    """Everything a stream resuming at ``start_seq`` is sent up to ``head``: events and
    region records, in order."""
    stream = d.stub("WatchService").Watch(
        pb.WatchRequest(vm="vm1", start_seq=start_seq, heartbeat_interval_ms=100)
    )
    got: list[tuple[Any, ...]] = []
    seen = 0
    for msg in stream:
        kind = msg.WhichOneof("kind")
        if kind == "events":
            e = msg.events
            offsets = np.concatenate([[0], np.cumsum(list(e.length))]).tolist()
            for i, seq in enumerate(e.seq):
                got.append(("event", seq, e.gpa[i], e.vcpu[i], e.data[offsets[i]:offsets[i + 1]]))
                seen = seq
        elif kind == "region_removed":
            r = msg.region_removed
            got.append(("region", r.base_gfn, r.npages, r.at_seq))
        elif kind == "progress" and seen >= head:
            break
        else:
            assert kind in ("registered", "progress"), msg
    stream.cancel()
    return got


def test_resume_across_a_restart(tmp_path: Path) -> None:
    """The event history is saved with the VM: after a restart a client resumes from
    any seq still held and gets exactly what it would have got before; a seq the
    history had already let go of is OUT_OF_RANGE (or a COMPACTED gap), as before."""
    state = tmp_path / "state"
    d = start_daemon(tmp_path, *_state_args(state))
    try:
        build_vm(d)
        mem = d.stub("MemoryService")
        for npages in (16, 0):  # a region record in the history
            mem.SetMemoryRegion(
                pb.SetMemoryRegionRequest(vm="vm1", slot=3, base_gfn=0x30000, npages=npages)
            )
        head = d.stub("VmService").GetVm(pb.GetVmRequest(vm="vm1")).vm.head_seq
        before = _replay(d, 1, head)
        assert [x[1] for x in before if x[0] == "event"] == list(range(1, head + 1))
        assert any(x[0] == "region" for x in before), "the scenario deletes a memslot"
    finally:
        assert d.stop() == 0
    d = start_daemon(tmp_path, *_state_args(state))
    try:
        assert _replay(d, 1, head) == before
        events = [x for x in _replay(d, 3, head) if x[0] == "event"]
        assert events == [x for x in before if x[0] == "event" and x[1] >= 3]
        mem = d.stub("MemoryService")
        mem.WriteGuest(pb.WriteGuestRequest(vm="vm1", vcpu=0, gpa=2 * PAGE, data=b"after"))
        # (The region record came after event `head`: a resume at head + 1 gets it too.)
        assert _replay(d, head + 1, head + 1) == [
            before[-1], ("event", head + 1, 2 * PAGE, 0, b"after")
        ]
        # Push the first events out of the 1000-event history, then restart again.
        n = 1200
        mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
            vm="vm1", gpa=[2 * PAGE + 8 * (i % 512) for i in range(n)], vcpu=[1],
            length=[8] * n, data=b"12345678" * n))
        oldest = d.stub("VmService").GetVm(pb.GetVmRequest(vm="vm1")).vm.oldest_seq
        assert oldest > head + 1
    finally:
        assert d.stop() == 0
    d = start_daemon(tmp_path, *_state_args(state))
    try:
        watch = d.stub("WatchService")
        assert d.stub("VmService").GetVm(pb.GetVmRequest(vm="vm1")).vm.oldest_seq == oldest
        with pytest.raises(grpc.RpcError) as err:
            next(iter(watch.Watch(pb.WatchRequest(vm="vm1", start_seq=1))))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        stream = watch.Watch(pb.WatchRequest(vm="vm1", start_seq=1, allow_compacted=True))
        assert next(stream).WhichOneof("kind") == "registered"
        gap = next(stream)
        assert gap.WhichOneof("kind") == "gap"
        assert (gap.gap.first_seq, gap.gap.last_seq) == (1, oldest - 1)
        assert gap.gap.reason == pb.GAP_REASON_COMPACTED
        first = next(m for m in stream if m.WhichOneof("kind") != "progress")
        assert first.WhichOneof("kind") == "events" and first.events.seq[0] == oldest
        stream.cancel()
    finally:
        assert d.stop() == 0


def _without_seq(fp: dict[str, Any]) -> dict[str, Any]:
    vm = type(fp["vm"])()
    vm.CopyFrom(fp["vm"])
    vm.head_seq = 0
    return {**fp, "vm": vm, "stats": fp["stats"][:5] + fp["stats"][6:]}


def _wait_for_a_save_after(state: Path, t_ns: int) -> None:
    """Wait until a save that began after ``t_ns`` has finished. The leases file is the
    last file a save writes, and its saved_at_ns is taken right after the VMs were copied
    (in the same step of the daemon's loop), so once it names a later time, the VM files
    on disk hold everything done before ``t_ns``."""

    def saved_at() -> int:
        try:
            doc = json.loads((state / "leases.json").read_text())
        except (OSError, ValueError):
            return 0
        return int(doc["body"]["saved_at_ns"])

    wait_until(lambda: saved_at() > t_ns, "a state save after the changes")


def test_sigkill_loses_at_most_the_last_interval(tmp_path: Path) -> None:
    """With a short save interval, a SIGKILL after a save loses nothing that was saved.
    The seq continues after what the killed run had reserved (never below it), and a
    resume across the reserved range gets a RESTART gap naming it."""
    state = tmp_path / "state"
    d = start_daemon(tmp_path, *_state_args(state, 0.2))
    try:
        build_vm(d)
        before = fingerprint(d)
        _wait_for_a_save_after(state, time.time_ns())
    finally:
        d.stop(signal.SIGKILL)
    d = start_daemon(tmp_path, *_state_args(state, 0.2))
    try:
        after = fingerprint(d)
        assert _without_seq(after) == _without_seq(before)
        old_head, new_head = before["vm"].head_seq, after["vm"].head_seq
        assert new_head > old_head
        stream = d.stub("WatchService").Watch(pb.WatchRequest(vm="vm1", start_seq=old_head + 1))
        assert next(stream).WhichOneof("kind") == "registered"
        gap = next(m for m in stream if m.WhichOneof("kind") != "progress")
        assert gap.gap == pb.Gap(first_seq=old_head + 1, last_seq=new_head,
                                 count=new_head - old_head, reason=pb.GAP_REASON_RESTART)
        stream.cancel()
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
        wait_until((state / "vms" / "default" / "gone.ptvm").exists, "the VM's first save")
        d.stub("VmService").DeleteVm(pb.DeleteVmRequest(vm="gone"))
    finally:
        assert d.stop() == 0
    assert not (state / "vms" / "default" / "gone.ptvm").exists()
