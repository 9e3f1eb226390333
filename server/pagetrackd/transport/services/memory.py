"""MemoryService: memslots, dirty logs and guest memory access."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.application import Engine, slices
from pagetrackd.application import access as app
from pagetrackd.domain import InvalidArgument, WritePath, WritePiece
from pagetrackd.limits import ServerLimits
from pagetrackd.transport import convert as cv
from pagetrackd.transport.services._common import Ctx, tenant
from pagetrackd.transport.status import unary
from pagetrackd.transport.views_pb import memslot_view_pb

_DMA_PATH_PB = {
    "notified": pb.DMA_PATH_NOTIFIED,
    "bypassed": pb.DMA_PATH_BYPASSED,
    "applied": pb.DMA_PATH_APPLIED,
}


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
        done = app.set_memory_region(
            self.engine, tenant(), request.vm, request.slot, request.base_gfn, request.npages,
            readonly=request.readonly, log_dirty_pages=request.log_dirty_pages,
        )
        region = (
            memslot_view_pb(done.region) if done.region else pb.Memslot(slot=request.slot)
        )
        return pb.SetMemoryRegionResponse(
            change=cv.CHANGE_PB[done.change], region=region, old_base_gfn=done.old_base_gfn,
            at_seq=done.at_seq,
        )

    @unary
    async def ListMemoryRegions(
        self, request: pb.ListMemoryRegionsRequest, context: Ctx
    ) -> pb.ListMemoryRegionsResponse:
        regions = app.memory_regions(self.engine, tenant(), request.vm)
        return pb.ListMemoryRegionsResponse(regions=[memslot_view_pb(r) for r in regions])

    @unary
    async def GetDirtyLog(
        self, request: pb.GetDirtyLogRequest, context: Ctx
    ) -> pb.GetDirtyLogResponse:
        log = app.dirty_log(self.engine, tenant(), request.vm, request.slot)
        return pb.GetDirtyLogResponse(
            slot=log.info.slot_id, base_gfn=log.info.base_gfn, npages=log.info.npages,
            bitmap=log.bitmap, dirty_count=log.dirty_count,
        )

    @unary
    async def WriteGuest(
        self, request: pb.WriteGuestRequest, context: Ctx
    ) -> pb.WriteGuestResponse:
        result, cycles = await app.guest_access(
            self.engine, tenant(), request.vm,
            lambda vm: vm.write(request.vcpu, request.gpa, request.data),
            request.gpa, len(request.data), self.limits.max_write_bytes,
        )
        reply = pb.WriteGuestResponse(cycles=cycles)
        _add_pieces(reply.pieces, result.pieces)
        return reply

    @unary
    async def CompareExchangeGuest(
        self, request: pb.CompareExchangeGuestRequest, context: Ctx
    ) -> pb.CompareExchangeGuestResponse:
        result, cycles = await app.guest_access(
            self.engine, tenant(), request.vm,
            lambda vm: vm.cmpxchg(request.vcpu, request.gpa, request.expected, request.desired),
            request.gpa, len(request.desired), self.limits.max_write_bytes,
        )
        reply = pb.CompareExchangeGuestResponse(
            exchanged=result.exchanged, current=result.current, as_write=result.as_write,
            cycles=cycles,
        )
        _add_pieces(reply.pieces, result.write.pieces)
        return reply

    async def _batch_columns(self, request: pb.WriteGuestBatchRequest) -> tuple[Any, Any]:
        """The batch's gpa (uint64) and length columns, their shapes checked (a large
        batch's converted in a worker thread)."""
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
        return await slices.columns(request.gpa, request.length)

    @unary
    async def WriteGuestBatch(
        self, request: pb.WriteGuestBatchRequest, context: Ctx
    ) -> pb.WriteGuestBatchResponse:
        who = tenant()
        self.engine.vm(who, request.vm)  # an unknown VM is refused first
        gpa, length = await self._batch_columns(request)
        result, cycles = await app.write_batch(
            self.engine, who, request.vm, gpa, request.vcpu, length, request.data,
            self.limits.max_write_bytes,
        )
        reply = pb.WriteGuestBatchResponse(writes=len(gpa), cycles=cycles)
        pieces = reply.pieces
        pieces.mmio_exit = result.counts[WritePath.MMIO_EXIT]
        pieces.fast = result.counts[WritePath.FAST]
        pieces.emulated = result.counts[WritePath.EMULATED]
        if result.first_seq:  # optional fields: set only when the batch made events
            reply.first_seq = result.first_seq
            reply.last_seq = result.last_seq
        if request.want_pieces:
            reply.piece_path = (result.path + 1).astype(np.uint8).tobytes()
            reply.piece_write.extend(result.write_index.tolist())
        return reply

    @unary
    async def ReadGuest(self, request: pb.ReadGuestRequest, context: Ctx) -> pb.ReadGuestResponse:
        read = app.read_guest(
            self.engine, tenant(), request.vm, request.gpa, request.length,
            self.limits.max_write_bytes,
        )
        return pb.ReadGuestResponse(
            data=read.data, mmio=[pb.GpaRange(gpa=a, length=n) for a, n in read.mmio]
        )

    @unary
    async def DmaWrite(self, request: pb.DmaWriteRequest, context: Ctx) -> pb.DmaWriteResponse:
        pieces, cycles = app.dma_write(
            self.engine, tenant(), request.vm, request.gpa, request.data,
            self.limits.max_write_bytes,
        )
        return pb.DmaWriteResponse(
            pieces=[
                pb.DmaPiece(gpa=p.gpa, length=p.length, path=_DMA_PATH_PB[p.outcome], seq=p.seq)
                for p in pieces
            ],
            cycles=cycles,
        )
