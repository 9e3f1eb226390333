"""The snapshot format and the state directory, in process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from pagetrackd.application import Engine
from pagetrackd.domain import SlotFlags, TenantId
from pagetrackd.leases import LeaseKind
from pagetrackd.state import (
    SnapshotError,
    StateDir,
    decode,
    encode,
    read_snapshot,
    read_vm_file,
    restore_snapshot,
    snapshot_entry,
)

T = TenantId("acme")


def _engine_with_vm() -> Engine:
    e = Engine()
    entry = e.create_vm(T, "box", vcpus=2)
    vm = entry.vm
    vm.set_memslot(0, 0x100, 64, SlotFlags.NONE)
    vm.track_add([0x100, 0x101, 0x101])
    vm.write(0, 0x100 * 4096 + 100, b"payload")
    return e


def test_encode_decode_round_trip() -> None:
    """Header and arrays come back as they went in."""
    data = encode({"a": 1}, {"x": np.arange(5, dtype=np.int64)})
    header, arrays = decode(data)
    assert header == {"a": 1}
    assert arrays["x"].tolist() == [0, 1, 2, 3, 4]


def test_trailing_bytes_are_refused() -> None:
    """Bytes after the checksum mean the file is not what was written."""
    with pytest.raises(SnapshotError, match="trailing garbage"):
        decode(encode({}, {}) + b"x")


def test_every_cut_is_refused() -> None:
    """A snapshot cut at any length is refused, never half-loaded."""
    data = snapshot_entry(_engine_with_vm().vm(T, "box"), include_memory=True)
    for n in range(0, len(data), max(1, len(data) // 97)):
        with pytest.raises(SnapshotError):
            read_snapshot(data[:n])


async def test_stream_lease_references_are_not_saved(tmp_path: Path) -> None:
    """References held by a stream lease end with the stream, so a save leaves them out;
    a TTL lease's are saved, with the lease."""
    e = _engine_with_vm()
    entry = e.vm(T, "box")
    stream = e.stream_lease(T)
    ttl = e.leases.create(T, 60_000, "tool")
    entry.vm.track_add([0x102], owner=stream.owner)
    entry.vm.track_add([0x103], owner=ttl.owner)
    sd = StateDir(tmp_path)
    assert await sd.save(e) == 1
    snap, _ = read_vm_file(sd.vm_path(T, "box"))
    owners = {o for s in snap.state.slots for o in s.owners}
    assert owners == {"tenant", ttl.owner}
    leases = json.loads((tmp_path / "leases.json").read_text())["body"]["leases"]
    assert [le["lease_id"] for le in leases] == [ttl.lease_id]

    e2 = Engine()
    assert StateDir(tmp_path).load(e2) == 1
    restored = e2.leases.get(T, ttl.lease_id)
    assert restored.kind is LeaseKind.TTL and restored.label == "tool"
    vm2 = e2.vm(T, "box").vm
    assert vm2.track_query([0x103])[0].owners == {ttl.owner: 1}
    assert vm2.track_query([0x102])[0].count == 0
    assert vm2.read(0x100 * 4096 + 100, 7) == b"payload"


async def test_unchanged_vms_are_not_rewritten(tmp_path: Path) -> None:
    """A save writes only the VMs that changed since the last one."""
    e = _engine_with_vm()
    sd = StateDir(tmp_path)
    assert await sd.save(e) == 1
    assert await sd.save(e) == 0
    e.vm(T, "box").vm.write(1, 0x100 * 4096, b"x")
    assert await sd.save(e) == 1


async def test_corrupt_lease_file_is_moved_aside(tmp_path: Path) -> None:
    """A damaged leases.json is refused; the VMs still load, without lease references."""
    e = _engine_with_vm()
    ttl = e.leases.create(T, 60_000)
    e.vm(T, "box").vm.track_add([0x105], owner=ttl.owner)
    await StateDir(tmp_path).save(e)
    path = tmp_path / "leases.json"
    path.write_text(path.read_text().replace(ttl.lease_id, "0" * 16))
    e2 = Engine()
    sd = StateDir(tmp_path)
    assert sd.load(e2) == 1
    assert (tmp_path / "leases.json.bad").exists()
    assert sd.refused == [str(path)]
    assert e2.vm(T, "box").vm.track_query([0x105])[0].count == 0


async def test_a_file_in_the_wrong_place_is_refused(tmp_path: Path) -> None:
    """A snapshot renamed to another VM's file name is refused, not loaded as that VM."""
    e = _engine_with_vm()
    sd = StateDir(tmp_path)
    await sd.save(e)
    src = sd.vm_path(T, "box")
    src.rename(src.with_name("other.ptvm"))
    e2 = Engine()
    sd2 = StateDir(tmp_path)
    assert sd2.load(e2) == 0
    assert src.with_name("other.ptvm.bad").exists()


def test_a_history_that_does_not_fit_is_dropped_and_the_vm_still_loads() -> None:
    """Saved history columns that contradict the VM (here: seqs past its head) are not
    restored; the VM comes back with an empty history, as from a file without one."""
    e = _engine_with_vm()
    entry = e.vm(T, "box")
    assert entry.vm.seq == 1  # the write to the tracked gfn 0x100
    data = snapshot_entry(entry, include_memory=True, include_history=True)
    header, arrays = decode(data)
    assert header["history"]["oldest_seq"] == 1 and arrays["h_seq"].tolist() == [1]
    arrays["h_seq"] = np.array([7], dtype=np.uint64)  # the VM's head is 1
    snap = read_snapshot(encode(header, arrays))
    assert snap.history is not None
    e2 = Engine()
    restored = restore_snapshot(e2, T, snap)
    assert restored.vm.seq == 1 and restored.hub.history.oldest_seq == 2
    good = restore_snapshot(Engine(), T, read_snapshot(data))
    assert good.hub.history.oldest_seq == 1 and good.hub.history.events == 1


async def test_a_save_cuts_a_vm_between_requests_not_inside_one(tmp_path: Path) -> None:
    """A big request applies in slices under its VM's lock (application/slices.py); a save
    that comes meanwhile waits for the lock, so the saved VM holds all of the request or
    none of it, never the slices written so far."""
    e = _engine_with_vm()
    vm = e.vm(T, "box").vm
    sd = StateDir(tmp_path)
    async with e.vm_locks.hold(T, "box"):
        vm.write(0, 0x101 * 4096, b"first slice")
        save = asyncio.ensure_future(sd.save(e))
        for _ in range(20):  # the save runs up to the lock and waits there
            await asyncio.sleep(0)
        assert not save.done()
        vm.write(0, 0x102 * 4096, b"last slice")
    assert await save == 1
    e2 = Engine()
    assert StateDir(tmp_path).load(e2) == 1
    vm2 = e2.vm(T, "box").vm
    assert vm2.read(0x101 * 4096, 11) == b"first slice"
    assert vm2.read(0x102 * 4096, 10) == b"last slice"
