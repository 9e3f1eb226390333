"""WorkloadService: simulated vCPUs generating write streams."""

from __future__ import annotations

import math

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.application import Engine
from pagetrackd.application.views import workload_view
from pagetrackd.domain import InvalidArgument
from pagetrackd.transport import convert as cv
from pagetrackd.transport.services._common import Ctx, int_options, require, tenant
from pagetrackd.transport.status import unary
from pagetrackd.transport.views_pb import workload_pb


class WorkloadService(pbg.WorkloadServiceServicer):
    """Simulated vCPUs generating write streams."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @unary
    async def StartWorkload(
        self, request: pb.StartWorkloadRequest, context: Ctx
    ) -> pb.StartWorkloadResponse:
        who = tenant()
        self.engine.vm(who, request.vm)  # an unknown VM is refused first
        kind = cv.WORKLOAD_KIND.get(request.kind)
        if kind is None:
            raise InvalidArgument(
                f"kind: unknown workload kind {request.kind}; use GPU_PPGTT, GUEST_PAGETABLES,"
                " RANDOM_WRITES or KERNEL_BUILD"
            )
        if not math.isfinite(request.rate) or not math.isfinite(request.tracked_fraction):
            raise InvalidArgument("rate and tracked_fraction must be finite numbers")
        if request.count > 1 << 63:
            raise InvalidArgument(f"count {request.count}: at most 2^63 writes (0 = no limit)")
        if request.duration_ms > 1 << 63:  # kept as float seconds; must read back as uint64
            raise InvalidArgument(
                f"duration_ms {request.duration_ms}: at most 2^63 ms (0 = no limit)"
            )
        run = self.engine.start_on(
            who, request.vm, kind, seed=request.seed, rate=request.rate, count=request.count,
            duration_s=request.duration_ms / 1000, vcpus=request.vcpus,
            tracked_fraction=request.tracked_fraction, options=int_options(request.options),
        )
        return pb.StartWorkloadResponse(workload=workload_pb(workload_view(run)))

    @unary
    async def StopWorkload(
        self, request: pb.StopWorkloadRequest, context: Ctx
    ) -> pb.StopWorkloadResponse:
        run = await self.engine.stop_workload(tenant(), require(request.id, "id"))
        return pb.StopWorkloadResponse(workload=workload_pb(workload_view(run)))

    @unary
    async def GetWorkload(
        self, request: pb.GetWorkloadRequest, context: Ctx
    ) -> pb.GetWorkloadResponse:
        run = self.engine.workload(tenant(), require(request.id, "id"))
        return pb.GetWorkloadResponse(workload=workload_pb(workload_view(run)))

    @unary
    async def ListWorkloads(
        self, request: pb.ListWorkloadsRequest, context: Ctx
    ) -> pb.ListWorkloadsResponse:
        runs = self.engine.list_workloads(tenant(), request.vm)
        return pb.ListWorkloadsResponse(workloads=[workload_pb(workload_view(r)) for r in runs])
