"""Clients for several daemons, each VM placed on one of them by its name.

``ShardedAsyncClient`` and ``ShardedClient`` take several targets and offer the methods
of ``AsyncClient`` and ``Client``. A call about one VM goes to the daemon that owns the
VM's name on a consistent-hash ring (``pagetrack.placement.HashRing``), so every client
given the same targets, in any order, finds a VM on the same daemon. ``list_vms``,
``stats()``, ``list_workloads()`` and ``list_leases`` ask every daemon and merge the
answers. Workloads and leases live on one daemon: ``create_lease(..., vm=NAME)`` puts a
lease beside the VM whose tracking it will hold, and ``stop_workload``/``get_workload``
take ``vm=`` to say where to look (without it every daemon is asked).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from pagetrack import errors
from pagetrack import types as t
from pagetrack.client import (
    RESTORE_CHUNK_BYTES,
    AsyncClient,
    SnapshotSource,
    SyncFacade,
    WatchStream,
    _sync,
    _sync_watch,
    check_snapshot,
    load_snapshot,
    normalize_target,
)
from pagetrack.placement import DEFAULT_VNODES, HashRing

P = ParamSpec("P")
R = TypeVar("R")


def split_targets(targets: str | Iterable[str]) -> list[str]:
    """Targets from ``"a:1,b:2"`` or a list, normalized (``HOST`` gets port 50051) and
    without duplicates."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out = [normalize_target(x) for x in items if x.strip()]
    if not out:
        raise errors.InvalidArgument("no targets given; give HOST:PORT[,HOST:PORT...]")
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def _naming(target: str) -> Iterator[None]:
    """Say which daemon could not be reached."""
    try:
        yield
    except errors.Unavailable as exc:
        raise errors.Unavailable(f"{target}: {exc.message}", code=exc.code) from None


def _vm_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    vm = args[0] if args else kwargs.get("vm", kwargs.get("name"))
    if not isinstance(vm, str):
        raise errors.InvalidArgument("a VM name is needed to choose the daemon")
    return vm


def _routed(
    fn: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[ShardedAsyncClient, P], Coroutine[Any, Any, R]]:
    """An AsyncClient method about one VM, sent to the daemon owning the VM's name."""

    @functools.wraps(fn)
    async def method(self: ShardedAsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        target = self.owner(_vm_of(args, kwargs))
        with _naming(target):
            return await fn(self.clients[target], *args, **kwargs)

    return method


def _routed_watch(
    fn: Callable[Concatenate[AsyncClient, P], WatchStream],
) -> Callable[Concatenate[ShardedAsyncClient, P], WatchStream]:
    @functools.wraps(fn)
    def watch(self: ShardedAsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> WatchStream:
        return fn(self.clients[self.owner(_vm_of(args, kwargs))], *args, **kwargs)

    return watch


@dataclass(frozen=True, slots=True)
class Misplaced:
    """A VM found on a daemon that does not own its name (after targets changed)."""

    vm: str
    target: str
    owner: str


class ShardedAsyncClient:
    """AsyncClient's methods over several daemons, each VM on the owner of its name.

    ``targets`` is a list or a comma-separated string of ``HOST:PORT`` / ``unix:PATH``;
    the other arguments (token, ca_file, timeout, ...) are given to every per-daemon
    AsyncClient. ``clients`` maps each normalized target to its client.
    """

    def __init__(
        self, targets: str | Iterable[str], *, vnodes: int = DEFAULT_VNODES, **kwargs: Any
    ) -> None:
        names = split_targets(targets)
        self.ring = HashRing(names, vnodes=vnodes)
        self.clients = {target: AsyncClient(target, **kwargs) for target in names}
        self.target = ",".join(names)
        self._lease_targets: dict[str, str] = {}

    @property
    def targets(self) -> tuple[str, ...]:
        """The daemons, as given (normalized)."""
        return self.ring.targets

    def owner(self, vm: str) -> str:
        """The target VM ``vm`` is placed on."""
        return self.ring.owner(vm)

    def client_for(self, vm: str) -> AsyncClient:
        """The AsyncClient of the daemon owning ``vm``."""
        return self.clients[self.owner(vm)]

    async def __aenter__(self) -> ShardedAsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel."""
        await asyncio.gather(*(c.close() for c in self.clients.values()))

    async def _each(
        self, call: Callable[[AsyncClient], Coroutine[Any, Any, R]]
    ) -> list[tuple[str, R | BaseException]]:
        async def one(target: str, client: AsyncClient) -> R:
            with _naming(target):
                return await call(client)

        results = await asyncio.gather(
            *(one(target, c) for target, c in self.clients.items()), return_exceptions=True
        )
        return list(zip(self.clients, results, strict=True))

    async def _all(self, call: Callable[[AsyncClient], Coroutine[Any, Any, R]]) -> list[R]:
        """``call`` on every daemon at once; the first failure is raised."""
        out: list[R] = []
        for _, res in await self._each(call):
            if isinstance(res, BaseException):
                raise res
            out.append(res)
        return out

    async def _locate(
        self, what: str, probe: Callable[[AsyncClient], Coroutine[Any, Any, object]]
    ) -> str:
        """The one target where ``probe`` does not raise NotFound."""
        found: list[str] = []
        not_found: errors.NotFound | None = None
        for target, res in await self._each(probe):
            if isinstance(res, errors.NotFound):
                not_found = res
            elif isinstance(res, BaseException):
                raise res
            else:
                found.append(target)
        if not found:
            assert not_found is not None
            raise not_found
        if len(found) > 1:
            raise errors.FailedPrecondition(
                f"{what} exists on {len(found)} daemons ({', '.join(found)}); say which VM"
                " it belongs to (vm=... or --vm)"
            )
        return found[0]

    # ------------------------------------------------------------------ VM-scoped calls

    create_vm = _routed(AsyncClient.create_vm)
    get_vm = _routed(AsyncClient.get_vm)
    delete_vm = _routed(AsyncClient.delete_vm)
    set_policy = _routed(AsyncClient.set_policy)
    set_memory_region = _routed(AsyncClient.set_memory_region)
    delete_memory_region = _routed(AsyncClient.delete_memory_region)
    list_memory_regions = _routed(AsyncClient.list_memory_regions)
    get_dirty_log = _routed(AsyncClient.get_dirty_log)
    write = _routed(AsyncClient.write)
    write_batch = _routed(AsyncClient.write_batch)
    read = _routed(AsyncClient.read)
    cmpxchg = _routed(AsyncClient.cmpxchg)
    dma_write = _routed(AsyncClient.dma_write)
    add_tracking = _routed(AsyncClient.add_tracking)
    remove_tracking = _routed(AsyncClient.remove_tracking)
    query_tracking = _routed(AsyncClient.query_tracking)
    unwatch = _routed(AsyncClient.unwatch)
    list_notifiers = _routed(AsyncClient.list_notifiers)
    attach_plugin = _routed(AsyncClient.attach_plugin)
    detach_plugin = _routed(AsyncClient.detach_plugin)
    list_plugins = _routed(AsyncClient.list_plugins)
    audit_plugin = _routed(AsyncClient.audit_plugin)
    set_shadow_root = _routed(AsyncClient.set_shadow_root)
    translate = _routed(AsyncClient.translate)
    build_ppgtt = _routed(AsyncClient.build_ppgtt)
    submit_vgpu = _routed(AsyncClient.submit_vgpu)
    destroy_ppgtt = _routed(AsyncClient.destroy_ppgtt)
    start_workload = _routed(AsyncClient.start_workload)
    snapshot_vm = _routed(AsyncClient.snapshot_vm)
    snapshot_vm_to = _routed(AsyncClient.snapshot_vm_to)
    get_recording = _routed(AsyncClient.get_recording)
    watch = _routed_watch(AsyncClient.watch)

    async def replay_vm(
        self, recording: bytes, vm: str, *, chunk_bytes: int = RESTORE_CHUNK_BYTES
    ) -> tuple[t.Vm, int]:
        """AsyncClient.replay_vm, on the daemon owning ``vm``."""
        target = self.owner(vm)
        with _naming(target):
            return await self.clients[target].replay_vm(recording, vm, chunk_bytes=chunk_bytes)

    async def restore_vm(
        self,
        src: SnapshotSource,
        *,
        vm: str | None = None,
        replace: bool = False,
        chunk_bytes: int = RESTORE_CHUNK_BYTES,
    ) -> t.Vm:
        """AsyncClient.restore_vm, on the daemon owning ``vm`` (or the saved name)."""
        data, label = await asyncio.to_thread(load_snapshot, src)
        saved = await asyncio.to_thread(check_snapshot, data, label)
        name = vm or saved
        target = self.owner(name)
        with _naming(target):
            return await self.clients[target]._restore(data, name, replace, chunk_bytes)

    # ------------------------------------------------------------------ every daemon

    async def list_vms(self, *, all_tenants: bool = False) -> list[t.Vm]:
        """Every daemon's VMs, by tenant and name (``list_vms_by_daemon`` says where each
        one lives)."""
        return [vm for _, vm in await self.list_vms_by_daemon(all_tenants=all_tenants)]

    async def list_vms_by_daemon(
        self, *, all_tenants: bool = False
    ) -> list[tuple[str, t.Vm]]:
        """Every daemon's VMs with the target each was found on, by tenant, name and
        target. A VM seen through two targets that reach the same daemon (the same
        tenant, name and creation time) is listed once, under the first target."""
        lists = await self._all(lambda c: c.list_vms(all_tenants=all_tenants))
        seen: set[tuple[str, str, int]] = set()
        out: list[tuple[str, t.Vm]] = []
        for target, vms in zip(self.clients, lists, strict=True):
            for vm in vms:
                key = (vm.tenant, vm.name, vm.created_at_ns)
                if key not in seen:
                    seen.add(key)
                    out.append((target, vm))
        return sorted(out, key=lambda p: (p[1].tenant, p[1].name, p[0]))

    async def stats(self, vm: str | None = None) -> list[t.VmStats]:
        """Counters of one VM (from its daemon), or of every VM on every daemon."""
        if vm:
            target = self.owner(vm)
            with _naming(target):
                return await self.clients[target].stats(vm)
        lists = await self._all(lambda c: c.stats())
        return sorted((s for stats in lists for s in stats), key=lambda s: s.vm)

    async def list_workloads(self, vm: str | None = None) -> list[t.WorkloadStatus]:
        """Workloads of one VM (from its daemon), or of every daemon."""
        if vm:
            target = self.owner(vm)
            with _naming(target):
                return await self.clients[target].list_workloads(vm)
        lists = await self._all(lambda c: c.list_workloads())
        return [w for ws in lists for w in ws]

    async def _workload_target(self, workload_id: str, vm: str | None) -> str:
        if vm:
            return self.owner(vm)
        return await self._locate(
            f"workload {workload_id}", lambda c: c.get_workload(workload_id)
        )

    async def get_workload(self, workload_id: str, *, vm: str | None = None) -> t.WorkloadStatus:
        """A workload's status. Workload ids are only unique per daemon: give the VM it
        runs on, or every daemon is asked (FailedPrecondition if several have the id)."""
        target = await self._workload_target(workload_id, vm)
        with _naming(target):
            return await self.clients[target].get_workload(workload_id)

    async def stop_workload(self, workload_id: str, *, vm: str | None = None) -> t.WorkloadStatus:
        """Stop a workload (found as in get_workload)."""
        target = await self._workload_target(workload_id, vm)
        with _naming(target):
            return await self.clients[target].stop_workload(workload_id)

    # ------------------------------------------------------------------ leases

    async def create_lease(
        self, ttl_ms: int, *, label: str = "", vm: str | None = None
    ) -> t.Lease:
        """A TTL lease on the daemon owning ``vm`` (a lease can only hold tracking on its
        own daemon). ``vm`` may be left out when there is one target."""
        if vm:
            target = self.owner(vm)
        elif len(self.clients) == 1:
            target = self.targets[0]
        else:
            raise errors.InvalidArgument(
                "with several daemons a lease belongs to one of them: name the VM whose"
                " tracking it will hold (vm=... or --vm)"
            )
        with _naming(target):
            lease = await self.clients[target].create_lease(ttl_ms, label=label)
        self._lease_targets[lease.id] = target
        return lease

    async def _lease_target(self, lease_id: str) -> str:
        target = self._lease_targets.get(lease_id)
        if target is None:

            async def probe(c: AsyncClient) -> None:
                if not any(le.id == lease_id for le in await c.list_leases()):
                    raise errors.NotFound(f"lease {lease_id!r} not found")

            target = await self._locate(f"lease {lease_id}", probe)
            self._lease_targets[lease_id] = target
        return target

    async def keep_alive_lease(self, lease_id: str) -> t.Lease:
        """Extend a lease (on whichever daemon holds it)."""
        target = await self._lease_target(lease_id)
        with _naming(target):
            return await self.clients[target].keep_alive_lease(lease_id)

    async def revoke_lease(self, lease_id: str) -> t.LeaseRevoked:
        """End a lease now (on whichever daemon holds it)."""
        target = await self._lease_target(lease_id)
        with _naming(target):
            res = await self.clients[target].revoke_lease(lease_id)
        self._lease_targets.pop(lease_id, None)
        return res

    async def list_leases(self) -> list[t.Lease]:
        """Every daemon's live leases."""
        return [le for ls in await self._all(lambda c: c.list_leases()) for le in ls]

    # ------------------------------------------------------------------ admin

    async def server_info(self, target: str | None = None) -> t.ServerInfo:
        """One daemon's info (``target``, default the first listed)."""
        target = normalize_target(target) if target else self.targets[0]
        if target not in self.clients:
            raise errors.InvalidArgument(f"{target} is not one of {', '.join(self.targets)}")
        with _naming(target):
            return await self.clients[target].server_info()

    async def server_infos(self) -> dict[str, t.ServerInfo]:
        """Every daemon's info, by target."""
        return dict(zip(self.clients, await self._all(lambda c: c.server_info()), strict=True))

    # ------------------------------------------------------------------ placement upkeep

    async def misplaced(self) -> list[Misplaced]:
        """VMs sitting on a daemon that does not own their name (say, after a target was
        added): calls about them go to the owner and do not find them."""
        out: list[Misplaced] = []
        lists = await self._all(lambda c: c.list_vms())
        for target, vms in zip(self.clients, lists, strict=True):
            for v in vms:
                owner = self.owner(v.name)
                if owner != target:
                    out.append(Misplaced(v.name, target, owner))
        return sorted(out, key=lambda m: m.vm)

    async def move_vm(self, vm: str, source: str) -> t.Vm:
        """Move ``vm`` from daemon ``source`` to the daemon owning its name: snapshot it
        with memory, restore it there, then delete it on ``source`` (its Watch streams
        end with Closed(VM_DELETED); watch again through this client)."""
        source = normalize_target(source)
        if source not in self.clients:
            raise errors.InvalidArgument(f"{source} is not one of {', '.join(self.targets)}")
        owner = self.owner(vm)
        if owner == source:
            with _naming(source):
                return await self.clients[source].get_vm(vm)
        with _naming(source):
            data = await self.clients[source].snapshot_vm(vm, include_memory=True)
        with _naming(owner):
            moved = await self.clients[owner]._restore(data, vm, False, RESTORE_CHUNK_BYTES)
        with _naming(source):
            await self.clients[source].delete_vm(vm)
        return moved


class ShardedClient(SyncFacade[ShardedAsyncClient]):
    """Blocking ShardedAsyncClient: the methods of ``Client`` over several daemons, each
    VM on the owner of its name. Use as ``with``, or call close()."""

    def __init__(
        self, targets: str | Iterable[str], *, vnodes: int = DEFAULT_VNODES, **kwargs: Any
    ) -> None:
        super().__init__(functools.partial(ShardedAsyncClient, targets, vnodes=vnodes, **kwargs))
        self.target = self._async.target

    @property
    def targets(self) -> tuple[str, ...]:
        """The daemons, as given (normalized)."""
        return self._async.targets

    @property
    def ring(self) -> HashRing:
        """The placement ring."""
        return self._async.ring

    def owner(self, vm: str) -> str:
        """The target VM ``vm`` is placed on."""
        return self._async.owner(vm)

    create_vm = _sync(ShardedAsyncClient.create_vm)
    get_vm = _sync(ShardedAsyncClient.get_vm)
    list_vms = _sync(ShardedAsyncClient.list_vms)
    list_vms_by_daemon = _sync(ShardedAsyncClient.list_vms_by_daemon)
    delete_vm = _sync(ShardedAsyncClient.delete_vm)
    set_policy = _sync(ShardedAsyncClient.set_policy)
    set_memory_region = _sync(ShardedAsyncClient.set_memory_region)
    delete_memory_region = _sync(ShardedAsyncClient.delete_memory_region)
    list_memory_regions = _sync(ShardedAsyncClient.list_memory_regions)
    get_dirty_log = _sync(ShardedAsyncClient.get_dirty_log)
    write = _sync(ShardedAsyncClient.write)
    write_batch = _sync(ShardedAsyncClient.write_batch)
    read = _sync(ShardedAsyncClient.read)
    cmpxchg = _sync(ShardedAsyncClient.cmpxchg)
    dma_write = _sync(ShardedAsyncClient.dma_write)
    add_tracking = _sync(ShardedAsyncClient.add_tracking)
    remove_tracking = _sync(ShardedAsyncClient.remove_tracking)
    query_tracking = _sync(ShardedAsyncClient.query_tracking)
    create_lease = _sync(ShardedAsyncClient.create_lease)
    keep_alive_lease = _sync(ShardedAsyncClient.keep_alive_lease)
    revoke_lease = _sync(ShardedAsyncClient.revoke_lease)
    list_leases = _sync(ShardedAsyncClient.list_leases)
    unwatch = _sync(ShardedAsyncClient.unwatch)
    list_notifiers = _sync(ShardedAsyncClient.list_notifiers)
    attach_plugin = _sync(ShardedAsyncClient.attach_plugin)
    detach_plugin = _sync(ShardedAsyncClient.detach_plugin)
    list_plugins = _sync(ShardedAsyncClient.list_plugins)
    audit_plugin = _sync(ShardedAsyncClient.audit_plugin)
    set_shadow_root = _sync(ShardedAsyncClient.set_shadow_root)
    translate = _sync(ShardedAsyncClient.translate)
    build_ppgtt = _sync(ShardedAsyncClient.build_ppgtt)
    submit_vgpu = _sync(ShardedAsyncClient.submit_vgpu)
    destroy_ppgtt = _sync(ShardedAsyncClient.destroy_ppgtt)
    start_workload = _sync(ShardedAsyncClient.start_workload)
    stop_workload = _sync(ShardedAsyncClient.stop_workload)
    get_workload = _sync(ShardedAsyncClient.get_workload)
    list_workloads = _sync(ShardedAsyncClient.list_workloads)
    stats = _sync(ShardedAsyncClient.stats)
    server_info = _sync(ShardedAsyncClient.server_info)
    server_infos = _sync(ShardedAsyncClient.server_infos)
    snapshot_vm = _sync(ShardedAsyncClient.snapshot_vm)
    snapshot_vm_to = _sync(ShardedAsyncClient.snapshot_vm_to)
    restore_vm = _sync(ShardedAsyncClient.restore_vm)
    get_recording = _sync(ShardedAsyncClient.get_recording)
    replay_vm = _sync(ShardedAsyncClient.replay_vm)
    misplaced = _sync(ShardedAsyncClient.misplaced)
    move_vm = _sync(ShardedAsyncClient.move_vm)

    watch = _sync_watch(ShardedAsyncClient.watch)


__all__ = ["Misplaced", "ShardedAsyncClient", "ShardedClient", "split_targets"]
