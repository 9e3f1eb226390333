"""gRPC servicers: validate, convert, call the engine, convert back. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import grpc
import numpy as np

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd import __version__
from pagetrackd.application import Engine, VmEntry, WorkloadRun, slices
from pagetrackd.auth import current_caller
from pagetrackd.domain import (
    CostModel,
    InvalidArgument,
    PageTrackError,
    QuotaExceeded,
    SlotFlags,
    TenantId,
    Unavailable,
    Vm,
    VmLimits,
    WritePath,
    WritePiece,
)
from pagetrackd.domain.vm import gfns_from
from pagetrackd.leases import Lease, LeaseKind
from pagetrackd.limits import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_VCPUS,
    MAX_GFN_BITS,
    MAX_LEASE_TTL_MS,
    MAX_MEMSLOTS,
    MIN_CHUNK_BYTES,
    MIN_GFN_BITS,
    MIN_LEASE_TTL_MS,
    ServerLimits,
)
from pagetrackd.plugins import Plugin, ops
from pagetrackd.plugins.catalog import canonical_name
from pagetrackd.state import (
    FORMAT_VERSION,
    SnapshotError,
    prepare_vm,
    read_snapshot,
    restore_snapshot,
    snapshot_entry,
    snapshot_length,
)
from pagetrackd.transport import convert as cv
from pagetrackd.transport.status import streaming, unary

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
A = TypeVar("A")


def _tenant() -> TenantId:
    return current_caller.get().tenant


def _vm_pb(engine: Engine, entry: VmEntry) -> pb.Vm:
    vm = entry.vm
    running = sum(
        1 for r in engine.workloads.values() if r.entry is entry and r.state == "running"
    )
    return pb.Vm(
        name=vm.name,
        tenant=entry.tenant,
        options=pb.VmOptions(
            dma_policy=cv.DMA_POLICY_PB[vm.dma_policy],
            semantics=cv.SEMANTICS_PB[vm.semantics],
            cost=cv.cost_model_pb(vm.cost),
            record=entry.recorder is not None,
            limits=pb.VmLimits(
                max_memslots=vm.limits.max_slots,
                gfn_bits=vm.limits.gfn_bits,
                max_vcpus=vm.vcpus,
                history_events=entry.hub.history.max_events,
                history_bytes=entry.hub.history.max_bytes,
            ),
        ),
        created_at_ns=entry.created_at_ns,
        memslot_count=len(vm.slots),
        tracked_gfns=vm.tracked_count,
        resident_pages=sum(s.memory.pages for s in vm.slots.slots()),
        head_seq=vm.seq,
        oldest_seq=max(entry.hub.history.oldest_seq, 1),
        notifier_count=len(vm.notifiers) - 1,  # the history is not a user's notifier
        plugins=[cv.PLUGIN_KIND_PB[k] for k in entry.plugins if k in cv.PLUGIN_KIND_PB],
        running_workloads=running,
    )


def _require(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


class VmService(pbg.VmServiceServicer):
    """VM lifecycle and policies."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @unary
    async def CreateVm(self, request: pb.CreateVmRequest, context: Ctx) -> pb.CreateVmResponse:
        opts = request.options
        cv.enum_value(cv.DMA_POLICY, opts.dma_policy, "options.dma_policy")
        cv.enum_value(cv.SEMANTICS, opts.semantics, "options.semantics")
        lim = opts.limits
        base = VmLimits()
        max_slots = lim.max_memslots if lim.HasField("max_memslots") else base.max_slots
        gfn_bits = lim.gfn_bits if lim.HasField("gfn_bits") else base.gfn_bits
        if not 1 <= max_slots <= MAX_MEMSLOTS:
            raise InvalidArgument(
                f"options.limits.max_memslots {max_slots} must be 1..{MAX_MEMSLOTS}"
            )
        if not MIN_GFN_BITS <= gfn_bits <= MAX_GFN_BITS:
            raise InvalidArgument(
                f"options.limits.gfn_bits {gfn_bits} must be {MIN_GFN_BITS}..{MAX_GFN_BITS}"
            )
        entry = self.engine.create_vm(
            _tenant(),
            request.name,
            vcpus=lim.max_vcpus if lim.HasField("max_vcpus") else DEFAULT_VCPUS,
            dma_policy=cv.DMA_POLICY.get(opts.dma_policy, cv.DMA_POLICY[pb.DMA_POLICY_BYPASS]),
            semantics=cv.SEMANTICS.get(opts.semantics, cv.SEMANTICS[pb.SEMANTICS_2016]),
            cost=cv.cost_model(opts.cost, CostModel()),
            limits=VmLimits(max_slots=max_slots, gfn_bits=gfn_bits),
            history_events=lim.history_events if lim.HasField("history_events") else None,
            history_bytes=lim.history_bytes if lim.HasField("history_bytes") else None,
            record=opts.record,
        )
        return pb.CreateVmResponse(vm=_vm_pb(self.engine, entry))

    @unary
    async def GetVm(self, request: pb.GetVmRequest, context: Ctx) -> pb.GetVmResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        return pb.GetVmResponse(vm=_vm_pb(self.engine, entry))

    @unary
    async def ListVms(self, request: pb.ListVmsRequest, context: Ctx) -> pb.ListVmsResponse:
        caller = current_caller.get()
        if request.all_tenants:
            caller.require_admin("listing every tenant's VMs")
        size = request.page_size or 1000
        if size > 1000:
            raise InvalidArgument(f"page_size {size}: at most 1000")
        start = 0
        if request.page_token:
            try:
                start = int(request.page_token)
            except ValueError:
                raise InvalidArgument("page_token is not one this server gave out") from None
        page, total = self.engine.list_vms_page(
            None if request.all_tenants else caller.tenant, max(start, 0), size
        )
        if not 0 <= start <= total:
            raise InvalidArgument("page_token is out of date; list again from the start")
        token = str(start + size) if start + size < total else ""
        return pb.ListVmsResponse(
            vms=[_vm_pb(self.engine, e) for e in page], next_page_token=token
        )

    @unary
    async def DeleteVm(self, request: pb.DeleteVmRequest, context: Ctx) -> pb.DeleteVmResponse:
        last = self.engine.delete_vm(_tenant(), request.vm)
        return pb.DeleteVmResponse(last_seq=last)

    @unary
    async def SetVmPolicy(
        self, request: pb.SetVmPolicyRequest, context: Ctx
    ) -> pb.SetVmPolicyResponse:
        cv.enum_value(cv.DMA_POLICY, request.dma_policy, "dma_policy")
        cv.enum_value(cv.SEMANTICS, request.semantics, "semantics")
        entry = self.engine.vm(_tenant(), request.vm)
        cost = (
            cv.cost_model(request.cost, entry.vm.cost) if request.HasField("cost") else None
        )
        entry.vm.set_policy(
            dma_policy=cv.DMA_POLICY.get(request.dma_policy),
            semantics=cv.SEMANTICS.get(request.semantics),
            cost=cost,
        )
        return pb.SetVmPolicyResponse(vm=_vm_pb(self.engine, entry))


def _add_pieces(out: Any, pieces: Iterable[WritePiece]) -> None:
    add = out.add  # in place: a list of pb.WritePiece would be copied
    for p in pieces:
        add(gpa=p.gpa, length=p.length, path=cv.path_pb(p.path), seq=p.seq)


class MemoryService(pbg.MemoryServiceServicer):
    """Memslots, dirty logs and guest memory access."""

    def __init__(self, engine: Engine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits

    @unary
    async def SetMemoryRegion(
        self, request: pb.SetMemoryRegionRequest, context: Ctx
    ) -> pb.SetMemoryRegionResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        vm = entry.vm
        old = vm.slots.by_id.get(request.slot)
        if request.npages > vm.limits.gfn_limit:  # before the quota, which it would pass
            raise InvalidArgument(
                f"npages {request.npages} exceeds the {vm.limits.gfn_bits}-bit gfn space"
            )
        if request.npages and (old is None or old.info.npages != request.npages):
            self.engine.check_guest_pages(entry.tenant, request.npages)
        flags = SlotFlags.NONE
        if request.readonly:
            flags |= SlotFlags.READONLY
        if request.log_dirty_pages:
            flags |= SlotFlags.LOG_DIRTY_PAGES
        old_base = old.info.base_gfn if old is not None else 0
        # DELETE reports the slot as it was, so keep its description before it goes.
        old_region = cv.memslot_pb(old.info, old.tracking.counters.nonzero) if old else None
        change = vm.set_memslot(request.slot, request.base_gfn, request.npages, flags)
        new = vm.slots.by_id.get(request.slot)
        region = (
            cv.memslot_pb(new.info, new.tracking.counters.nonzero)
            if new is not None
            else old_region or pb.Memslot(slot=request.slot)
        )
        return pb.SetMemoryRegionResponse(
            change=cv.CHANGE_PB[change], region=region, old_base_gfn=old_base, at_seq=vm.seq
        )

    @unary
    async def ListMemoryRegions(
        self, request: pb.ListMemoryRegionsRequest, context: Ctx
    ) -> pb.ListMemoryRegionsResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        return pb.ListMemoryRegionsResponse(
            regions=[
                cv.memslot_pb(
                    s.info, s.tracking.counters.nonzero, len(s.dirty) if s.dirty else 0
                )
                for s in entry.vm.slots.slots()
            ]
        )

    @unary
    async def GetDirtyLog(
        self, request: pb.GetDirtyLogRequest, context: Ctx
    ) -> pb.GetDirtyLogResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        bitmap = entry.vm.get_dirty_log(request.slot)
        info = entry.vm.slots.by_id[request.slot].info
        count = int(np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8)).sum())
        return pb.GetDirtyLogResponse(
            slot=info.slot_id, base_gfn=info.base_gfn, npages=info.npages, bitmap=bitmap,
            dirty_count=count,
        )

    async def _guest_access(
        self, vm_name: str, access: Callable[[Vm], A], gpa: int, length: int
    ) -> tuple[A, int]:
        """One guest access to ``vm_name`` that may store ``length`` bytes at ``gpa``:
        checked against the guest memory quota, charged to the tenant's write rate
        (given back if refused), after block-policy streams have room. Returns its
        result and the simulated cycles it cost."""
        entry = self.engine.vm(_tenant(), vm_name)
        if 0 < length <= self.limits.max_write_bytes and 0 <= gpa < 1 << 63:
            self.engine.check_memory(entry, [gpa], [length])
        if entry.hub.subscribers:
            await self.engine.admit(entry)
        vm = entry.vm
        before = sum(vm.stats.cycles)
        result = access(vm)  # the VM's quota guard charges the write rate
        return result, sum(vm.stats.cycles) - before

    @unary
    async def WriteGuest(
        self, request: pb.WriteGuestRequest, context: Ctx
    ) -> pb.WriteGuestResponse:
        result, cycles = await self._guest_access(
            request.vm, lambda vm: vm.write(request.vcpu, request.gpa, request.data),
            request.gpa, len(request.data),
        )
        reply = pb.WriteGuestResponse(cycles=cycles)
        _add_pieces(reply.pieces, result.pieces)
        return reply

    @unary
    async def CompareExchangeGuest(
        self, request: pb.CompareExchangeGuestRequest, context: Ctx
    ) -> pb.CompareExchangeGuestResponse:
        result, cycles = await self._guest_access(
            request.vm,
            lambda vm: vm.cmpxchg(request.vcpu, request.gpa, request.expected, request.desired),
            request.gpa, len(request.desired),
        )
        reply = pb.CompareExchangeGuestResponse(
            exchanged=result.exchanged, current=result.current, as_write=result.as_write,
            cycles=cycles,
        )
        _add_pieces(reply.pieces, result.write.pieces)
        return reply

    @unary
    async def WriteGuestBatch(
        self, request: pb.WriteGuestBatchRequest, context: Ctx
    ) -> pb.WriteGuestBatchResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        n = len(request.gpa)
        if n > self.limits.max_batch_writes:
            raise InvalidArgument(
                f"{n} writes in one batch; at most {self.limits.max_batch_writes}"
            )
        if n == 0:
            raise InvalidArgument(
                "a batch needs at least one write: gpa, length and vcpu are empty"
            )
        if len(request.length) != n:
            raise InvalidArgument(f"length has {len(request.length)} entries; gpa has {n}")
        gpa, length = await slices.columns(request.gpa, request.length)
        top = int(gpa.max())
        if top >= entry.vm.limits.gfn_limit << 12:
            # Checked on the uint64 column: as int64 a gpa of 2^63 or more turns negative.
            raise InvalidArgument(
                f"gpa {top:#x} is outside the {entry.vm.limits.gfn_bits + 12}-bit guest"
                " physical address space"
            )
        if len(request.vcpu) == 1:
            vcpu = np.full(n, request.vcpu[0], dtype=np.int64)
        elif len(request.vcpu) == n:
            vcpu = np.array(request.vcpu, dtype=np.int64)
        else:
            raise InvalidArgument(
                f"vcpu has {len(request.vcpu)} entries; give one per write ({n}) or exactly one"
            )
        if int(length.min()) > 0 and int(length.max()) <= self.limits.max_write_bytes:
            await slices.check_memory(self.engine, entry, gpa.astype(np.int64), length)
        if entry.hub.subscribers:
            await self.engine.admit(entry)
        vm = entry.vm
        before = sum(vm.stats.cycles)
        # Written in slices when large (the VM's lock is held by the interceptor); the
        # VM's quota guard charges the write rate.
        result = await slices.write_batch(entry, gpa.astype(np.int64), vcpu, length, request.data)
        reply = pb.WriteGuestBatchResponse(writes=n, cycles=sum(vm.stats.cycles) - before)
        counts = result.counts
        pieces = reply.pieces
        pieces.mmio_exit = counts[WritePath.MMIO_EXIT]
        pieces.fast = counts[WritePath.FAST]
        pieces.emulated = counts[WritePath.EMULATED]
        if result.first_seq:  # optional fields: set only when the batch made events
            reply.first_seq = result.first_seq
            reply.last_seq = result.last_seq
        if request.want_pieces:
            reply.piece_path = (result.path + 1).astype(np.uint8).tobytes()
            reply.piece_write.extend(result.write_index.tolist())
        return reply

    @unary
    async def ReadGuest(self, request: pb.ReadGuestRequest, context: Ctx) -> pb.ReadGuestResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        vm = entry.vm
        gpa, end = request.gpa, request.gpa + request.length
        if not 1 <= request.length <= self.limits.max_write_bytes:
            raise InvalidArgument(
                f"length {request.length}: read 1..{self.limits.max_write_bytes} bytes at a time"
            )
        if end > vm.limits.gfn_limit << 12:
            raise InvalidArgument(
                f"gpa {gpa:#x}+{request.length} is outside the {vm.limits.gfn_bits + 12}-bit"
                " guest physical address space"
            )
        # Page by page: RAM from the VM, ranges outside every memslot (MMIO) as zeros,
        # listed in `mmio` as the contract says.
        out = bytearray()
        mmio: list[pb.GpaRange] = []
        while gpa < end:
            plen = min(4096 - (gpa & 4095), end - gpa)
            if vm.slots.find(gpa >> 12) is not None:
                out += vm.read(gpa, plen)
            else:
                out += bytes(plen)
                if mmio and mmio[-1].gpa + mmio[-1].length == gpa:
                    mmio[-1].length += plen
                else:
                    mmio.append(pb.GpaRange(gpa=gpa, length=plen))
            gpa += plen
        return pb.ReadGuestResponse(data=bytes(out), mmio=mmio)

    @unary
    async def DmaWrite(self, request: pb.DmaWriteRequest, context: Ctx) -> pb.DmaWriteResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        vm = entry.vm
        if 0 < len(request.data) <= self.limits.max_write_bytes and request.gpa < 1 << 62:
            self.engine.check_memory(entry, [request.gpa], [len(request.data)])
        before = vm.stats.dma_cycles
        result = vm.dma_write(request.gpa, request.data)
        bypass = vm.dma_policy.value == "bypass"
        pieces = []
        for p in result.pieces:
            if p.path is WritePath.EMULATED:
                path = pb.DMA_PATH_NOTIFIED
            elif bypass and vm.is_tracked(p.gpa >> 12):
                path = pb.DMA_PATH_BYPASSED
            else:
                path = pb.DMA_PATH_APPLIED
            pieces.append(pb.DmaPiece(gpa=p.gpa, length=p.length, path=path, seq=p.seq))
        return pb.DmaWriteResponse(pieces=pieces, cycles=vm.stats.dma_cycles - before)


def _check_gfn_space(vm: Any, request: Any) -> None:
    """Every gfn named by ``request.ranges`` and ``request.gfns`` is below 2^gfn_bits
    (checked before numpy sees them: past 2^63 they would wrap to negative int64)."""
    limit = vm.limits.gfn_limit
    for r in request.ranges:
        if r.start + r.count > limit:
            raise InvalidArgument(
                f"gfn range start={r.start:#x} count={r.count:#x} passes the VM's"
                f" {vm.limits.gfn_bits}-bit gfn space (last gfn {limit - 1:#x})",
                field="ranges",
            )
    if len(request.gfns) and int(np.array(request.gfns, dtype=np.uint64).max()) >= limit:
        top = int(np.array(request.gfns, dtype=np.uint64).max())
        raise InvalidArgument(
            f"gfn {top:#x} is outside the VM's {vm.limits.gfn_bits}-bit gfn space"
            f" (last gfn {limit - 1:#x})",
            field="gfns",
        )


class TrackingService(pbg.TrackingServiceServicer):
    """Add, remove and query write tracking."""

    def __init__(self, engine: Engine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits

    def _gfns(self, request: Any, vm: Any) -> Any:
        cv.enum_value({pb.TRACK_MODE_WRITE: 1}, request.mode, "mode")
        total = sum(r.count for r in request.ranges) + len(request.gfns)
        if total > self.limits.max_gfns_per_request:
            raise InvalidArgument(
                f"{total} gfns in one request; at most {self.limits.max_gfns_per_request}"
            )
        if total == 0:
            raise InvalidArgument("name at least one gfn (ranges or gfns)")
        _check_gfn_space(vm, request)
        return gfns_from(
            cv.gfn_ranges(request.ranges), np.array(request.gfns, dtype=np.uint64)
        )

    @unary
    async def AddTracking(
        self, request: pb.TrackingChangeRequest, context: Ctx
    ) -> pb.TrackingChangeResponse:
        tenant = _tenant()
        entry = self.engine.vm(tenant, request.vm)
        owner = self.engine.lease_owner(tenant, request.lease_id)
        gfns = self._gfns(request, entry.vm)
        started = await slices.change_tracking(
            self.engine, entry, gfns, owner, request.lease_id, add=True
        )
        return pb.TrackingChangeResponse(
            references=len(gfns), transitions=started, tracked_gfns=entry.vm.tracked_count
        )

    @unary
    async def RemoveTracking(
        self, request: pb.TrackingChangeRequest, context: Ctx
    ) -> pb.TrackingChangeResponse:
        tenant = _tenant()
        entry = self.engine.vm(tenant, request.vm)
        owner = self.engine.lease_owner(tenant, request.lease_id)
        gfns = self._gfns(request, entry.vm)
        stopped = await slices.change_tracking(
            self.engine, entry, gfns, owner, request.lease_id, add=False
        )
        return pb.TrackingChangeResponse(
            references=len(gfns), transitions=stopped, tracked_gfns=entry.vm.tracked_count
        )

    @unary
    async def QueryTracking(
        self, request: pb.QueryTrackingRequest, context: Ctx
    ) -> pb.QueryTrackingResponse:
        tenant = _tenant()
        entry = self.engine.vm(tenant, request.vm)
        vm = entry.vm
        cv.enum_value({pb.TRACK_MODE_WRITE: 1}, request.mode, "mode")
        only_tracked = request.only_tracked
        if not request.ranges and not request.gfns:
            if not only_tracked:
                raise InvalidArgument("name gfns or ranges, or set only_tracked to list all")
            gfns = vm.tracked_gfns()
            only_tracked = False  # tracked_gfns() lists only tracked ones
        else:
            total = sum(r.count for r in request.ranges) + len(request.gfns)
            if total > QUERY_MAX_GFNS:
                raise InvalidArgument(
                    f"{total} gfns in one query; at most {QUERY_MAX_GFNS} (query a range at"
                    " a time)"
                )
            _check_gfn_space(vm, request)
            gfns = gfns_from(
                cv.gfn_ranges(request.ranges), np.array(request.gfns, dtype=np.uint64)
            )
        if len(gfns) > QUERY_MAX_GFNS:
            raise InvalidArgument(
                f"{len(gfns)} gfns to report; at most {QUERY_MAX_GFNS} at once: query the"
                " tracked gfns a range at a time"
            )
        wanted = gfns.tolist()
        # Answered QUERY_CHUNK gfns per turn of the event loop, so a large query does not
        # stall other calls; if tracking or memslots change in between, it starts over,
        # so the answer is one consistent view.
        for _ in range(QUERY_ATTEMPTS):
            gen = vm.generation
            reply = pb.QueryTrackingResponse()
            out = reply.gfns  # appended to part by part (one large copy would stall)
            for k in range(0, len(wanted), QUERY_CHUNK):
                if k:
                    await asyncio.sleep(0)
                    if vm.closed or vm.generation != gen:
                        break
                part = wanted[k : k + QUERY_CHUNK]
                if only_tracked:
                    part = [g for g in part if vm.is_tracked(g)]
                for info in vm.track_query(part):
                    slot = vm.slots.find(info.gfn)
                    out.append(
                        cv.track_state_pb(
                            info, None if slot is None else slot.info.slot_id,
                            request.include_owners, str(entry.tenant),
                        )
                    )
            else:
                return reply
            entry = self.engine.vm(tenant, request.vm)  # NotFound once deleted
            vm = entry.vm
        raise Unavailable(
            f"tracking of VM {request.vm!r} kept changing while {len(wanted)} gfns were"
            " queried; retry, or query fewer gfns at once"
        )


#: the most gfns one QueryTracking reports: the answer (~35 bytes a gfn with owners) is
#: encoded on the event loop in some 20 ms, and stays well within grpc's default 4 MiB
QUERY_MAX_GFNS = 1 << 13
#: gfns QueryTracking answers per turn of the event loop (a few ms of work)
QUERY_CHUNK = 512
#: times a large query starts over when tracking changes under it
QUERY_ATTEMPTS = 3


def _lease_pb(engine: Engine, lease: Lease) -> pb.Lease:
    remaining = engine.leases.remaining_ms(lease)
    return pb.Lease(
        id=lease.lease_id,
        kind=pb.LEASE_KIND_TTL if lease.kind is LeaseKind.TTL else pb.LEASE_KIND_STREAM,
        ttl_ms=lease.ttl_ms,
        expires_at_ns=cv.now_ns() + remaining * 1_000_000 if lease.kind is LeaseKind.TTL else 0,
        references=engine.lease_references(lease),
        label=lease.label,
    )


class LeaseService(pbg.LeaseServiceServicer):
    """Leases for tracking that must not outlive its holder."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @unary
    async def CreateLease(
        self, request: pb.CreateLeaseRequest, context: Ctx
    ) -> pb.CreateLeaseResponse:
        self.engine.check_serving()
        self.engine.check_leases(_tenant())
        lease = self.engine.leases.create(_tenant(), request.ttl_ms, request.label)
        return pb.CreateLeaseResponse(lease=_lease_pb(self.engine, lease))

    @unary
    async def KeepAliveLease(
        self, request: pb.KeepAliveLeaseRequest, context: Ctx
    ) -> pb.KeepAliveLeaseResponse:
        lease = self.engine.leases.keep_alive(_tenant(), _require(request.lease_id, "lease_id"))
        return pb.KeepAliveLeaseResponse(lease=_lease_pb(self.engine, lease))

    @unary
    async def RevokeLease(
        self, request: pb.RevokeLeaseRequest, context: Ctx
    ) -> pb.RevokeLeaseResponse:
        tenant = _tenant()
        lease = self.engine.leases.get(tenant, _require(request.lease_id, "lease_id"))
        refs = self.engine.lease_references(lease)
        before = self.engine.usage(tenant)[1]
        self.engine.leases.end(lease)
        after = self.engine.usage(tenant)[1]
        return pb.RevokeLeaseResponse(released_references=refs, untracked_gfns=before - after)

    @unary
    async def ListLeases(
        self, request: pb.ListLeasesRequest, context: Ctx
    ) -> pb.ListLeasesResponse:
        return pb.ListLeasesResponse(
            leases=[_lease_pb(self.engine, le) for le in self.engine.leases.of_tenant(_tenant())]
        )


def _plugin_status_pb(kind: str, plugin: Plugin, vm_entry: VmEntry) -> pb.PluginStatus:
    counters: dict[str, int] = {}
    info: dict[str, str] = {}
    for key, value in plugin.status().items():
        if isinstance(value, bool):
            info[key] = str(value).lower()
        elif isinstance(value, int) and value >= 0:
            counters[key] = value
        else:
            info[key] = str(value)
    tracked = len(vm_entry.vm.tracked_gfns(f"plugin:{kind}"))
    return pb.PluginStatus(
        kind=cv.PLUGIN_KIND_PB.get(kind, pb.PLUGIN_KIND_UNSPECIFIED),
        tracked_gfns=tracked,
        counters=counters,
        info=info,
        name=cv.plugin_api_name(kind),
        failures=counters.get("hook_failures", 0),
        findings=counters.get("findings", 0),
    )


def _int_options(options: Any) -> dict[str, Any]:
    """Plugin and workload options arrive as strings; numbers become ints or floats."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        v: Any = value
        for conv in (lambda s: int(s, 0), float):
            try:
                v = conv(value)
                break
            except ValueError:
                continue
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidArgument(f"option {key}={value!r} is not a finite number")
        if value in ("true", "false"):
            v = value == "true"
        out[key] = v
    return out


class PluginService(pbg.PluginServiceServicer):
    """The in-process consumers: shadow MMU and vGPU."""

    def __init__(self, engine: Engine, limits: ServerLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or ServerLimits()

    def _kind(self, kind: pb.PluginKind.ValueType, name: str = "") -> str:
        """The plugin a request names, by kind or by name."""
        if name:
            by_name = canonical_name(name)
            if kind != pb.PLUGIN_KIND_UNSPECIFIED and cv.PLUGIN_KIND.get(kind) != by_name:
                raise InvalidArgument(
                    f"kind {kind} and name {name[:80]!r} name different plugins; give one",
                    field="name",
                )
            return by_name
        found = cv.PLUGIN_KIND.get(kind)
        if found is None:
            raise InvalidArgument(
                f"kind: unknown plugin kind {kind}; use SHADOW_MMU or VGPU, or give a name"
            )
        return found

    def _plugin(
        self, vm: str, kind: pb.PluginKind.ValueType, name: str = ""
    ) -> tuple[VmEntry, Plugin]:
        entry = self.engine.vm(_tenant(), vm)
        return entry, self.engine.plugin(entry, self._kind(kind, name))

    @unary
    async def AttachPlugin(
        self, request: pb.AttachPluginRequest, context: Ctx
    ) -> pb.AttachPluginResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        kind = self._kind(request.kind, request.name)
        plugin = self.engine.attach_plugin(entry, kind, _int_options(request.options))
        return pb.AttachPluginResponse(status=_plugin_status_pb(kind, plugin, entry))

    @unary
    async def DetachPlugin(
        self, request: pb.DetachPluginRequest, context: Ctx
    ) -> pb.DetachPluginResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        refs = self.engine.detach_plugin(entry, self._kind(request.kind, request.name))
        return pb.DetachPluginResponse(released_references=refs)

    @unary
    async def ListPlugins(
        self, request: pb.ListPluginsRequest, context: Ctx
    ) -> pb.ListPluginsResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        return pb.ListPluginsResponse(
            plugins=[_plugin_status_pb(k, p, entry) for k, p in entry.plugins.items()]
        )

    @unary
    async def AuditPlugin(
        self, request: pb.AuditPluginRequest, context: Ctx
    ) -> pb.AuditPluginResponse:
        cap = self.limits.max_audit_mismatches
        if request.max_mismatches > cap:
            raise InvalidArgument(f"max_mismatches {request.max_mismatches}: at most {cap}")
        _, plugin = self._plugin(request.vm, request.kind, request.name)
        report = plugin.audit()
        limit = request.max_mismatches or cap
        family = "ppgtt" if request.kind == pb.PLUGIN_KIND_VGPU else "shadow"
        return pb.AuditPluginResponse(
            checked_entries=report.checked,
            mismatch_count=len(report.mismatches),
            mismatches=[
                pb.AuditMismatch(
                    table=m.table or family,
                    table_gfn=m.table_gfn,
                    level=m.level,
                    index=m.index,
                    guest_entry=m.guest,
                    expected=m.expected if m.expected is not None else 0,
                    actual=m.shadow,
                    reason=m.reason,
                )
                for m in report.mismatches[:limit]
            ],
        )

    @unary
    async def SetShadowRoot(
        self, request: pb.SetShadowRootRequest, context: Ctx
    ) -> pb.SetShadowRootResponse:
        _, plugin = self._plugin(request.vm, pb.PLUGIN_KIND_SHADOW_MMU)
        out = ops.set_root(plugin, cr3=request.cr3, vcpu=request.vcpu)
        return pb.SetShadowRootResponse(root_gfn=out.root_gfn, shadow_pages=out.shadow_pages)

    @unary
    async def TranslateShadow(
        self, request: pb.TranslateShadowRequest, context: Ctx
    ) -> pb.TranslateShadowResponse:
        _, plugin = self._plugin(request.vm, pb.PLUGIN_KIND_SHADOW_MMU)
        out = ops.translate(plugin, gva=request.gva, write=request.write, vcpu=request.vcpu)
        return pb.TranslateShadowResponse(
            present=out.present, gpa=out.gpa, page_bytes=out.page_bytes,
            writable=out.writable, fault=out.fault,
            shadow_pages_created=out.shadow_pages_created,
        )

    @unary
    async def BuildPpgtt(
        self, request: pb.BuildPpgttRequest, context: Ctx
    ) -> pb.BuildPpgttResponse:
        if request.levels not in (0, 4):
            raise InvalidArgument(f"levels {request.levels}: only 4-level PPGTTs are modelled")
        if request.options:
            raise InvalidArgument(
                f"unknown BuildPpgtt options: {', '.join(sorted(request.options))}"
            )
        if request.root_gpa & 0xFFF:
            raise InvalidArgument(f"root_gpa {request.root_gpa:#x} is not page aligned")
        _, plugin = self._plugin(request.vm, pb.PLUGIN_KIND_VGPU)
        built = ops.build_ppgtt(plugin, root_gpa=request.root_gpa or None)
        status = plugin.status()
        return pb.BuildPpgttResponse(
            ppgtt_id=built.ppgtt,
            shadow_tables=built.tables,
            scratch_entries=int(status.get("pending", 0)),
            violations=int(status.get("violations", 0)),
        )

    @unary
    async def SubmitVgpu(
        self, request: pb.SubmitVgpuRequest, context: Ctx
    ) -> pb.SubmitVgpuResponse:
        if len(request.gpu_addrs) > 10000:
            raise InvalidArgument(f"{len(request.gpu_addrs)} gpu_addrs; at most 10000")
        _, plugin = self._plugin(request.vm, pb.PLUGIN_KIND_VGPU)
        done = ops.submit(plugin, ppgtt=request.ppgtt_id)
        reply = pb.SubmitVgpuResponse(flushed_entries=done.flushed)
        for va in request.gpu_addrs:
            t = ops.gpu_translate(plugin, va=va, ppgtt=request.ppgtt_id)
            reply.gpa.append(t.gpa(va))
            reply.scratch.append(t.scratch)
        return reply

    @unary
    async def DestroyPpgtt(
        self, request: pb.DestroyPpgttRequest, context: Ctx
    ) -> pb.DestroyPpgttResponse:
        entry, plugin = self._plugin(request.vm, pb.PLUGIN_KIND_VGPU)
        before = len(entry.vm.tracked_gfns("plugin:vgpu"))
        ops.destroy_ppgtt(plugin, ppgtt=request.ppgtt_id)
        after = len(entry.vm.tracked_gfns("plugin:vgpu"))
        return pb.DestroyPpgttResponse(released_references=before - after)


#: workloads that take StartWorkloadRequest.tracked_fraction (the others ignore it, as
#: the field's documentation says)
_TRACKED_FRACTION_KINDS = frozenset({"random-writes", "kernel-build"})


def _workload_pb(run: WorkloadRun) -> pb.WorkloadStatus:
    stats = run.entry.vm.stats
    pieces = [a - b for a, b in zip(stats.pieces, run.stats_before[0], strict=True)]
    cycles = [a - b for a, b in zip(stats.cycles, run.stats_before[1], strict=True)]
    cfg = pb.StartWorkloadRequest(
        vm=run.entry.name,
        kind=cv.WORKLOAD_KIND_PB.get(run.kind, pb.WORKLOAD_KIND_UNSPECIFIED),
        rate=run.rate,
        count=run.count,
        duration_ms=int(run.duration_s * 1000),
        seed=int(run.config.get("seed", 0)),
        options={k: str(v) for k, v in run.config.items() if k != "seed"},
    )
    return pb.WorkloadStatus(
        id=run.run_id,
        vm=run.entry.name,
        config=cfg,
        state=cv.WORKLOAD_STATE_PB[run.state],
        error=run.error,
        started_at_ns=run.started_ns,
        elapsed_ms=int(run.elapsed_s * 1000),
        writes=run.writes,
        achieved_rate=run.achieved_rate,
        writes_by_path=pb.WritePathCounts(
            mmio_exit=pieces[WritePath.MMIO_EXIT],
            fast=pieces[WritePath.FAST],
            emulated=pieces[WritePath.EMULATED],
        ),
        cycles=pb.CycleCounts(
            mmio_exit=cycles[WritePath.MMIO_EXIT],
            fast=cycles[WritePath.FAST],
            emulated=cycles[WritePath.EMULATED],
            total=sum(cycles),
        ),
    )


class WorkloadService(pbg.WorkloadServiceServicer):
    """Simulated vCPUs generating write streams."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @unary
    async def StartWorkload(
        self, request: pb.StartWorkloadRequest, context: Ctx
    ) -> pb.StartWorkloadResponse:
        entry = self.engine.vm(_tenant(), request.vm)
        kind = cv.WORKLOAD_KIND.get(request.kind)
        if kind is None:
            raise InvalidArgument(
                f"kind: unknown workload kind {request.kind}; use GPU_PPGTT, GUEST_PAGETABLES,"
                " RANDOM_WRITES or KERNEL_BUILD"
            )
        if not math.isfinite(request.rate) or not math.isfinite(request.tracked_fraction):
            raise InvalidArgument("rate and tracked_fraction must be finite numbers")
        if not 0 <= request.tracked_fraction <= 1:
            raise InvalidArgument(
                f"tracked_fraction {request.tracked_fraction} must be between 0 and 1"
            )
        if request.vcpus > entry.vm.vcpus:
            raise InvalidArgument(
                f"vcpus {request.vcpus}: the VM has {entry.vm.vcpus} (1..{entry.vm.vcpus};"
                " 0 = 1)"
            )
        if request.count > 1 << 63:
            raise InvalidArgument(f"count {request.count}: at most 2^63 writes (0 = no limit)")
        if request.duration_ms > 1 << 63:  # kept as float seconds; must read back as uint64
            raise InvalidArgument(
                f"duration_ms {request.duration_ms}: at most 2^63 ms (0 = no limit)"
            )
        options = _int_options(request.options)
        if request.vcpus:
            options["vcpus"] = request.vcpus
        if request.tracked_fraction and kind in _TRACKED_FRACTION_KINDS:
            options["tracked_fraction"] = request.tracked_fraction
        run = self.engine.start_workload(
            entry, kind, seed=request.seed, rate=request.rate, count=request.count,
            duration_s=request.duration_ms / 1000, options=options,
        )
        return pb.StartWorkloadResponse(workload=_workload_pb(run))

    @unary
    async def StopWorkload(
        self, request: pb.StopWorkloadRequest, context: Ctx
    ) -> pb.StopWorkloadResponse:
        run = await self.engine.stop_workload(_tenant(), _require(request.id, "id"))
        return pb.StopWorkloadResponse(workload=_workload_pb(run))

    @unary
    async def GetWorkload(
        self, request: pb.GetWorkloadRequest, context: Ctx
    ) -> pb.GetWorkloadResponse:
        run = self.engine.workload(_tenant(), _require(request.id, "id"))
        return pb.GetWorkloadResponse(workload=_workload_pb(run))

    @unary
    async def ListWorkloads(
        self, request: pb.ListWorkloadsRequest, context: Ctx
    ) -> pb.ListWorkloadsResponse:
        tenant = _tenant()
        if request.vm:
            self.engine.vm(tenant, request.vm)
        runs = [
            r for r in self.engine.workloads.values()
            if r.tenant == tenant and (not request.vm or r.entry.name == request.vm)
        ]
        return pb.ListWorkloadsResponse(workloads=[_workload_pb(r) for r in runs])


def vm_stats_pb(engine: Engine, entry: VmEntry) -> pb.VmStats:
    """Everything counted for one VM."""
    vm = entry.vm
    s = vm.stats
    subs = entry.hub.subscribers.values()
    cycles_total = sum(s.cycles) + s.dma_cycles
    return pb.VmStats(
        vm=vm.name,
        guest_writes=s.writes,
        writes=pb.WritePathCounts(
            mmio_exit=s.pieces[WritePath.MMIO_EXIT],
            fast=s.pieces[WritePath.FAST],
            emulated=s.pieces[WritePath.EMULATED],
        ),
        bytes_written=s.bytes_written,
        mmio_exits=s.mmio_exits,
        emulations=s.emulations,
        dma=pb.DmaCounts(
            applied=s.dma_applied, bypassed=s.dma_bypassed,
            notified=s.dma_notified, rejected=s.dma_rejected,
        ),
        notifications=s.notifications,
        notifier_errors=s.notifier_errors,
        events_dropped=sum(x.counters.dropped for x in subs),
        events_coalesced=sum(x.counters.coalesced for x in subs),
        tracked_gfns=vm.tracked_count,
        write_protected_gfns=vm.tracked_count,
        memory_bytes=vm.memory_footprint,
        track_pool_bytes=vm.tracking_footprint,
        cycles=pb.CycleCounts(
            mmio_exit=s.cycles[WritePath.MMIO_EXIT],
            fast=s.cycles[WritePath.FAST],
            emulated=s.cycles[WritePath.EMULATED],
            dma=s.dma_cycles,
            total=cycles_total,
        ),
        simulated_seconds=cycles_total / vm.cost.host_hz,
        vcpus=[
            pb.VcpuStats(vcpu=v, cycles=pb.CycleCounts(total=c))
            for v, c in sorted(s.vcpu_cycles.items())
        ],
        head_seq=vm.seq,
        oldest_seq=max(entry.hub.history.oldest_seq, 1),
        notifiers=len(vm.notifiers) - 1,
        uptime_ms=(cv.now_ns() - entry.created_at_ns) // 1_000_000,
    )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _process_info(engine: Engine) -> pb.ProcessInfo:
    entries = engine.list_vms(None)
    return pb.ProcessInfo(
        rss_bytes=_rss_bytes(),
        tasks=len(asyncio.all_tasks()),
        notifiers=sum(len(e.vm.notifiers) for e in entries),
        watchers=sum(len(e.hub.subscribers) for e in entries),
        leases=len(engine.leases),
        vms=len(entries),
    )


class AdminService(pbg.AdminServiceServicer):
    """Server information and statistics."""

    def __init__(self, engine: Engine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits

    @unary
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Ctx
    ) -> pb.GetServerInfoResponse:
        caller = current_caller.get()
        lim = self.limits
        q = self.engine.quotas(caller.tenant)
        return pb.GetServerInfoResponse(
            version=__version__,
            tenant=caller.tenant,
            role=caller.role,
            limits=pb.ServerLimits(
                max_message_bytes=lim.max_message_bytes,
                max_write_bytes=lim.max_write_bytes,
                max_batch_writes=lim.max_batch_writes,
                max_batch_bytes=lim.max_message_bytes,
                max_gfns_per_request=lim.max_gfns_per_request,
                max_filter_ranges=lim.max_filter_ranges,
                max_watch_batch_events=lim.max_watch_batch_events,
                default_watch_batch_events=lim.default_watch_batch_events,
                max_watch_batch_bytes=lim.max_watch_batch_bytes,
                default_watch_batch_bytes=lim.default_watch_batch_bytes,
                max_watch_batch_delay_ms=lim.max_watch_batch_delay_ms,
                default_watch_batch_delay_ms=lim.default_watch_batch_delay_ms,
                max_queue_limit=lim.max_queue_limit,
                default_queue_limit=lim.default_queue_limit,
                max_block_timeout_ms=lim.max_block_timeout_ms,
                default_block_timeout_ms=lim.default_block_timeout_ms,
                min_heartbeat_interval_ms=lim.min_heartbeat_interval_ms,
                max_heartbeat_interval_ms=lim.max_heartbeat_interval_ms,
                default_heartbeat_interval_ms=lim.default_heartbeat_interval_ms,
                min_lease_ttl_ms=MIN_LEASE_TTL_MS,
                max_lease_ttl_ms=MAX_LEASE_TTL_MS,
                max_audit_mismatches=lim.max_audit_mismatches,
                max_queue_bytes=lim.max_queue_bytes,
                default_queue_bytes=lim.default_queue_bytes,
            ),
            quotas=pb.TenantQuotas(**dataclasses.asdict(q)),
            started_at_ns=self.engine.started_ns,
            incarnation=self.engine.incarnation,
            problems=[
                text for owner, text in self.engine.problems.values()
                if owner is None or owner == caller.tenant or caller.role == "admin"
            ],
            default_vm_options=pb.VmOptions(
                dma_policy=pb.DMA_POLICY_BYPASS,
                semantics=pb.SEMANTICS_2016,
                cost=cv.cost_model_pb(CostModel()),
                limits=pb.VmLimits(
                    max_memslots=VmLimits().max_slots, gfn_bits=VmLimits().gfn_bits,
                    max_vcpus=DEFAULT_VCPUS, history_events=self.engine.config.history_events,
                    history_bytes=self.engine.config.history_bytes,
                ),
            ),
            process=_process_info(self.engine) if caller.admin else None,
        )

    @unary
    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.GetStatsResponse:
        tenant = _tenant()
        if request.vm:
            entries = [self.engine.vm(tenant, request.vm)]
        else:
            entries = self.engine.list_vms(tenant)
        return pb.GetStatsResponse(vms=[vm_stats_pb(self.engine, e) for e in entries])

    @streaming
    async def SnapshotVm(
        self, request: pb.SnapshotVmRequest, context: Ctx
    ) -> AsyncIterator[pb.SnapshotChunk]:
        entry = self.engine.vm(_tenant(), _require(request.vm, "vm"))
        most = self.limits.max_message_bytes
        chunk = request.chunk_bytes or min(DEFAULT_CHUNK_BYTES, most)
        if not MIN_CHUNK_BYTES <= chunk <= most:
            raise InvalidArgument(
                f"chunk_bytes {chunk} must be {MIN_CHUNK_BYTES}..{most} (0 = 1 MiB)"
            )
        chunk = min(chunk, most - 1024)  # room for the other fields of the message
        head = entry.vm.seq
        data = snapshot_entry(entry, include_memory=request.include_memory, engine=self.engine)
        digest = hashlib.sha256(data).digest()
        for off in range(0, len(data), chunk):
            last = off + chunk >= len(data)
            yield pb.SnapshotChunk(
                data=data[off : off + chunk], offset=off, last=last,
                total_bytes=len(data) if last else 0, sha256=digest if last else b"",
                format_version=FORMAT_VERSION, head_seq=head,
            )

    @unary
    async def RestoreVm(
        self, request_iterator: AsyncIterator[pb.RestoreVmRequest], context: Ctx
    ) -> pb.RestoreVmResponse:
        tenant = _tenant()
        limit = self.engine.quotas(tenant).upload_bytes
        name, replace, first = "", False, True
        data = bytearray()
        declared: int | None = None
        async for req in request_iterator:
            if first:
                name, replace, first = req.vm, req.replace, False
            data += req.data
            if declared is None:
                # The header is checked on the first bytes: a stream that is not a
                # snapshot, or declares more than the quota, is refused at once.
                declared = snapshot_length(bytes(data[:1 << 20]))
                if declared is not None and declared > limit:
                    raise QuotaExceeded(
                        f"the snapshot declares {declared} bytes; the tenant's upload_bytes"
                        f" quota is {limit}",
                        quota="upload_bytes", limit=limit,
                    )
            if len(data) > (declared or limit):
                raise SnapshotError(
                    f"snapshot upload passed the {declared or limit} bytes its header declares"
                    if declared is not None and declared <= limit
                    else f"snapshot upload passed the tenant's upload_bytes quota of {limit}"
                )
        if first:
            raise InvalidArgument("RestoreVm needs at least one message with snapshot data")
        # Decoding and loading run in worker threads (they touch nothing shared): the
        # event loop keeps serving other calls meanwhile.
        raw = bytes(data)
        del data
        snap = await asyncio.to_thread(read_snapshot, raw)
        name = name or snap.state.name
        existing = None
        with contextlib.suppress(PageTrackError):
            existing = self.engine.vm(tenant, name)
        self.engine.check_restore_size(tenant, snap.state, existing)
        prepared = await asyncio.to_thread(prepare_vm, snap, name)
        with self.engine.unjournaled():
            entry = restore_snapshot(
                self.engine, tenant, snap, name=name, replace=replace, prepared=prepared
            )
        self.engine.journal_restored(entry, raw)
        return pb.RestoreVmResponse(vm=_vm_pb(self.engine, entry))

    @streaming
    async def GetRecording(
        self, request: pb.GetRecordingRequest, context: Ctx
    ) -> AsyncIterator[pb.RecordingChunk]:
        entry = self.engine.vm(_tenant(), request.vm)
        path = self.engine.recording(entry)
        total = 0
        for data, last in _file_chunks(path):
            total += len(data)
            yield pb.RecordingChunk(data=data, last=last, total_bytes=total if last else 0)

    @unary
    async def ReplayVm(
        self, request_iterator: AsyncIterator[pb.ReplayVmRequest], context: Ctx
    ) -> pb.ReplayVmResponse:
        tenant = _tenant()
        limit = self.engine.quotas(tenant).upload_bytes
        name, total = "", 0
        with tempfile.TemporaryDirectory(prefix="pagetrack-replay-") as tmp:
            path = Path(tmp) / "recording.jsonl"
            with _Spool(path) as out:
                async for req in request_iterator:
                    if not name:
                        name = req.vm
                    total += len(req.data)
                    if total > limit:
                        raise QuotaExceeded(
                            f"recording upload passed the tenant's upload_bytes quota of"
                            f" {limit}",
                            quota="upload_bytes", limit=limit,
                        )
                    out.write(req.data)
            if not name:
                raise InvalidArgument("ReplayVm's first message must name the new VM (vm)")
            if not total:
                raise InvalidArgument("ReplayVm got no recording data")
            entry, records = await self.engine.replay_vm(tenant, name, path)
        return pb.ReplayVmResponse(vm=_vm_pb(self.engine, entry), records=records)


def _file_chunks(path: Path, size: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[bytes, bool]]:
    """A file's bytes in chunks, each with whether it is the last (an empty file gives
    one empty last chunk)."""
    with open(path, "rb") as f:
        data = f.read(size)
        while True:
            following = f.read(size)
            yield data, not following
            if not following:
                return
            data = following


class _Spool:
    """A binary file written from an async handler (small blocking writes)."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")  # noqa: SIM115 -- closed by __exit__

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def write(self, data: bytes) -> None:
        self._f.write(data)


__all__ = [
    "AdminService",
    "LeaseService",
    "MemoryService",
    "PluginService",
    "TrackingService",
    "VmService",
    "WorkloadService",
]
