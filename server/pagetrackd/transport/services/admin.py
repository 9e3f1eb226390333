"""AdminService: server information, statistics, snapshots, recordings and replays."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd import __version__
from pagetrackd.application import Engine
from pagetrackd.application import admin as app
from pagetrackd.application.views import vm_stats, vm_view
from pagetrackd.auth import current_caller
from pagetrackd.domain import CostModel, InvalidArgument, VmLimits
from pagetrackd.limits import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_VCPUS,
    MAX_LEASE_TTL_MS,
    MIN_CHUNK_BYTES,
    MIN_LEASE_TTL_MS,
    ServerLimits,
)
from pagetrackd.transport import convert as cv
from pagetrackd.transport.services._common import Ctx, require, tenant
from pagetrackd.transport.status import streaming, unary
from pagetrackd.transport.views_pb import process_pb, vm_pb, vm_stats_pb


def _limits_pb(lim: ServerLimits) -> pb.ServerLimits:
    return pb.ServerLimits(
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
    )


class AdminService(pbg.AdminServiceServicer):
    """Server information and statistics."""

    def __init__(self, engine: Engine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits

    def _default_vm_options(self) -> pb.VmOptions:
        return pb.VmOptions(
            dma_policy=pb.DMA_POLICY_BYPASS,
            semantics=pb.SEMANTICS_2016,
            cost=cv.cost_model_pb(CostModel()),
            limits=pb.VmLimits(
                max_memslots=VmLimits().max_slots, gfn_bits=VmLimits().gfn_bits,
                max_vcpus=DEFAULT_VCPUS, history_events=self.engine.config.history_events,
                history_bytes=self.engine.config.history_bytes,
            ),
        )

    @unary
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Ctx
    ) -> pb.GetServerInfoResponse:
        caller = current_caller.get()
        q = self.engine.quotas(caller.tenant)
        return pb.GetServerInfoResponse(
            version=__version__,
            tenant=caller.tenant,
            role=caller.role,
            limits=_limits_pb(self.limits),
            quotas=pb.TenantQuotas(**dataclasses.asdict(q)),
            started_at_ns=self.engine.started_ns,
            incarnation=self.engine.incarnation,
            problems=app.problems(self.engine, caller.tenant, caller.role == "admin"),
            default_vm_options=self._default_vm_options(),
            process=process_pb(app.process_view(self.engine)) if caller.admin else None,
        )

    @unary
    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.GetStatsResponse:
        who = tenant()
        if request.vm:
            entries = [self.engine.vm(who, request.vm)]
        else:
            entries = self.engine.list_vms(who)
        now = cv.now_ns()
        return pb.GetStatsResponse(vms=[vm_stats_pb(vm_stats(e), now) for e in entries])

    @streaming
    async def SnapshotVm(
        self, request: pb.SnapshotVmRequest, context: Ctx
    ) -> AsyncIterator[pb.SnapshotChunk]:
        who, name = tenant(), require(request.vm, "vm")
        self.engine.vm(who, name)  # an unknown VM is refused first
        most = self.limits.max_message_bytes
        chunk = request.chunk_bytes or min(DEFAULT_CHUNK_BYTES, most)
        if not MIN_CHUNK_BYTES <= chunk <= most:
            raise InvalidArgument(
                f"chunk_bytes {chunk} must be {MIN_CHUNK_BYTES}..{most} (0 = 1 MiB)"
            )
        chunk = min(chunk, most - 1024)  # room for the other fields of the message
        snap = app.snapshot_vm(self.engine, who, name, request.include_memory)
        data = snap.data
        for off in range(0, len(data), chunk):
            last = off + chunk >= len(data)
            yield pb.SnapshotChunk(
                data=data[off : off + chunk], offset=off, last=last,
                total_bytes=len(data) if last else 0, sha256=snap.sha256 if last else b"",
                format_version=snap.format_version, head_seq=snap.head_seq,
            )

    @unary
    async def RestoreVm(
        self, request_iterator: AsyncIterator[pb.RestoreVmRequest], context: Ctx
    ) -> pb.RestoreVmResponse:
        upload = app.SnapshotUpload(self.engine, tenant())
        name, replace, first = "", False, True
        async for req in request_iterator:
            if first:
                name, replace, first = req.vm, req.replace, False
            upload.add(req.data)
        if first:
            raise InvalidArgument("RestoreVm needs at least one message with snapshot data")
        entry = await upload.restore(name, replace)
        return pb.RestoreVmResponse(vm=vm_pb(vm_view(self.engine, entry)))

    @streaming
    async def GetRecording(
        self, request: pb.GetRecordingRequest, context: Ctx
    ) -> AsyncIterator[pb.RecordingChunk]:
        total = 0
        for data, last in app.recording_chunks(self.engine, tenant(), request.vm):
            total += len(data)
            yield pb.RecordingChunk(data=data, last=last, total_bytes=total if last else 0)

    @unary
    async def ReplayVm(
        self, request_iterator: AsyncIterator[pb.ReplayVmRequest], context: Ctx
    ) -> pb.ReplayVmResponse:
        name = ""
        with app.RecordingUpload(self.engine, tenant()) as upload:
            async for req in request_iterator:
                if not name:
                    name = req.vm
                upload.add(req.data)
            entry, records = await upload.replay(name)
        return pb.ReplayVmResponse(vm=vm_pb(vm_view(self.engine, entry)), records=records)
