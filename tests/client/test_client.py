"""AsyncClient and Client against a real daemon: typed results, and errors mapped to the
client's exceptions."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pagetrack as pt
from pagetrack import AsyncClient, Client
from pagetrack.errors import from_rpc_error
from tests.client.conftest import short_tmp
from tests.daemon_process import DaemonProcess, start_daemon

PAGE = 4096


async def _vm_with_ram(c: AsyncClient, name: str, pages: int = 256, **kw: object) -> None:
    await c.create_vm(name, **kw)  # type: ignore[arg-type]
    await c.set_memory_region(name, 0, 0, pages, log_dirty_pages=True)


async def test_vm_lifecycle(client: AsyncClient, vm_name: str) -> None:
    """create_vm/get_vm/list_vms/set_policy/delete_vm return typed VMs; a deleted VM is NotFound."""
    vm = await client.create_vm(vm_name, dma_policy="notify", semantics="linux-6.6", vcpus=3)
    assert isinstance(vm, pt.Vm)
    assert vm.name == vm_name
    assert vm.options.dma_policy is pt.DmaPolicy.NOTIFY
    assert vm.options.semantics is pt.Semantics.LINUX_6_6
    assert vm.options.limits.max_vcpus == 3
    assert vm.head_seq == 0
    assert (await client.get_vm(vm_name)) == vm
    assert vm_name in {v.name for v in await client.list_vms()}
    changed = await client.set_policy(vm_name, dma_policy=pt.DmaPolicy.REJECT)
    assert changed.options.dma_policy is pt.DmaPolicy.REJECT
    assert changed.options.semantics is pt.Semantics.LINUX_6_6
    assert await client.delete_vm(vm_name) == 0
    with pytest.raises(pt.NotFound) as info:
        await client.get_vm(vm_name)
    assert info.value.code == "NOT_FOUND"
    assert vm_name in str(info.value)


async def test_errors_map_to_client_exceptions(tcp_client: AsyncClient, vm_name: str) -> None:
    """Status codes become AlreadyExists, InvalidArgument, FailedPrecondition, OutOfRange,
    each a PageTrackError carrying the code and the daemon's message."""
    c = tcp_client
    await _vm_with_ram(c, vm_name, pages=16)
    with pytest.raises(pt.AlreadyExists):
        await c.create_vm(vm_name)
    with pytest.raises(pt.InvalidArgument) as bad:
        await c.create_vm("-not a name-")
    assert bad.value.code == "INVALID_ARGUMENT" and bad.value.message
    with pytest.raises(pt.FailedPrecondition):
        await c.add_tracking(vm_name, [10_000])  # outside every memslot
    with pytest.raises(pt.PageTrackError) as any_error:
        await c.get_vm("no-such-vm")
    assert isinstance(any_error.value, pt.NotFound)
    # Client-side checks raise the same classes without a round trip.
    with pytest.raises(pt.InvalidArgument, match="dma_policy"):
        await c.create_vm("x", dma_policy="sometimes")
    with pytest.raises(pt.InvalidArgument, match="split evenly"):
        await c.write_batch(vm_name, [0, 8, 16], b"12345678")


def test_out_of_range_parses_oldest_seq() -> None:
    """OutOfRange carries the oldest seq named in the daemon's message."""

    class Err(Exception):
        def code(self) -> object:
            import grpc

            return grpc.StatusCode.OUT_OF_RANGE

        def details(self) -> str:
            return "seq 1 is no longer held; the oldest held is 42"

    import grpc

    err = type("E", (Err, grpc.RpcError), {})()
    mapped = from_rpc_error(err)
    assert isinstance(mapped, pt.OutOfRange)
    assert mapped.oldest_seq == 42


async def test_memory_regions_and_dirty_log(client: AsyncClient, vm_name: str) -> None:
    """set_memory_region reports create/move/flags/delete; the dirty log lists written gfns."""
    await client.create_vm(vm_name)
    created = await client.set_memory_region(vm_name, 0, 0, 64, log_dirty_pages=True)
    assert created.change is pt.MemslotChange.CREATE
    assert created.region.npages == 64 and created.region.log_dirty_pages
    rom = await client.set_memory_region(vm_name, 1, 0x1000, 16, readonly=True)
    assert rom.region.readonly
    moved = await client.set_memory_region(vm_name, 1, 0x2000, 16, readonly=True)
    assert moved.change is pt.MemslotChange.MOVE and moved.old_base_gfn == 0x1000
    slots = await client.list_memory_regions(vm_name)
    assert [(s.slot, s.base_gfn, s.npages) for s in slots] == [(0, 0, 64), (1, 0x2000, 16)]
    assert slots[1].base_gpa == 0x2000 * PAGE and slots[1].size_bytes == 16 * PAGE
    await client.write(vm_name, 3 * PAGE + 5, b"x")
    await client.write(vm_name, 7 * PAGE, b"y" * (PAGE + 1))  # crosses into gfn 8
    log = await client.get_dirty_log(vm_name, 0)
    assert log.dirty_count == 3
    assert log.dirty_gfns().tolist() == [3, 7, 8]
    assert (await client.get_dirty_log(vm_name, 0)).dirty_count == 0  # get-and-clear
    deleted = await client.delete_memory_region(vm_name, 1)
    assert deleted.change is pt.MemslotChange.DELETE
    await client.delete_vm(vm_name)


async def test_write_read_and_dma(client: AsyncClient, vm_name: str) -> None:
    """write reports pieces by path with seqs for tracked ones; read returns the bytes;
    dma_write follows the VM's DMA policy; cmpxchg makes an event only when it exchanges."""
    await _vm_with_ram(client, vm_name, dma_policy="notify")
    await client.add_tracking(vm_name, [1])
    res = await client.write(vm_name, PAGE - 2, b"abcd", vcpu=1)
    # The write traps on tracked gfn 1, so both pieces are emulated and notified (R4.3).
    assert [(p.gpa, p.length, p.path) for p in res.pieces] == [
        (PAGE - 2, 2, pt.WritePath.EMULATED),
        (PAGE, 2, pt.WritePath.EMULATED),
    ]
    assert res.seqs == (1, 2)
    mmio = await client.write(vm_name, 1 << 30, b"zz")
    assert mmio.pieces[0].path is pt.WritePath.MMIO_EXIT
    assert await client.read(vm_name, PAGE - 2, 4) == b"abcd"
    assert await client.read(vm_name, 1 << 30, 2) == b"\0\0"
    dma = await client.dma_write(vm_name, PAGE + 8, b"dm")
    assert dma.pieces[0].path is pt.DmaPath.NOTIFIED and dma.pieces[0].seq == 3
    await client.set_policy(vm_name, dma_policy="reject")
    with pytest.raises(pt.FailedPrecondition):
        await client.dma_write(vm_name, PAGE, b"no")
    missed = await client.cmpxchg(vm_name, PAGE + 16, b"\x01" * 4, b"\x02" * 4, vcpu=2)
    assert not missed.exchanged and missed.current == bytes(4) and missed.seqs == ()
    hit = await client.cmpxchg(vm_name, PAGE + 16, bytes(4), b"\x02" * 4, vcpu=2)
    assert hit.exchanged and hit.seqs == (4,) and not hit.as_write
    assert await client.read(vm_name, PAGE + 16, 4) == b"\x02" * 4
    with pytest.raises(pt.InvalidArgument, match="same number of bytes"):
        await client.cmpxchg(vm_name, PAGE, b"a", b"bc")
    await client.delete_vm(vm_name)


async def test_write_batch_takes_numpy(client: AsyncClient, vm_name: str) -> None:
    """write_batch takes numpy columns, returns counts and seqs, and optional piece columns."""
    await _vm_with_ram(client, vm_name)
    await client.add_tracking(vm_name, ranges=[range(8)])
    gpa = np.arange(16, dtype=np.uint64) * PAGE
    data = np.arange(16, dtype="<u8").tobytes()
    res = await client.write_batch(
        vm_name, gpa, data, vcpu=np.arange(16) % 4, want_pieces=True
    )
    assert res.writes == 16
    assert res.pieces == pt.WritePathCounts(mmio_exit=0, fast=8, emulated=8)
    assert (res.first_seq, res.last_seq) == (1, 8)
    assert res.piece_path is not None and res.piece_path.tolist() == [3] * 8 + [2] * 8
    listed = await client.write_batch(vm_name, [0, PAGE * 200], [b"ab", b"cde"])
    assert listed.pieces.emulated == 1 and listed.pieces.fast == 1
    assert await client.read(vm_name, PAGE * 200, 3) == b"cde"
    with pytest.raises(pt.InvalidArgument):
        await client.write_batch(vm_name, [0, 8], b"abc", length=[1, 1])  # sum != len(data)
    await client.delete_vm(vm_name)


async def test_tracking_ranges_owners_and_leases(client: AsyncClient, vm_name: str) -> None:
    """add/remove/query_tracking take gfns, range objects and (start, count) pairs; lease
    references go away when the lease is revoked."""
    await _vm_with_ram(client, vm_name)
    added = await client.add_tracking(
        vm_name, [100], ranges=[range(4), (10, 2), pt.GfnRange(20, 1)]
    )
    assert added == pt.TrackingChange(references=8, transitions=8, tracked_gfns=8)
    lease = await client.create_lease(60_000, label="test")
    assert lease.kind is pt.LeaseKind.TTL and lease.label == "test"
    await client.add_tracking(vm_name, np.array([0, 200]), lease_id=lease.id)
    states = await client.query_tracking(vm_name, [0, 1, 50], include_owners=True)
    assert [(s.gfn, s.counter, s.tracked) for s in states] == [
        (0, 2, True), (1, 1, True), (50, 0, False)
    ]
    assert {o.kind for o in states[0].owners} == {pt.OwnerKind.TENANT, pt.OwnerKind.LEASE}
    assert states[0].write_protected and states[0].lpage_2m_disallowed
    tracked = await client.query_tracking(vm_name, only_tracked=True)
    assert [s.gfn for s in tracked] == [0, 1, 2, 3, 10, 11, 20, 100, 200]
    assert lease.id in {le.id for le in await client.list_leases()}
    kept = await client.keep_alive_lease(lease.id)
    assert kept.expires_at_ns >= lease.expires_at_ns
    revoked = await client.revoke_lease(lease.id)
    assert revoked == pt.LeaseRevoked(released_references=2, untracked_gfns=1)
    with pytest.raises(pt.NotFound):
        await client.keep_alive_lease(lease.id)
    removed = await client.remove_tracking(vm_name, ranges=[range(4)])
    assert removed.transitions == 4
    with pytest.raises(pt.FailedPrecondition):
        await client.remove_tracking(vm_name, [0])  # no reference left to remove
    await client.delete_vm(vm_name)


async def test_workloads(tcp_client: AsyncClient, vm_name: str) -> None:
    """start/get/list/stop_workload return WorkloadStatus records."""
    c = tcp_client
    await _vm_with_ram(c, vm_name)
    w = await c.start_workload(vm_name, "random-writes", rate=0, count=500, seed=3,
                               options={"pages": 64})
    assert w.kind is pt.WorkloadKind.RANDOM_WRITES and w.vm == vm_name
    assert w.id in {x.id for x in await c.list_workloads(vm_name)}
    got = await c.get_workload(w.id)
    assert got.id == w.id and got.seed == 3
    stopped = await c.stop_workload(w.id)
    assert stopped.state in (pt.WorkloadState.STOPPED, pt.WorkloadState.FINISHED)
    with pytest.raises(pt.NotFound):
        await c.get_workload("w-none")
    with pytest.raises(pt.InvalidArgument):
        await c.start_workload(vm_name, "no-such-kind")
    await c.delete_vm(vm_name)


async def test_plugins(tcp_client: AsyncClient, vm_name: str) -> None:
    """attach/list/audit/detach_plugin; a second attach of the same kind is AlreadyExists."""
    c = tcp_client
    await _vm_with_ram(c, vm_name)
    status = await c.attach_plugin(vm_name, pt.PluginKind.SHADOW_MMU)
    assert status.kind is pt.PluginKind.SHADOW_MMU
    with pytest.raises(pt.AlreadyExists):
        await c.attach_plugin(vm_name, "shadow-mmu")
    assert [p.kind for p in await c.list_plugins(vm_name)] == [pt.PluginKind.SHADOW_MMU]
    report = await c.audit_plugin(vm_name, "shadow-mmu")
    assert report.mismatch_count == 0
    assert (await c.get_vm(vm_name)).plugins == (pt.PluginKind.SHADOW_MMU,)
    assert await c.detach_plugin(vm_name, "shadow-mmu") >= 0
    with pytest.raises(pt.NotFound):
        await c.detach_plugin(vm_name, "shadow-mmu")
    await c.delete_vm(vm_name)


async def test_stats_server_info_and_notifiers(client: AsyncClient, vm_name: str) -> None:
    """stats, server_info and list_notifiers return typed records."""
    await _vm_with_ram(client, vm_name)
    await client.add_tracking(vm_name, [0])
    await client.write_batch(vm_name, [0, PAGE], b"aaaabbbb")
    (st,) = await client.stats(vm_name)
    assert st.vm == vm_name and st.guest_writes == 2
    assert st.writes == pt.WritePathCounts(0, 1, 1) and st.head_seq == 1
    info = await client.server_info()
    assert info.tenant == "default" and info.limits.max_write_bytes > 0
    async with client.watch(vm_name) as stream:
        assert isinstance(await anext(stream), pt.Registered)
        notifiers = await client.list_notifiers(vm_name)
        assert [n.notifier_id for n in notifiers if n.kind is pt.NotifierKind.WATCH] == [
            stream.notifier_id
        ]
    await client.delete_vm(vm_name)


async def test_unreachable_daemon_is_unavailable() -> None:
    """A target nobody listens on raises Unavailable."""
    async with AsyncClient("unix:/tmp/pagetrack-nobody-here.sock", timeout=5) as c:
        with pytest.raises(pt.Unavailable):
            await c.server_info()


def test_sync_client(daemon: DaemonProcess, vm_name: str) -> None:
    """Client offers the same methods, blocking, and watch() as a plain iterator."""
    with Client(daemon.tcp, timeout=10) as c:
        c.create_vm(vm_name)
        c.set_memory_region(vm_name, 0, 0, 16)
        c.add_tracking(vm_name, ranges=[(0, 16)])
        with pytest.raises(pt.NotFound):
            c.get_vm("nope-" + vm_name)
        with c.watch(vm_name) as stream:
            first = next(stream)
            assert isinstance(first, pt.Registered)
            c.write(vm_name, 0x10, b"sync")
            batch = next(m for m in stream if isinstance(m, pt.EventBatch))
            (event,) = batch.events()
            assert event.data == b"sync" and event.seq == 1
            assert stream.last_seq == 1
        assert c.delete_vm(vm_name) == 1


async def test_bearer_token(tmp_path: Path) -> None:
    """The token travels as a bearer token: without it the daemon says Unauthenticated."""
    from pagetrackd.auth import hash_token

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nsha256 = "{hash_token("s3cret")}"\ntenant = "t1"\n')
    d = start_daemon(tmp_path, "--tokens-file", str(tokens))
    try:
        async with AsyncClient(d.tcp) as anonymous:
            with pytest.raises(pt.Unauthenticated):
                await anonymous.list_vms()
        async with AsyncClient(d.tcp, token="s3cret") as c:
            assert (await c.server_info()).tenant == "t1"
    finally:
        assert d.stop() == 0


def _make_certs(tmp: Path) -> tuple[Path, Path, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=pagetrack test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (tmp / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    return tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_with_ca_file() -> None:
    """With ca_file the client speaks TLS and verifies the daemon's certificate."""
    tmp = short_tmp()
    ca, cert, key = _make_certs(tmp)
    d = start_daemon(tmp, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        async with AsyncClient(d.tcp, ca_file=ca, timeout=10) as c:
            assert (await c.server_info()).version
        async with AsyncClient(d.tcp, timeout=3) as plain:
            with pytest.raises(pt.Unavailable):
                await plain.server_info()
        with pytest.raises(pt.InvalidArgument, match="CA file"):
            AsyncClient(d.tcp, ca_file=tmp / "missing.pem")
    finally:
        assert d.stop() == 0
        shutil.rmtree(tmp, ignore_errors=True)
