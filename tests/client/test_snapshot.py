"""snapshot_vm / restore_vm and ``pagetrack snapshot`` / ``pagetrack restore`` against a real
daemon: a VM comes back with its memslots, tracking (and who holds it), memory and seq."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pagetrack as pt
from pagetrack import AsyncClient, Client
from pagetrack.cli import main
from pagetrack.client import check_snapshot
from tests.daemon_process import DaemonProcess
from tests.waiting import HANG_S

PAGE = 4096
PAGETRACK = Path(sys.executable).with_name("pagetrack")


async def _build(c: AsyncClient, name: str) -> pt.Lease:
    """A VM with two memslots, tenant tracking (some gfns twice), lease tracking, memory
    and a few events; returns the lease."""
    await c.create_vm(name, dma_policy="notify", vcpus=2)
    await c.set_memory_region(name, 0, 0, 64, log_dirty_pages=True)
    await c.set_memory_region(name, 1, 0x100, 16, readonly=True)
    await c.add_tracking(name, ranges=[range(8, 16)])
    await c.add_tracking(name, [8, 9])  # a second tenant reference on 8 and 9
    lease = await c.create_lease(60_000, label="snap")
    await c.add_tracking(name, [20, 21], lease_id=lease.id)
    await c.write(name, 8 * PAGE + 16, b"tracked!", vcpu=1)
    await c.write(name, 30 * PAGE, b"untracked")
    await c.dma_write(name, 9 * PAGE, b"dma")
    return lease


async def _tenant_counts(c: AsyncClient, name: str) -> dict[int, int]:
    states = await c.query_tracking(name, only_tracked=True, include_owners=True)
    return {
        s.gfn: sum(o.count for o in s.owners if o.kind is pt.OwnerKind.TENANT) for s in states
    }


async def test_round_trip_keeps_slots_tracking_memory_and_seq(
    tcp_client: AsyncClient, vm_name: str
) -> None:
    """A VM restored under another name has the same memslots, options, tenant tracking
    (with its counts), memory and head seq; lease-held tracking is left out (leases belong
    to live clients); the seq goes on from where it was."""
    c = tcp_client
    await _build(c, vm_name)
    before = await c.get_vm(vm_name)
    assert before.head_seq == 2
    data = await c.snapshot_vm(vm_name)
    assert check_snapshot(data) == vm_name

    copy = f"{vm_name}-copy"
    vm = await c.restore_vm(data, vm=copy)
    assert vm.name == copy
    assert vm.head_seq == before.head_seq
    assert vm.options == before.options
    slots_before = await c.list_memory_regions(vm_name)
    slots_after = await c.list_memory_regions(copy)
    assert [(s.slot, s.base_gfn, s.npages, s.readonly, s.log_dirty_pages) for s in slots_after] == [
        (s.slot, s.base_gfn, s.npages, s.readonly, s.log_dirty_pages) for s in slots_before
    ]
    tenant = await _tenant_counts(c, vm_name)
    assert tenant[8] == 2 and tenant[12] == 1
    assert await _tenant_counts(c, copy) == {g: n for g, n in tenant.items() if n}
    after = {s.gfn for s in await c.query_tracking(copy, only_tracked=True)}
    assert after == set(range(8, 16))  # gfns 20 and 21 were held by the lease only
    for gpa, n in ((8 * PAGE, PAGE), (30 * PAGE, 16), (9 * PAGE, 8)):
        assert await c.read(copy, gpa, n) == await c.read(vm_name, gpa, n)
    assert await c.read(copy, 8 * PAGE + 16, 8) == b"tracked!"

    # The seq continues: a watcher on the copy sees the next write as seq 3.
    async with c.watch(copy) as stream:
        async with asyncio.timeout(HANG_S):
            async for msg in stream:
                if isinstance(msg, pt.Registered):
                    await c.write(copy, 10 * PAGE, b"next")
                elif isinstance(msg, pt.EventBatch):
                    assert msg.seq.tolist() == [before.head_seq + 1]
                    break
    assert (await c.get_vm(copy)).head_seq == before.head_seq + 1


async def test_snapshot_to_file_and_stream(
    tcp_client: AsyncClient, vm_name: str, tmp_path: Path
) -> None:
    """snapshot_vm_to writes a file (atomically, sha256 reported) or a binary stream;
    restore_vm reads a path or an open file; without memory, memory restores as zeros."""
    c = tcp_client
    await _build(c, vm_name)
    path = tmp_path / "vm.ptvm"
    path.write_bytes(b"an older file")
    info = await c.snapshot_vm_to(vm_name, path)
    assert isinstance(info, pt.SnapshotInfo)
    raw = path.read_bytes()
    assert info.size_bytes == len(raw) and info.sha256 == hashlib.sha256(raw).hexdigest()
    assert info.head_seq == 2 and info.format_version == 1 and info.include_memory
    left = await asyncio.to_thread(lambda: [p.name for p in tmp_path.iterdir()])
    assert left == ["vm.ptvm"]  # no temporary file left behind

    buf = io.BytesIO()
    bare = await c.snapshot_vm_to(vm_name, buf, include_memory=False)
    assert not bare.include_memory and bare.size_bytes == len(buf.getvalue()) < len(raw)

    from_path = await c.restore_vm(path, vm=f"{vm_name}-p")
    assert from_path.resident_pages > 0
    with await asyncio.to_thread(open, path, "rb") as f:
        await c.restore_vm(f, vm=f"{vm_name}-f")
    assert await c.read(f"{vm_name}-f", 8 * PAGE + 16, 8) == b"tracked!"
    buf.seek(0)
    zeros = await c.restore_vm(buf, vm=f"{vm_name}-z")
    assert zeros.resident_pages == 0
    assert await c.read(f"{vm_name}-z", 8 * PAGE + 16, 8) == bytes(8)
    assert zeros.tracked_gfns == from_path.tracked_gfns == 8


async def test_restore_refuses_existing_vm_unless_replace(
    tcp_client: AsyncClient, vm_name: str
) -> None:
    """Restoring over an existing VM is AlreadyExists; with replace it takes its place."""
    c = tcp_client
    await _build(c, vm_name)
    data = await c.snapshot_vm(vm_name)
    await c.write(vm_name, 8 * PAGE + 16, b"changed!")
    with pytest.raises(pt.AlreadyExists, match="already exists"):
        await c.restore_vm(data)
    assert await c.read(vm_name, 8 * PAGE + 16, 8) == b"changed!"
    vm = await c.restore_vm(data, replace=True)
    assert vm.head_seq == 2
    assert await c.read(vm_name, 8 * PAGE + 16, 8) == b"tracked!"


async def test_corrupt_snapshots_are_refused_before_sending(
    tcp_client: AsyncClient, vm_name: str, tmp_path: Path
) -> None:
    """A flipped byte, a cut-short file, another file type and a missing file are each
    refused with a message naming the file and the fault; no VM is created."""
    c = tcp_client
    await _build(c, vm_name)
    data = bytearray(await c.snapshot_vm(vm_name))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    cases = {
        "flipped.ptvm": (bytes(flipped), "corrupt or truncated"),
        "short.ptvm": (bytes(data[: len(data) - 100]), "corrupt or truncated"),
        "tiny.ptvm": (bytes(data[:20]), "truncated"),
        "other.txt": (b"hello, world\n" * 10, "not a pagetrack VM snapshot"),
        "empty.ptvm": (b"", "empty"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(pt.InvalidArgument, match=why) as info:
            await c.restore_vm(path, vm=f"{vm_name}-bad")
        assert str(path) in str(info.value)
    with pytest.raises(pt.InvalidArgument, match="No such file"):
        await c.restore_vm(tmp_path / "missing.ptvm")
    with pytest.raises(pt.NotFound):
        await c.get_vm(f"{vm_name}-bad")


def test_sync_client_snapshot_and_restore(daemon: DaemonProcess, vm_name: str) -> None:
    """Client has the same snapshot_vm / snapshot_vm_to / restore_vm."""
    with Client(daemon.tcp, timeout=10) as c:
        c.create_vm(vm_name)
        c.set_memory_region(vm_name, 0, 0, 16)
        c.add_tracking(vm_name, [1, 2, 3])
        c.write(vm_name, PAGE, b"sync")
        data = c.snapshot_vm(vm_name)
        vm = c.restore_vm(data, vm=f"{vm_name}-s")
        assert (vm.tracked_gfns, vm.head_seq) == (3, 1)
        assert c.read(f"{vm_name}-s", PAGE, 4) == b"sync"
        with pytest.raises(pt.NotFound):
            c.snapshot_vm("no-such-vm")


# --------------------------------------------------------------------------- CLI


def _cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGETRACK_")}
    env["PAGETRACK_TARGET"] = target
    return subprocess.run(
        [str(PAGETRACK), *args], env=env, capture_output=True, text=True, timeout=30,
        check=False,
    )


async def test_cli_snapshot_restore(
    tcp_client: AsyncClient,
    daemon: DaemonProcess,
    vm_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``pagetrack snapshot VM FILE`` and ``pagetrack restore FILE --as NAME``; restoring
    onto an existing VM without --replace, or a corrupt file, fails with one line and
    exit status 1."""
    c = tcp_client
    await _build(c, vm_name)
    path = tmp_path / "cli.ptvm"
    target = ["--target", daemon.tcp]
    assert main([*target, "snapshot", vm_name, str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"saved VM {vm_name} to {path}" in printed and "with memory" in printed

    assert main([*target, "restore", str(path), "--as", f"{vm_name}-cli"]) == 0
    printed = capsys.readouterr().out
    assert f"restored VM {vm_name}-cli" in printed and "seq 2" in printed
    assert await c.read(f"{vm_name}-cli", 8 * PAGE + 16, 8) == b"tracked!"

    res = _cli(daemon.tcp, "restore", str(path))  # the installed command, as users run it
    assert res.returncode == 1
    assert res.stderr == (
        f"pagetrack: VM '{vm_name}' already exists; add --replace to overwrite it\n"
    )
    assert main([*target, "restore", str(path), "--replace"]) == 0

    bad = tmp_path / "bad.ptvm"
    raw = bytearray(path.read_bytes())
    raw[40] ^= 1
    bad.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main([*target, "restore", str(bad), "--as", f"{vm_name}-bad"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"pagetrack: {bad}: corrupt or truncated snapshot")

    assert main([*target, "snapshot", vm_name, str(tmp_path / "bare.ptvm"), "--no-memory"]) == 0
    assert "without memory" in capsys.readouterr().out


class _FakeCall:
    """A SnapshotVm call that yields given chunks."""

    def __init__(self, chunks: list[object]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> _FakeCall:
        return self

    async def __anext__(self) -> object:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    def cancel(self) -> bool:
        return True


async def test_snapshot_chunks_are_checked_against_the_daemons_sha256() -> None:
    """A chunk changed in transit, a missing last chunk or a gap in the offsets raises
    PageTrackError with code DATA_LOSS; intact chunks join into the snapshot."""
    from pagetrack.v1 import pagetrack_pb2 as pb

    body = b"x" * 5000 + b"y" * 3000
    good = hashlib.sha256(body).digest()

    def chunks(first: bytes = body[:5000], digest: bytes = good, last: bool = True,
               second_offset: int = 5000) -> list[object]:
        return [
            pb.SnapshotChunk(data=first, offset=0, format_version=1, head_seq=7),
            pb.SnapshotChunk(data=body[5000:], offset=second_offset, last=last,
                             total_bytes=len(body) if last else 0, sha256=digest if last else b"",
                             format_version=1, head_seq=7),
        ]

    async with AsyncClient("127.0.0.1:1", timeout=5) as c:
        admin = c._admin

        class Admin:
            def __init__(self, items: list[object]) -> None:
                self.items = items

            def SnapshotVm(self, request: object, **kw: object) -> _FakeCall:
                return _FakeCall(self.items)

        try:
            c._admin = Admin(chunks())  # type: ignore[assignment]
            assert await c.snapshot_vm("v") == body
            for bad, why in (
                (chunks(first=b"z" + body[1:5000]), "sha256"),
                (chunks(last=False), "before its last chunk"),
                (chunks(second_offset=4096), "offset 4096 where 5000 was due"),
            ):
                c._admin = Admin(bad)  # type: ignore[assignment]
                with pytest.raises(pt.PageTrackError, match=why) as info:
                    await c.snapshot_vm("v")
                assert info.value.code == "DATA_LOSS"
        finally:
            c._admin = admin
