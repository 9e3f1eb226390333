"""The pagetrack client: ``AsyncClient`` (grpc.aio) and the sync facade ``Client``.

Every method takes plain Python values, returns a frozen dataclass from
``pagetrack.types`` and raises a ``pagetrack.errors.PageTrackError`` subclass on failure.
``watch()`` returns a stream that reconnects with backoff and resumes from the last seq
it saw, so nothing still held in the daemon's history is lost.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import threading
import warnings
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import (
    Any,
    BinaryIO,
    Concatenate,
    Generic,
    ParamSpec,
    Protocol,
    Self,
    TypeAlias,
    TypeVar,
    cast,
)

import grpc
import numpy as np
import numpy.typing as npt

from pagetrack import _convert as cv
from pagetrack import errors, snapshot_format, targets
from pagetrack import types as t
from pagetrack.constants import DEFAULT_TARGET
from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg

DEFAULT_PORT = targets.DEFAULT_PORT

#: what add_tracking & co. accept as gfns: one int, ints, or a numpy array
Gfns: TypeAlias = int | Iterable[int] | npt.NDArray[Any] | None
#: gfn ranges: GfnRange objects, ``range`` objects or ``(start, count)`` pairs
GfnRanges: TypeAlias = Iterable[t.GfnRange | range | tuple[int, int]] | None
Bytes: TypeAlias = bytes | bytearray | memoryview
#: what restore_vm reads: snapshot bytes, a file path, or a binary file open for reading
SnapshotSource: TypeAlias = Bytes | str | os.PathLike[str] | BinaryIO
#: where snapshot_vm_to writes: a file path (replaced atomically) or a binary file
SnapshotDest: TypeAlias = str | os.PathLike[str] | BinaryIO

Req = TypeVar("Req")
Resp = TypeVar("Resp")
P = ParamSpec("P")
R = TypeVar("R")

_MAX_MESSAGE = 128 << 20

#: bytes per RestoreVm message
RESTORE_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Backoff:
    """How ``watch()`` reconnects: exponential delays with jitter, bounded in count.

    Attempt n (from 1) waits ``min(max_s, initial_s * multiplier ** (n - 1))`` seconds,
    +/- ``jitter`` of that. After ``max_attempts`` consecutive failures (0 = never give
    up) the stream raises ``Unavailable``. A successful registration resets the count.
    """

    initial_s: float = 0.1
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int = 30

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnection attempt ``attempt`` (1-based)."""
        base = min(self.max_s, self.initial_s * self.multiplier ** max(0, attempt - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


def normalize_target(target: str) -> str:
    """``HOST:PORT``, ``unix:PATH`` or a bare host (port 50051 is added); InvalidArgument
    for an empty target or a port outside 1-65535."""
    try:
        return targets.normalize_target(target)
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc)) from None


async def _unary(
    method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
    request: Req,
    metadata: tuple[tuple[str, str], ...],
    call_timeout: float | None,
) -> Resp:
    try:
        return await method(request, metadata=metadata, timeout=call_timeout)
    except grpc.RpcError as err:
        raise errors.from_rpc_error(err) from None


def check_snapshot(data: Bytes, label: str = "snapshot") -> str:
    """Check snapshot bytes as the daemon will (magic, length, trailing sha256) and return
    the VM name saved in them. Raises InvalidArgument saying what is wrong, prefixed
    with ``label`` (a file name, say). The format version is left to the daemon.
    """
    view = memoryview(data).cast("B")
    n = len(view)
    if n == 0:
        raise errors.InvalidArgument(f"{label}: empty, not a pagetrack VM snapshot")
    if not snapshot_format.MAGIC.startswith(bytes(view[: len(snapshot_format.MAGIC)])):
        raise errors.InvalidArgument(f"{label}: not a pagetrack VM snapshot (bad magic bytes)")
    if n < snapshot_format.MIN_BYTES:
        raise errors.InvalidArgument(
            f"{label}: truncated: {n} bytes cannot hold a pagetrack VM snapshot"
        )
    digest = snapshot_format.DIGEST_BYTES
    if hashlib.sha256(view[:-digest]).digest() != bytes(view[-digest:]):
        raise errors.InvalidArgument(
            f"{label}: corrupt or truncated snapshot ({n} bytes whose sha256 does not match"
            " the one saved at its end)"
        )
    start = snapshot_format.PREFIX_BYTES
    end = start + int.from_bytes(view[start - 4 : start], "little")
    try:
        if end > n - digest:
            raise ValueError("header runs past the end")
        header = json.loads(bytes(view[start:end]))
        name = header["name"]
        if not isinstance(name, str):
            raise ValueError("name is not a string")
    except (ValueError, TypeError, KeyError) as exc:
        raise errors.InvalidArgument(f"{label}: snapshot header is unreadable ({exc})") from None
    return name


def load_snapshot(src: SnapshotSource) -> tuple[bytes, str]:
    """The bytes of a snapshot given as bytes, a path or a binary file, and a label for
    messages (the path, or ``"snapshot"``)."""
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src), "snapshot"
    if isinstance(src, str | os.PathLike):
        path = Path(src)
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            raise errors.InvalidArgument(f"{path}: {exc.strerror or exc}") from None
    data = src.read()
    if not isinstance(data, bytes | bytearray):
        raise errors.InvalidArgument("restore_vm needs a file opened in binary mode")
    return bytes(data), str(getattr(src, "name", "snapshot"))


class AsyncClient:
    """Async client for pagetrackd (grpc.aio).

    ``target`` is ``HOST:PORT`` or ``unix:PATH``. ``token`` is sent as
    ``authorization: Bearer <token>``. ``ca_file`` (PEM) turns TLS on and verifies the
    server against it; ``tls=True`` uses TLS with the system roots. ``timeout`` bounds
    each unary call, in seconds (None = no bound). Use as ``async with``, or call close().

    Every method is a coroutine (``await client.create_vm("vm1")``) except ``watch()``,
    which returns its stream at once, without ``await``: an async iterator to use as
    ``async with client.watch("vm1") as stream: async for msg in stream: ...``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        ca_file: str | Path | None = None,
        tls: bool | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = 30.0,
        backoff: Backoff | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = normalize_target(target)
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        channel_options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            # Let the channel retry connecting as often as watch() retries its stream.
            # (Not grpc.min_reconnect_backoff_ms: gRPC also uses it as the connect timeout.)
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self.backoff.initial_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(self.backoff.max_s * 1000))),
        ]
        if tls_server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
        channel_options.extend(options)
        use_tls = tls if tls is not None else ca_file is not None
        if use_tls:
            root = None
            if ca_file is not None:
                try:
                    root = Path(ca_file).read_bytes()
                except OSError as exc:
                    raise errors.InvalidArgument(f"CA file {ca_file}: {exc.strerror}") from None
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.aio.secure_channel(self.target, creds, options=channel_options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=channel_options)
        ch = self._channel
        self._vms = pbg.VmServiceStub(ch)
        self._memory = pbg.MemoryServiceStub(ch)
        self._tracking = pbg.TrackingServiceStub(ch)
        self._leases = pbg.LeaseServiceStub(ch)
        self._watch = pbg.WatchServiceStub(ch)
        self._plugins = pbg.PluginServiceStub(ch)
        self._workloads = pbg.WorkloadServiceStub(ch)
        self._admin = pbg.AdminServiceStub(ch)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; open watch streams end."""
        await self._channel.close()

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req
    ) -> Resp:
        return await _unary(method, request, self._metadata, self.timeout)

    # ------------------------------------------------------------------ VMs

    async def create_vm(
        self,
        name: str,
        *,
        dma_policy: t.DmaPolicy | str | None = None,
        semantics: t.Semantics | str | None = None,
        vcpus: int | None = None,
        max_memslots: int | None = None,
        gfn_bits: int | None = None,
        history_events: int | None = None,
        history_bytes: int | None = None,
        cost: Mapping[str, int] | None = None,
        record: bool = False,
    ) -> t.Vm:
        """Create a VM with no memslots; unset options take the daemon's defaults.

        ``cost`` maps CostModel field names (``emulate_cycles``, ...) to cycles. With
        ``record`` the daemon records every operation on the VM, for get_recording and
        replay_vm.
        """
        limits = pb.VmLimits()
        for key, value in (
            ("max_vcpus", vcpus),
            ("max_memslots", max_memslots),
            ("gfn_bits", gfn_bits),
            ("history_events", history_events),
            ("history_bytes", history_bytes),
        ):
            if value is not None:
                setattr(limits, key, int(value))
        options = pb.VmOptions(
            dma_policy=cv.to_pb(t.DmaPolicy, dma_policy, "dma_policy"),  # type: ignore[arg-type]
            semantics=cv.to_pb(t.Semantics, semantics, "semantics"),  # type: ignore[arg-type]
            limits=limits,
            record=record,
        )
        cost_msg = cv.cost_pb(cost)
        if cost_msg is not None:
            options.cost.CopyFrom(cost_msg)
        reply = await self._call(
            self._vms.CreateVm, pb.CreateVmRequest(name=name, options=options)
        )
        return cv.vm(reply.vm)

    async def get_vm(self, name: str) -> t.Vm:
        """One VM."""
        reply = await self._call(self._vms.GetVm, pb.GetVmRequest(vm=name))
        return cv.vm(reply.vm)

    async def list_vms(self, *, all_tenants: bool = False) -> list[t.Vm]:
        """Every VM of the caller's tenant (every tenant's, for an admin with all_tenants)."""
        out: list[t.Vm] = []
        token = ""
        while True:
            reply = await self._call(
                self._vms.ListVms, pb.ListVmsRequest(all_tenants=all_tenants, page_token=token)
            )
            out.extend(cv.vm(v) for v in reply.vms)
            token = reply.next_page_token
            if not token:
                return out

    async def delete_vm(self, name: str) -> int:
        """Delete a VM and everything in it; returns the seq of its last event."""
        reply = await self._call(self._vms.DeleteVm, pb.DeleteVmRequest(vm=name))
        return reply.last_seq

    async def set_policy(
        self,
        vm: str,
        *,
        dma_policy: t.DmaPolicy | str | None = None,
        semantics: t.Semantics | str | None = None,
        cost: Mapping[str, int] | None = None,
    ) -> t.Vm:
        """Change a VM's DMA policy, semantics or cost model (None keeps the current one)."""
        request = pb.SetVmPolicyRequest(
            vm=vm,
            dma_policy=cv.to_pb(t.DmaPolicy, dma_policy, "dma_policy"),  # type: ignore[arg-type]
            semantics=cv.to_pb(t.Semantics, semantics, "semantics"),  # type: ignore[arg-type]
        )
        cost_msg = cv.cost_pb(cost)
        if cost_msg is not None:
            request.cost.CopyFrom(cost_msg)
        reply = await self._call(self._vms.SetVmPolicy, request)
        return cv.vm(reply.vm)

    # ------------------------------------------------------------------ memory

    async def set_memory_region(
        self,
        vm: str,
        slot: int,
        base_gfn: int,
        npages: int,
        *,
        readonly: bool = False,
        log_dirty_pages: bool = False,
    ) -> t.RegionChange:
        """Create, move, re-flag or (npages = 0) delete a memslot."""
        request = pb.SetMemoryRegionRequest(
            vm=vm, slot=slot, base_gfn=base_gfn, npages=npages, readonly=readonly,
            log_dirty_pages=log_dirty_pages,
        )
        return cv.region_change(await self._call(self._memory.SetMemoryRegion, request))

    async def delete_memory_region(self, vm: str, slot: int) -> t.RegionChange:
        """Delete a memslot and its tracking."""
        return await self.set_memory_region(vm, slot, 0, 0)

    async def list_memory_regions(self, vm: str) -> list[t.Memslot]:
        """A VM's memslots, by base gfn."""
        reply = await self._call(
            self._memory.ListMemoryRegions, pb.ListMemoryRegionsRequest(vm=vm)
        )
        return [cv.memslot(r) for r in reply.regions]

    async def get_dirty_log(self, vm: str, slot: int) -> t.DirtyLog:
        """Read and clear a dirty-logging slot's bitmap."""
        reply = await self._call(
            self._memory.GetDirtyLog, pb.GetDirtyLogRequest(vm=vm, slot=slot)
        )
        return t.DirtyLog(
            slot=reply.slot, base_gfn=reply.base_gfn, npages=reply.npages,
            bitmap=reply.bitmap, dirty_count=reply.dirty_count,
        )

    async def write(self, vm: str, gpa: int, data: Bytes, *, vcpu: int = 0) -> t.WriteResult:
        """One guest write by ``vcpu``: MMIO exit, fast path or trapped and emulated."""
        request = pb.WriteGuestRequest(vm=vm, vcpu=vcpu, gpa=gpa, data=bytes(data))
        return cv.write_result(await self._call(self._memory.WriteGuest, request))

    async def write_batch(
        self,
        vm: str,
        gpa: npt.ArrayLike,
        data: Bytes | npt.NDArray[Any] | Sequence[Bytes],
        *,
        length: npt.ArrayLike | None = None,
        vcpu: int | npt.ArrayLike = 0,
        want_pieces: bool = False,
    ) -> t.BatchWriteResult:
        """Many guest writes in one call.

        ``gpa`` holds one address per write. ``data`` is either a list with each write's
        bytes, or one buffer with all of them back to back: then ``length`` gives each
        write's size, or, without it, the buffer is split into equal parts. ``vcpu`` is
        one id for every write, or one per write.
        """
        try:
            gpas = np.asarray(gpa, dtype=np.uint64).reshape(-1)
        except (OverflowError, ValueError, TypeError):
            raise errors.InvalidArgument("gpa must be non-negative integers") from None
        n = len(gpas)
        if isinstance(data, list | tuple):
            chunks = [bytes(x) for x in data]
            if len(chunks) != n:
                raise errors.InvalidArgument(f"data has {len(chunks)} writes; gpa has {n}")
            lengths: list[int] = [len(c) for c in chunks]
            buf = b"".join(chunks)
        else:
            buf = data.tobytes() if isinstance(data, np.ndarray) else bytes(cast(Bytes, data))
            if length is None:
                if n == 0 or len(buf) % n:
                    raise errors.InvalidArgument(
                        f"{len(buf)} data bytes do not split evenly into {n} writes; give length"
                    )
                lengths = [len(buf) // n] * n
            else:
                lengths = [int(x) for x in np.asarray(length).reshape(-1).tolist()]
        if isinstance(vcpu, int | np.integer):
            vcpus = [int(vcpu)]
        else:
            vcpus = [int(x) for x in np.asarray(vcpu).reshape(-1).tolist()]
        request = pb.WriteGuestBatchRequest(
            vm=vm, gpa=gpas.tolist(), vcpu=vcpus, length=lengths, data=buf,
            want_pieces=want_pieces,
        )
        return cv.batch_result(await self._call(self._memory.WriteGuestBatch, request))

    async def read(self, vm: str, gpa: int, length: int) -> bytes:
        """Read guest memory; unwritten pages and MMIO ranges read as zeros."""
        reply = await self._call(
            self._memory.ReadGuest, pb.ReadGuestRequest(vm=vm, gpa=gpa, length=length)
        )
        return reply.data

    async def cmpxchg(
        self, vm: str, gpa: int, expected: Bytes, desired: Bytes, *, vcpu: int = 0
    ) -> t.CmpxchgResult:
        """A guest ``LOCK CMPXCHG`` by ``vcpu`` (KVM's emulator_cmpxchg_emulated): 1, 2, 4
        or 8 bytes inside a page of RAM are exchanged atomically and, on a tracked page,
        notified only if memory held ``expected``; anything else is done as a write."""
        request = pb.CompareExchangeGuestRequest(
            vm=vm, vcpu=vcpu, gpa=gpa, expected=bytes(expected), desired=bytes(desired)
        )
        return cv.cmpxchg_result(await self._call(self._memory.CompareExchangeGuest, request))

    async def dma_write(self, vm: str, gpa: int, data: Bytes) -> t.DmaResult:
        """A device-model DMA write, handled by the VM's DMA policy."""
        request = pb.DmaWriteRequest(vm=vm, gpa=gpa, data=bytes(data))
        return cv.dma_result(await self._call(self._memory.DmaWrite, request))

    # ------------------------------------------------------------------ tracking

    def _tracking_request(
        self, vm: str, gfns: Gfns, ranges: GfnRanges, lease_id: str | None
    ) -> pb.TrackingChangeRequest:
        return pb.TrackingChangeRequest(
            vm=vm, ranges=cv.gfn_ranges_pb(ranges), gfns=cv.gfn_list(gfns),
            lease_id=lease_id or "",
        )

    async def add_tracking(
        self,
        vm: str,
        gfns: Gfns = None,
        *,
        ranges: GfnRanges = None,
        lease_id: str | None = None,
    ) -> t.TrackingChange:
        """Add one write-track reference per gfn (ranges and gfns together).

        With ``lease_id`` the references end with that lease (or Watch stream).
        """
        request = self._tracking_request(vm, gfns, ranges, lease_id)
        reply = await self._call(self._tracking.AddTracking, request)
        return t.TrackingChange(reply.references, reply.transitions, reply.tracked_gfns)

    async def remove_tracking(
        self,
        vm: str,
        gfns: Gfns = None,
        *,
        ranges: GfnRanges = None,
        lease_id: str | None = None,
    ) -> t.TrackingChange:
        """Remove one reference per gfn, held by the same owner (tenant or lease)."""
        request = self._tracking_request(vm, gfns, ranges, lease_id)
        reply = await self._call(self._tracking.RemoveTracking, request)
        return t.TrackingChange(reply.references, reply.transitions, reply.tracked_gfns)

    async def query_tracking(
        self,
        vm: str,
        gfns: Gfns = None,
        *,
        ranges: GfnRanges = None,
        only_tracked: bool = False,
        include_owners: bool = False,
    ) -> list[t.GfnTrackState]:
        """Tracking state per gfn; with no gfns and only_tracked, every tracked gfn."""
        request = pb.QueryTrackingRequest(
            vm=vm, ranges=cv.gfn_ranges_pb(ranges), gfns=cv.gfn_list(gfns),
            only_tracked=only_tracked, include_owners=include_owners,
        )
        reply = await self._call(self._tracking.QueryTracking, request)
        return [cv.track_state(g) for g in reply.gfns]

    # ------------------------------------------------------------------ leases

    async def create_lease(self, ttl_ms: int, *, label: str = "") -> t.Lease:
        """A TTL lease; keep it alive within ttl_ms or its tracking is released."""
        reply = await self._call(
            self._leases.CreateLease, pb.CreateLeaseRequest(ttl_ms=ttl_ms, label=label)
        )
        return cv.lease(reply.lease)

    async def keep_alive_lease(self, lease_id: str) -> t.Lease:
        """Extend a lease to now + its TTL."""
        reply = await self._call(
            self._leases.KeepAliveLease, pb.KeepAliveLeaseRequest(lease_id=lease_id)
        )
        return cv.lease(reply.lease)

    async def revoke_lease(self, lease_id: str) -> t.LeaseRevoked:
        """End a lease now, releasing its tracking."""
        reply = await self._call(
            self._leases.RevokeLease, pb.RevokeLeaseRequest(lease_id=lease_id)
        )
        return t.LeaseRevoked(reply.released_references, reply.untracked_gfns)

    async def list_leases(self) -> list[t.Lease]:
        """The tenant's live leases."""
        reply = await self._call(self._leases.ListLeases, pb.ListLeasesRequest())
        return [cv.lease(le) for le in reply.leases]

    # ------------------------------------------------------------------ watch

    def watch(
        self,
        vm: str,
        *,
        start_seq: int | None = None,
        ranges: GfnRanges = None,
        sources: Iterable[t.EventSource | str] | None = None,
        only_owned: bool = False,
        owner_leases: Iterable[str] = (),
        policy: t.SlowConsumerPolicy | str | None = None,
        max_batch_events: int | None = None,
        max_batch_bytes: int | None = None,
        max_batch_delay_ms: int | None = None,
        queue_limit: int | None = None,
        block_timeout_ms: int | None = None,
        heartbeat_interval_ms: int | None = None,
        omit_data: bool = False,
        allow_compacted: bool = True,
        resume: bool = True,
        backoff: Backoff | None = None,
        stall_timeout_s: float | None = None,
        gfn_ranges: GfnRanges = None,
        plugins: Iterable[str] = (),
        only_findings: bool = False,
    ) -> WatchStream:
        """Open a stream of a VM's write events: ``async for msg in client.watch(vm)``
        (no ``await``: the stream is an async iterator; ``async with`` closes it).

        Messages are Registered (first, and again after each reconnect), EventBatch,
        Gap, RegionRemoved, Finding, Progress and Closed (last). ``start_seq`` replays from the
        daemon's history; a start already compacted yields a Gap(COMPACTED) and goes on
        from the oldest held seq (unless ``allow_compacted=False``: then OutOfRange).
        With ``resume``, a lost connection (UNAVAILABLE, daemon shutdown, or no message
        for ``stall_timeout_s``, default 3 heartbeats + 2 s) is retried with ``backoff``
        and the stream resumes from the seq after the last one it saw.

        ``ranges`` keeps only events on those gfns, given as for ``add_tracking``.
        ``gfn_ranges`` is its old name: it still works, with a DeprecationWarning.
        Plugins' findings arrive as Finding records in seq order with the events;
        ``plugins`` keeps only those plugins' findings, ``only_findings`` drops the
        write events.
        """
        if gfn_ranges is not None:
            if ranges is not None:
                raise TypeError("watch() takes ranges or gfn_ranges (its old name), not both")
            warnings.warn(
                "watch(gfn_ranges=...) is deprecated; use watch(ranges=...) as add_tracking"
                " does", DeprecationWarning, stacklevel=2,
            )
            ranges = gfn_ranges
        request = pb.WatchRequest(
            vm=vm,
            gfn_ranges=cv.gfn_ranges_pb(ranges),
            sources=[cv.to_pb(t.EventSource, s, "source") for s in sources or ()],  # type: ignore[misc]
            only_owned=only_owned,
            owner_leases=list(owner_leases),
            policy=cv.to_pb(t.SlowConsumerPolicy, policy, "policy"),  # type: ignore[arg-type]
            omit_data=omit_data,
            plugins=list(plugins),
            only_findings=only_findings,
        )
        for key, value in (
            ("max_batch_events", max_batch_events),
            ("max_batch_bytes", max_batch_bytes),
            ("max_batch_delay_ms", max_batch_delay_ms),
            ("queue_limit", queue_limit),
            ("block_timeout_ms", block_timeout_ms),
            ("heartbeat_interval_ms", heartbeat_interval_ms),
        ):
            if value is not None:
                setattr(request, key, int(value))
        return WatchStream(
            self,
            request,
            start_seq=start_seq,
            allow_compacted=allow_compacted,
            resume=resume,
            backoff=backoff or self.backoff,
            stall_timeout_s=stall_timeout_s,
        )

    def watch_raw(
        self, request: pb.WatchRequest
    ) -> grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchResponse]:
        """Open one Watch call as it is on the wire: raw WatchResponse messages, no
        conversion and no reconnection (for tools that forward the records, such as
        ``pagetrack export nats``). Errors surface as grpc.RpcError."""
        return self._watch.Watch(request, metadata=self._metadata)

    async def unwatch(self, vm: str, notifier_id: int) -> int:
        """End a Watch stream by notifier id; returns the last seq it will deliver."""
        reply = await self._call(
            self._watch.Unwatch, pb.UnwatchRequest(vm=vm, notifier_id=notifier_id)
        )
        return reply.last_seq

    async def list_notifiers(self, vm: str) -> list[t.Notifier]:
        """A VM's notifiers (plugins and Watch streams) in dispatch order."""
        reply = await self._call(self._watch.ListNotifiers, pb.ListNotifiersRequest(vm=vm))
        return [cv.notifier(n) for n in reply.notifiers]

    # ------------------------------------------------------------------ plugins

    async def attach_plugin(
        self, vm: str, kind: t.PluginKind | str, options: Mapping[str, Any] | None = None
    ) -> t.PluginStatus:
        """Attach a plugin to a VM: the built-in shadow-mmu or vgpu, or a third-party
        plugin by its name (installed on the daemon's side and allowed by its operator:
        else PermissionDenied)."""
        request = pb.AttachPluginRequest(
            vm=vm, options=cv.options_pb(options), **cv.plugin_ref(kind)
        )
        reply = await self._call(self._plugins.AttachPlugin, request)
        return cv.plugin_status(reply.status)

    async def detach_plugin(self, vm: str, kind: t.PluginKind | str) -> int:
        """Detach a plugin (by kind or name); returns the tracking references it
        released."""
        request = pb.DetachPluginRequest(vm=vm, **cv.plugin_ref(kind))
        reply = await self._call(self._plugins.DetachPlugin, request)
        return reply.released_references

    async def list_plugins(self, vm: str) -> list[t.PluginStatus]:
        """A VM's attached plugins and their counters."""
        reply = await self._call(self._plugins.ListPlugins, pb.ListPluginsRequest(vm=vm))
        return [cv.plugin_status(p) for p in reply.plugins]

    async def audit_plugin(
        self, vm: str, kind: t.PluginKind | str, *, max_mismatches: int = 0
    ) -> t.AuditReport:
        """Compare every shadow entry with a fresh walk of guest memory."""
        request = pb.AuditPluginRequest(
            vm=vm, max_mismatches=max_mismatches, **cv.plugin_ref(kind)
        )
        return cv.audit(await self._call(self._plugins.AuditPlugin, request))

    async def set_shadow_root(self, vm: str, cr3: int, *, vcpu: int = 0) -> t.ShadowRoot:
        """shadow-mmu: set a vCPU's guest page-table root (CR3) and shadow it."""
        reply = await self._call(
            self._plugins.SetShadowRoot, pb.SetShadowRootRequest(vm=vm, vcpu=vcpu, cr3=cr3)
        )
        return t.ShadowRoot(reply.root_gfn, reply.shadow_pages)

    async def translate(
        self, vm: str, gva: int, *, vcpu: int = 0, write: bool = False
    ) -> t.Translation:
        """shadow-mmu: translate a guest-virtual address through the shadow."""
        request = pb.TranslateShadowRequest(vm=vm, vcpu=vcpu, gva=gva, write=write)
        return cv.plain(t.Translation, await self._call(self._plugins.TranslateShadow, request))

    async def build_ppgtt(
        self,
        vm: str,
        root_gpa: int,
        *,
        levels: int = 0,
        options: Mapping[str, Any] | None = None,
    ) -> t.Ppgtt:
        """vgpu: shadow a guest PPGTT rooted at root_gpa."""
        request = pb.BuildPpgttRequest(
            vm=vm, root_gpa=root_gpa, levels=levels, options=cv.options_pb(options)
        )
        return cv.plain(t.Ppgtt, await self._call(self._plugins.BuildPpgtt, request))

    async def submit_vgpu(
        self, vm: str, ppgtt_id: int, gpu_addrs: Iterable[int]
    ) -> t.VgpuSubmission:
        """vgpu: flush pending entries and translate GPU addresses (a submission)."""
        request = pb.SubmitVgpuRequest(vm=vm, ppgtt_id=ppgtt_id, gpu_addrs=list(gpu_addrs))
        reply = await self._call(self._plugins.SubmitVgpu, request)
        return t.VgpuSubmission(reply.flushed_entries, tuple(reply.gpa), tuple(reply.scratch))

    async def destroy_ppgtt(self, vm: str, ppgtt_id: int) -> int:
        """vgpu: drop a shadowed PPGTT; returns the tracking references released."""
        reply = await self._call(
            self._plugins.DestroyPpgtt, pb.DestroyPpgttRequest(vm=vm, ppgtt_id=ppgtt_id)
        )
        return reply.released_references

    # ------------------------------------------------------------------ workloads

    async def start_workload(
        self,
        vm: str,
        kind: t.WorkloadKind | str,
        *,
        rate: float = 0.0,
        count: int = 0,
        duration_ms: int = 0,
        seed: int = 0,
        vcpus: int = 0,
        tracked_fraction: float = 0.0,
        options: Mapping[str, Any] | None = None,
    ) -> t.WorkloadStatus:
        """Start a simulated write stream (rate 0 = as fast as possible; count and
        duration 0 = until stopped)."""
        request = pb.StartWorkloadRequest(
            vm=vm,
            kind=cv.to_pb(t.WorkloadKind, kind, "kind"),  # type: ignore[arg-type]
            rate=rate, count=count, duration_ms=duration_ms, seed=seed, vcpus=vcpus,
            tracked_fraction=tracked_fraction, options=cv.options_pb(options),
        )
        reply = await self._call(self._workloads.StartWorkload, request)
        return cv.workload(reply.workload)

    async def stop_workload(self, workload_id: str) -> t.WorkloadStatus:
        """Stop a workload; returns its final status."""
        reply = await self._call(
            self._workloads.StopWorkload, pb.StopWorkloadRequest(id=workload_id)
        )
        return cv.workload(reply.workload)

    async def get_workload(self, workload_id: str) -> t.WorkloadStatus:
        """A workload's status."""
        reply = await self._call(
            self._workloads.GetWorkload, pb.GetWorkloadRequest(id=workload_id)
        )
        return cv.workload(reply.workload)

    async def list_workloads(self, vm: str | None = None) -> list[t.WorkloadStatus]:
        """Running and recently ended workloads (of one VM, or of every VM)."""
        reply = await self._call(
            self._workloads.ListWorkloads, pb.ListWorkloadsRequest(vm=vm or "")
        )
        return [cv.workload(w) for w in reply.workloads]

    # ------------------------------------------------------------------ admin

    async def stats(self, vm: str | None = None) -> list[t.VmStats]:
        """Counters of one VM, or of every VM of the tenant."""
        reply = await self._call(self._admin.GetStats, pb.GetStatsRequest(vm=vm or ""))
        return [cv.vm_stats(s) for s in reply.vms]

    async def server_info(self) -> t.ServerInfo:
        """The daemon's version, limits and the caller's identity and quotas."""
        return cv.server_info(
            await self._call(self._admin.GetServerInfo, pb.GetServerInfoRequest())
        )

    # ------------------------------------------------------------------ snapshots

    async def _snapshot(
        self,
        vm: str,
        sink: Callable[[bytes], object],
        include_memory: bool,
        chunk_bytes: int,
    ) -> t.SnapshotInfo:
        request = pb.SnapshotVmRequest(
            vm=vm, include_memory=include_memory, chunk_bytes=chunk_bytes
        )
        call = self._admin.SnapshotVm(request, metadata=self._metadata, timeout=self.timeout)
        digest = hashlib.sha256()
        size = 0
        last: pb.SnapshotChunk | None = None
        try:
            async for chunk in call:
                if last is not None or chunk.offset != size:
                    raise _data_loss(
                        f"snapshot of VM {vm!r}: chunk at offset {chunk.offset} where"
                        f" {size} was due{' (after the last chunk)' if last else ''}"
                    )
                digest.update(chunk.data)
                size += len(chunk.data)
                sink(chunk.data)
                if chunk.last:
                    last = chunk
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err) from None
        finally:
            call.cancel()
        if last is None:
            raise _data_loss(
                f"snapshot of VM {vm!r} ended after {size} bytes, before its last chunk"
            )
        if last.total_bytes != size:
            raise _data_loss(
                f"snapshot of VM {vm!r}: received {size} bytes, the daemon sent {last.total_bytes}"
            )
        if last.sha256 != digest.digest():
            raise _data_loss(
                f"snapshot of VM {vm!r}: the bytes received do not match the daemon's sha256"
            )
        return t.SnapshotInfo(
            vm=vm, size_bytes=size, sha256=digest.hexdigest(),
            format_version=last.format_version, head_seq=last.head_seq,
            include_memory=include_memory,
        )

    async def snapshot_vm(
        self,
        vm: str,
        *,
        include_memory: bool = True,
        chunk_bytes: int = 0,
    ) -> bytes:
        """One VM as snapshot bytes: memslots, options, tracking with its owners, plugin
        state, counters, the seq and (``include_memory``) guest memory.

        The chunks are checked against the sha256 the daemon sends last; a mismatch or a
        stream cut short raises PageTrackError (code DATA_LOSS). The client's ``timeout``
        bounds the whole transfer: make a client with a longer one (or None) for VMs
        with gigabytes of memory.
        """
        parts: list[bytes] = []
        await self._snapshot(vm, parts.append, include_memory, chunk_bytes)
        return b"".join(parts)

    async def snapshot_vm_to(
        self,
        vm: str,
        dest: SnapshotDest,
        *,
        include_memory: bool = True,
        chunk_bytes: int = 0,
    ) -> t.SnapshotInfo:
        """snapshot_vm, written to ``dest`` as it arrives.

        A path is written to a temporary file beside it, fsynced and renamed over it, so
        a failed snapshot leaves any earlier file in place; a binary file object gets
        the bytes in order (and may hold a partial snapshot if this raises).
        """
        if not isinstance(dest, str | os.PathLike):
            return await self._snapshot(vm, dest.write, include_memory, chunk_bytes)
        out = _AtomicFile(Path(dest))
        try:
            info = await self._snapshot(vm, out.write, include_memory, chunk_bytes)
            await asyncio.to_thread(out.commit)
        finally:
            out.discard()
        return info

    async def restore_vm(
        self,
        src: SnapshotSource,
        *,
        vm: str | None = None,
        replace: bool = False,
        chunk_bytes: int = RESTORE_CHUNK_BYTES,
    ) -> t.Vm:
        """Create a VM from a snapshot (bytes, a file path or a binary file), named ``vm``
        or as saved. The seq continues from the snapshot's.

        The snapshot is checked here first (magic bytes, length, its sha256), so a
        corrupt file is refused before anything is sent. An existing VM of that name
        raises AlreadyExists unless ``replace``. Lease-held tracking is not restored
        (leases belong to live clients); the tenant's and plugins' is.
        """
        data, label = await asyncio.to_thread(load_snapshot, src)
        await asyncio.to_thread(check_snapshot, data, label)
        return await self._restore(data, vm or "", replace, chunk_bytes)

    async def get_recording(self, vm: str) -> bytes:
        """The recording of a VM created with ``record=True`` (JSON lines), so far."""
        parts: list[bytes] = []
        try:
            call: Any = self._admin.GetRecording(
                pb.GetRecordingRequest(vm=vm), metadata=self._metadata, timeout=self.timeout
            )
            async for chunk in call:
                parts.append(chunk.data)
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err) from None
        return b"".join(parts)

    async def replay_vm(
        self, recording: bytes, vm: str, *, chunk_bytes: int = RESTORE_CHUNK_BYTES
    ) -> tuple[t.Vm, int]:
        """Replay a recording into a new VM named ``vm``; returns the VM and the number of
        operations replayed. The new VM ends as the recorded one did: memory, tracking,
        plugin state and event seqs."""
        if chunk_bytes < 1:
            raise errors.InvalidArgument(f"chunk_bytes {chunk_bytes} must be positive")
        view = memoryview(recording)

        async def requests() -> AsyncGenerator[pb.ReplayVmRequest, None]:
            yield pb.ReplayVmRequest(vm=vm, data=bytes(view[:chunk_bytes]))
            for off in range(chunk_bytes, len(view), chunk_bytes):
                yield pb.ReplayVmRequest(data=bytes(view[off : off + chunk_bytes]))

        try:
            reply = await self._admin.ReplayVm(
                requests(), metadata=self._metadata, timeout=self.timeout
            )
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err) from None
        return cv.vm(reply.vm), reply.records

    async def _restore(self, data: bytes, vm: str, replace: bool, chunk_bytes: int) -> t.Vm:
        if chunk_bytes < 1:
            raise errors.InvalidArgument(f"chunk_bytes {chunk_bytes} must be positive")
        view = memoryview(data)

        async def requests() -> AsyncGenerator[pb.RestoreVmRequest, None]:
            yield pb.RestoreVmRequest(vm=vm, replace=replace, data=bytes(view[:chunk_bytes]))
            for off in range(chunk_bytes, len(view), chunk_bytes):
                yield pb.RestoreVmRequest(data=bytes(view[off : off + chunk_bytes]))

        try:
            reply = await self._admin.RestoreVm(
                requests(), metadata=self._metadata, timeout=self.timeout
            )
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err) from None
        return cv.vm(reply.vm)


class _AtomicFile:
    """A file written under a temporary name beside ``path``, fsynced and renamed over
    it by commit(); discard() removes the temporary file if commit() did not happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self._file: BinaryIO | None = open(self.tmp, "wb")
        except OSError as exc:
            raise errors.InvalidArgument(f"{path}: {exc.strerror or exc}") from None

    def write(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            raise errors.InvalidArgument(f"{self.path}: {exc.strerror or exc}") from None

    def commit(self) -> None:
        assert self._file is not None
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise errors.InvalidArgument(f"{self.path}: {exc.strerror or exc}") from None

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


def _data_loss(message: str) -> errors.PageTrackError:
    return errors.PageTrackError(message, code="DATA_LOSS")


# --------------------------------------------------------------------------- watch stream

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


class _Stalled(Exception):
    """No message arrived within the stall timeout."""


class WatchStream:
    """An open Watch: an async iterator of WatchMessage that reconnects and resumes.

    ``last_seq`` is the newest seq delivered or reported in a Gap (the stream resumes
    after it); ``registered`` is the latest Registered record; ``reconnects`` counts
    reconnections. Use ``async with`` or call ``aclose()`` to end it early.
    """

    def __init__(
        self,
        client: AsyncClient,
        request: pb.WatchRequest,
        *,
        start_seq: int | None,
        allow_compacted: bool,
        resume: bool,
        backoff: Backoff,
        stall_timeout_s: float | None,
    ) -> None:
        self._client = client
        self._request = request
        self._allow_compacted = allow_compacted
        self._resume = resume
        self._backoff = backoff
        self._stall_timeout_s = stall_timeout_s
        self._next_seq: int | None = start_seq
        self._last_event_seq = 0
        self._last_finding_seq = 0  #: newest finding handed out (never twice)
        self._regions_seen: set[tuple[int, int, int, int]] = set()
        self._call: grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchResponse] | None = None
        self.vm = request.vm
        self.registered: t.Registered | None = None
        self.reconnects = 0
        self._closing = False
        self._gen = self._run()

    @property
    def last_seq(self) -> int | None:
        """Newest seq delivered or accounted for in a Gap; None before any."""
        return None if self._next_seq is None else self._next_seq - 1

    @property
    def notifier_id(self) -> int | None:
        """Notifier id of the current connection (for unwatch)."""
        return self.registered.notifier_id if self.registered else None

    @property
    def lease_id(self) -> str | None:
        """The current connection's stream lease (tracking bound to the stream)."""
        return self.registered.lease_id if self.registered else None

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> t.WatchMessage:
        return await self._gen.__anext__()

    async def __aenter__(self) -> WatchStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel the stream (the daemon unregisters it and ends its stream lease)."""
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        if not getattr(self._gen, "ag_running", False):
            await self._gen.aclose()

    async def unwatch(self) -> int:
        """Ask the daemon to end this stream; it then yields Closed(UNWATCHED) and stops."""
        if self.registered is None:
            raise errors.FailedPrecondition("the stream is not registered yet")
        return await self._client.unwatch(self.vm, self.registered.notifier_id)

    def _advance(self, seq: int) -> None:
        if self._next_seq is None or seq + 1 > self._next_seq:
            self._next_seq = seq + 1
            floor = self._next_seq - 1
            if self._regions_seen:
                self._regions_seen = {r for r in self._regions_seen if r[3] >= floor}

    def _convert(self, resp: pb.WatchResponse) -> t.WatchMessage | None:
        kind = resp.WhichOneof("kind")
        if kind == "events":
            batch = cv.event_batch(self.vm, resp.events)
            if len(batch) == 0:
                return None
            if batch.first_seq <= self._last_event_seq:
                # Never hand out an event twice (a replay overlapping what was seen).
                keep = batch.seq > np.uint64(self._last_event_seq)
                if not keep.any():
                    return None
                batch = _select(batch, keep)
            self._last_event_seq = batch.last_seq
            self._advance(batch.last_seq)
            return batch
        if kind == "progress":
            prog = cv.progress(resp.progress)
            if prog.sent_seq:
                self._advance(prog.sent_seq)
            return prog
        if kind == "gap":
            gap = cv.gap(resp.gap)
            if gap.reason is not t.GapReason.COALESCED:
                # Coalesced gaps name superseded events among ones still to come, so
                # they do not move the resume point; every other gap is behind us.
                self._advance(gap.last_seq)
            return gap
        if kind == "finding":
            found = cv.finding(resp.finding)
            if found.seq <= self._last_finding_seq:
                return None  # replayed from history after a reconnect
            self._last_finding_seq = found.seq
            self._advance(found.seq)
            return found
        if kind == "region_removed":
            rec = cv.region_removed(resp.region_removed)
            key = (rec.slot, rec.base_gfn, rec.npages, rec.at_seq)
            if key in self._regions_seen:
                return None  # replayed from history after a reconnect
            self._regions_seen.add(key)
            return rec
        if kind == "registered":
            reg = cv.registered(self.vm, resp.registered, self.reconnects)
            self.registered = reg
            if self._next_seq is None:
                self._next_seq = reg.start_seq
            return reg
        if kind == "closed":
            return cv.closed(resp.closed)
        return None  # a message kind newer than this client

    def _stall_limit(self) -> float | None:
        if self._stall_timeout_s is not None:
            return self._stall_timeout_s or None
        if self.registered is None:
            return 30.0
        return 3 * self.registered.heartbeat_interval_ms / 1000 + 2.0

    async def _read(
        self, call: grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchResponse]
    ) -> Any:
        limit = self._stall_limit()
        if limit is None:
            return await call.read()
        try:
            async with asyncio.timeout(limit):
                return await call.read()
        except TimeoutError:
            raise _Stalled(f"no message from the daemon for {limit:.1f} s") from None

    async def _run(self) -> AsyncGenerator[t.WatchMessage, None]:
        client = self._client
        failures = 0
        connected = False
        while True:
            request = pb.WatchRequest()
            request.CopyFrom(self._request)
            if self._next_seq is not None:
                request.start_seq = self._next_seq
                request.allow_compacted = self._allow_compacted
            call = client._watch.Watch(request, metadata=client._metadata)
            self._call = call
            code: grpc.StatusCode | None = None
            details = ""
            failure: grpc.RpcError | None = None
            this_registered = False
            try:
                while True:
                    try:
                        resp = await self._read(call)
                    except grpc.RpcError as err:
                        failure = err
                        code, details = err.code(), err.details() or ""
                        break
                    except _Stalled as exc:
                        code, details = grpc.StatusCode.UNAVAILABLE, str(exc)
                        break
                    if resp is grpc.aio.EOF:
                        code = grpc.StatusCode.UNAVAILABLE
                        details = "the daemon ended the stream without a Closed record"
                        break
                    msg = self._convert(resp)
                    if msg is None:
                        continue
                    if isinstance(msg, t.Registered):
                        connected = this_registered = True
                        failures = 0
                    yield msg
                    if isinstance(msg, t.Closed):
                        return
            finally:
                call.cancel()
                self._call = None
            if (
                code is grpc.StatusCode.OUT_OF_RANGE
                and self._allow_compacted
                and self._next_seq is not None
                and not this_registered
            ):
                # A daemon that refused allow_compacted: report the loss and go on.
                refusal = errors.from_rpc_error(failure) if failure is not None else None
                oldest = (
                    refusal.oldest_seq  # from the error's details, else its message
                    if isinstance(refusal, errors.OutOfRange)
                    else errors.OutOfRange(details).oldest_seq
                )
                if oldest is not None and oldest > self._next_seq:
                    lost = t.Gap(
                        self._next_seq, oldest - 1, oldest - self._next_seq,
                        t.GapReason.COMPACTED,
                    )
                    self._advance(oldest - 1)
                    yield lost
                    continue
            if not (self._resume and connected and code in _RETRYABLE):
                if self._closing:
                    return
                if failure is not None:
                    raise errors.from_rpc_error(failure) from None
                raise errors.Unavailable(details)
            failures += 1
            if self._backoff.max_attempts and failures > self._backoff.max_attempts:
                raise errors.Unavailable(
                    f"gave up reconnecting to {client.target} after {failures - 1} attempts:"
                    f" {details}"
                )
            await asyncio.sleep(self._backoff.delay(failures))
            if self._closing:
                return
            self.reconnects += 1


def _select(batch: t.EventBatch, keep: npt.NDArray[np.bool_]) -> t.EventBatch:
    offs = batch.offsets
    data = b"".join(
        batch.data[offs[i] : offs[i + 1]] for i in np.flatnonzero(keep).tolist()
    )
    return t.EventBatch(
        vm=batch.vm, seq=batch.seq[keep], gpa=batch.gpa[keep], length=batch.length[keep],
        vcpu=batch.vcpu[keep], flags=batch.flags[keep], timestamp_ns=batch.timestamp_ns[keep],
        data=data, head_seq=batch.head_seq,
    )


# --------------------------------------------------------------------------- sync facade


class _Closable(Protocol):
    async def close(self) -> None: ...


A = TypeVar("A", bound=_Closable)


class SyncFacade(Generic[A]):
    """Runs an async client on a private event-loop thread, for blocking callers.

    Subclasses list the async client's methods wrapped with ``_sync``/``_sync_watch``.
    """

    _async: A

    def __init__(self, make: Callable[[], A]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pagetrack-client", daemon=True
        )
        self._thread.start()
        self._closed = False

        async def build() -> A:
            return make()

        try:
            self._async = self._run(build())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        if self._closed:
            coro.close()
            raise errors.FailedPrecondition("the client is closed")
        future: Future[R] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        """Close the channel(s) and stop the loop thread."""
        if self._closed:
            return
        try:
            self._run(self._async.close())
        finally:
            self._closed = True
            self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _sync(
    fn: Callable[Concatenate[A, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncFacade[A], P], R]:
    """The same method on the sync facade, run on its event-loop thread."""

    @functools.wraps(fn)
    def method(self: SyncFacade[A], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(fn(self._async, *args, **kwargs))

    return method


def _sync_watch(
    fn: Callable[Concatenate[A, P], WatchStream],
) -> Callable[Concatenate[SyncFacade[A], P], SyncWatchStream]:
    """An async client's watch on the sync facade: the same arguments, a blocking
    iterator back."""

    @functools.wraps(fn)
    def watch(self: SyncFacade[A], /, *args: P.args, **kwargs: P.kwargs) -> SyncWatchStream:
        return SyncWatchStream(self, fn(self._async, *args, **kwargs))

    watch.__doc__ = (fn.__doc__ or "").replace("async for msg in", "for msg in")
    return watch


class Client(SyncFacade[AsyncClient]):
    """Blocking client for scripts and notebooks: AsyncClient's methods, run on a
    private event-loop thread. ``watch()`` returns a plain iterator. Use as ``with``,
    or call close().
    """

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(functools.partial(AsyncClient, target, **kwargs))
        self.target = self._async.target

    create_vm = _sync(AsyncClient.create_vm)
    get_vm = _sync(AsyncClient.get_vm)
    list_vms = _sync(AsyncClient.list_vms)
    delete_vm = _sync(AsyncClient.delete_vm)
    set_policy = _sync(AsyncClient.set_policy)
    set_memory_region = _sync(AsyncClient.set_memory_region)
    delete_memory_region = _sync(AsyncClient.delete_memory_region)
    list_memory_regions = _sync(AsyncClient.list_memory_regions)
    get_dirty_log = _sync(AsyncClient.get_dirty_log)
    write = _sync(AsyncClient.write)
    write_batch = _sync(AsyncClient.write_batch)
    read = _sync(AsyncClient.read)
    cmpxchg = _sync(AsyncClient.cmpxchg)
    dma_write = _sync(AsyncClient.dma_write)
    add_tracking = _sync(AsyncClient.add_tracking)
    remove_tracking = _sync(AsyncClient.remove_tracking)
    query_tracking = _sync(AsyncClient.query_tracking)
    create_lease = _sync(AsyncClient.create_lease)
    keep_alive_lease = _sync(AsyncClient.keep_alive_lease)
    revoke_lease = _sync(AsyncClient.revoke_lease)
    list_leases = _sync(AsyncClient.list_leases)
    unwatch = _sync(AsyncClient.unwatch)
    list_notifiers = _sync(AsyncClient.list_notifiers)
    attach_plugin = _sync(AsyncClient.attach_plugin)
    detach_plugin = _sync(AsyncClient.detach_plugin)
    list_plugins = _sync(AsyncClient.list_plugins)
    audit_plugin = _sync(AsyncClient.audit_plugin)
    set_shadow_root = _sync(AsyncClient.set_shadow_root)
    translate = _sync(AsyncClient.translate)
    build_ppgtt = _sync(AsyncClient.build_ppgtt)
    submit_vgpu = _sync(AsyncClient.submit_vgpu)
    destroy_ppgtt = _sync(AsyncClient.destroy_ppgtt)
    start_workload = _sync(AsyncClient.start_workload)
    stop_workload = _sync(AsyncClient.stop_workload)
    get_workload = _sync(AsyncClient.get_workload)
    list_workloads = _sync(AsyncClient.list_workloads)
    stats = _sync(AsyncClient.stats)
    server_info = _sync(AsyncClient.server_info)
    snapshot_vm = _sync(AsyncClient.snapshot_vm)
    snapshot_vm_to = _sync(AsyncClient.snapshot_vm_to)
    restore_vm = _sync(AsyncClient.restore_vm)
    get_recording = _sync(AsyncClient.get_recording)
    replay_vm = _sync(AsyncClient.replay_vm)

    watch = _sync_watch(AsyncClient.watch)


class SyncWatchStream:
    """A WatchStream driven from a blocking caller; iterate it, close it when done."""

    def __init__(self, client: SyncFacade[Any], stream: WatchStream) -> None:
        self._client = client
        self._stream = stream
        self._done = False

    @property
    def last_seq(self) -> int | None:
        """Newest seq delivered or accounted for in a Gap."""
        return self._stream.last_seq

    @property
    def registered(self) -> t.Registered | None:
        """The latest Registered record."""
        return self._stream.registered

    @property
    def reconnects(self) -> int:
        """Reconnections made so far."""
        return self._stream.reconnects

    def __iter__(self) -> Iterator[t.WatchMessage]:
        return self

    def __next__(self) -> t.WatchMessage:
        if self._done:
            raise StopIteration

        async def step() -> t.WatchMessage:
            return await self._stream.__anext__()

        try:
            return self._client._run(step())
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None

    def unwatch(self) -> int:
        """Ask the daemon to end the stream (it yields Closed, then stops)."""
        return self._client._run(self._stream.unwatch())

    def close(self) -> None:
        """Cancel the stream."""
        if not self._done and not self._client._closed:
            self._done = True
            self._client._run(self._stream.aclose())

    def __enter__(self) -> SyncWatchStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "Backoff",
    "Client",
    "GfnRanges",
    "Gfns",
    "SnapshotDest",
    "SnapshotSource",
    "SyncFacade",
    "SyncWatchStream",
    "WatchStream",
    "check_snapshot",
    "load_snapshot",
    "normalize_target",
]
