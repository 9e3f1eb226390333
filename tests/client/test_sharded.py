"""Several daemons, VMs placed by name: ShardedAsyncClient, ShardedClient and the CLI's
comma-separated --target against two real pagetrackd processes."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

import pagetrack as pt
from pagetrack import AsyncClient, ShardedAsyncClient, ShardedClient
from pagetrack.cli import main
from tests.client.conftest import short_tmp
from tests.daemon_process import DaemonProcess, start_daemon
from tests.waiting import HANG_S

PAGE = 4096


@pytest.fixture(scope="module")
def daemons() -> Iterator[list[DaemonProcess]]:
    """Two daemons, each on 127.0.0.1:0 with its own directory."""
    tmps = [short_tmp(), short_tmp()]
    ds: list[DaemonProcess] = []
    try:
        for tmp in tmps:
            ds.append(start_daemon(tmp))
        yield ds
    finally:
        codes = [d.stop() for d in ds]
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        assert codes == [0] * len(ds)


@pytest.fixture
async def direct(daemons: list[DaemonProcess]) -> AsyncIterator[dict[str, AsyncClient]]:
    """A plain AsyncClient per daemon, by address."""
    clients = {d.tcp: AsyncClient(d.tcp, timeout=10) for d in daemons}
    yield clients
    for c in clients.values():
        await c.close()


@pytest.fixture
async def sharded(daemons: list[DaemonProcess]) -> AsyncIterator[ShardedAsyncClient]:
    async with ShardedAsyncClient([d.tcp for d in daemons], timeout=10) as c:
        yield c


def _prefix() -> str:
    return f"s{uuid.uuid4().hex[:6]}"


def _one_per_daemon(sharded: ShardedAsyncClient, stem: str) -> dict[str, str]:
    """A VM name for each daemon (names are drawn until the ring has placed one on
    every daemon: a fixed handful could all land on one)."""
    by_target: dict[str, str] = {}
    for i in range(10_000):
        name = f"{stem}{i}"
        by_target.setdefault(sharded.owner(name), name)
        if len(by_target) == len(sharded.targets):
            return by_target
    raise AssertionError(f"the ring placed 10,000 names on {sorted(by_target)} only")


async def test_vms_land_on_the_daemon_the_ring_names(
    sharded: ShardedAsyncClient, direct: dict[str, AsyncClient]
) -> None:
    """20 VMs created through the sharded client each exist on the daemon the ring picks
    and on no other; calls about a VM reach it; list_vms merges both daemons."""
    names = [f"{_prefix()}-{i}" for i in range(20)]
    for name in names:
        vm = await sharded.create_vm(name)
        assert vm.name == name
    owners = {name: sharded.owner(name) for name in names}
    assert set(owners.values()) == set(direct), "20 names should use both daemons"
    for target, c in direct.items():
        here = {v.name for v in await c.list_vms()}
        assert {n for n in names if owners[n] == target} <= here
        assert not {n for n in names if owners[n] != target} & here
    for name in names[:5]:
        other = next(t for t in direct if t != owners[name])
        with pytest.raises(pt.NotFound):
            await direct[other].get_vm(name)
        await sharded.set_memory_region(name, 0, 0, 16)
        await sharded.write(name, PAGE, name.encode())
        assert await direct[owners[name]].read(name, PAGE, len(name)) == name.encode()
    merged = [v.name for v in await sharded.list_vms() if v.name in owners]
    assert merged == sorted(names)
    stats = {s.vm for s in await sharded.stats()}
    assert set(names) <= stats
    assert [s.vm for s in await sharded.stats(names[0])] == [names[0]]
    for name in names:
        await sharded.delete_vm(name)
    assert not {v.name for v in await sharded.list_vms()} & set(names)


async def test_watch_goes_to_the_owning_daemon(
    sharded: ShardedAsyncClient, direct: dict[str, AsyncClient]
) -> None:
    """A watch opened through the sharded client registers on the VM's daemon and
    delivers the writes made through the sharded client."""
    by_target = _one_per_daemon(sharded, f"{_prefix()}-w")
    assert len(by_target) == 2
    for target, name in by_target.items():
        await sharded.create_vm(name)
        await sharded.set_memory_region(name, 0, 0, 16)
        await sharded.add_tracking(name, [2])
        async with sharded.watch(name) as stream:
            async with asyncio.timeout(HANG_S):
                async for msg in stream:
                    if isinstance(msg, pt.Registered):
                        notifiers = await direct[target].list_notifiers(name)
                        assert [n.kind for n in notifiers] == [pt.NotifierKind.WATCH]
                        await sharded.write(name, 2 * PAGE, b"hello")
                    elif isinstance(msg, pt.EventBatch):
                        assert msg.vm == name and msg.data == b"hello"
                        break
        await sharded.delete_vm(name)


async def test_workloads_leases_and_snapshots_follow_the_vm(
    sharded: ShardedAsyncClient, direct: dict[str, AsyncClient]
) -> None:
    """Leases are created beside their VM; workload ids (unique per daemon only) are
    found by VM; restore_vm goes to the owner of the restored name."""
    prefix = _prefix()
    a, b = _one_per_daemon(sharded, f"{prefix}-x").values()
    for name in (a, b):
        await sharded.create_vm(name)
        await sharded.set_memory_region(name, 0, 0, 64)

    with pytest.raises(pt.InvalidArgument, match="vm="):
        await sharded.create_lease(10_000)
    lease = await sharded.create_lease(10_000, vm=a, label=prefix)
    assert lease.id in {le.id for le in await direct[sharded.owner(a)].list_leases()}
    await sharded.add_tracking(a, [3], lease_id=lease.id)
    assert (await sharded.keep_alive_lease(lease.id)).id == lease.id
    assert (await sharded.revoke_lease(lease.id)).released_references == 1

    wa = await sharded.start_workload(a, "random-writes", count=0, rate=100)
    wb = await sharded.start_workload(b, "random-writes", count=0, rate=100)
    if wa.id == wb.id:  # fresh daemons number workloads alike: the id alone is ambiguous
        with pytest.raises(pt.FailedPrecondition, match="2 daemons"):
            await sharded.get_workload(wa.id)
    assert (await sharded.get_workload(wa.id, vm=a)).vm == a
    assert (await sharded.stop_workload(wb.id, vm=b)).vm == b
    assert (await sharded.stop_workload(wa.id, vm=a)).vm == a
    with pytest.raises(pt.NotFound):
        await sharded.get_workload("w999999")

    data = await sharded.snapshot_vm(a)
    restored = f"{prefix}-restored"
    await sharded.restore_vm(data, vm=restored)
    assert (await direct[sharded.owner(restored)].get_vm(restored)).name == restored
    again = await sharded.restore_vm(data, replace=True)  # the saved name picks the daemon
    assert again.name == a
    for name in (a, b, restored):
        await sharded.delete_vm(name)


async def test_misplaced_vms_are_found_and_moved(
    sharded: ShardedAsyncClient, direct: dict[str, AsyncClient]
) -> None:
    """A VM created straight on the daemon that does not own its name is reported by
    misplaced() and moved, memory and seq included, by move_vm()."""
    name = f"{_prefix()}-m"
    owner = sharded.owner(name)
    other = next(t for t in direct if t != owner)
    await direct[other].create_vm(name)
    await direct[other].set_memory_region(name, 0, 0, 16)
    await direct[other].add_tracking(name, [1])
    await direct[other].write(name, PAGE, b"moved")
    with pytest.raises(pt.NotFound):
        await sharded.get_vm(name)
    assert pt.Misplaced(name, other, owner) in await sharded.misplaced()
    vm = await sharded.move_vm(name, other)
    assert (vm.name, vm.head_seq, vm.tracked_gfns) == (name, 1, 1)
    assert await sharded.read(name, PAGE, 5) == b"moved"
    with pytest.raises(pt.NotFound):
        await direct[other].get_vm(name)
    assert not [m for m in await sharded.misplaced() if m.vm == name]
    await sharded.delete_vm(name)


async def test_an_unreachable_daemon_is_named(daemons: list[DaemonProcess]) -> None:
    """A fan-out call fails when one daemon is down, saying which one."""
    async with ShardedAsyncClient([daemons[0].tcp, "127.0.0.1:1"], timeout=5) as c:
        with pytest.raises(pt.Unavailable, match="127.0.0.1:1"):
            await c.list_vms()


def test_sync_client_and_cli_route_the_same_way(
    daemons: list[DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ShardedClient and ``pagetrack --target A,B`` (and PAGETRACK_TARGET=A,B) place VMs
    as the async client does, whatever order the targets are given in."""
    targets = [d.tcp for d in daemons]
    prefix = _prefix()
    names = [f"{prefix}-c{i}" for i in range(6)]
    for name in names[:3]:
        assert main(["--target", ",".join(reversed(targets)), "vm", "create", name]) == 0
    with ShardedClient(",".join(targets), timeout=10) as sc:
        for name in names[3:]:
            sc.create_vm(name)
        for name in names:
            assert sc.get_vm(name).name == name
            with pt.Client(sc.owner(name), timeout=10) as one:
                assert one.get_vm(name).name == name
        capsys.readouterr()
        monkeypatch.setenv("PAGETRACK_TARGET", ",".join(targets))
        assert main(["--json", "vm", "list"]) == 0
        listed = {v["name"] for v in json.loads(capsys.readouterr().out)}
        assert set(names) <= listed
        for name in names:
            sc.delete_vm(name)
        monkeypatch.setenv("PAGETRACK_TARGET", f"{targets[0]},127.0.0.1:1")
        assert main(["vm", "list"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("pagetrack: cannot reach pagetrackd at 127.0.0.1:1: ")
        assert err.count("\n") == 1
