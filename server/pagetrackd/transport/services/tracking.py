"""TrackingService: add, remove and query write tracking."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.application import Engine
from pagetrackd.application import tracking as app
from pagetrackd.domain import TenantId
from pagetrackd.limits import ServerLimits
from pagetrackd.transport import convert as cv
from pagetrackd.transport.services._common import Ctx, tenant
from pagetrackd.transport.status import unary

_WRITE_MODE = {pb.TRACK_MODE_WRITE: 1}

#: add_tracking or remove_tracking of the application
_Change = Callable[
    [Engine, TenantId, str, "app.GfnSelection", str, int], Awaitable["app.TrackingChange"]
]


def _selection(request: Any) -> app.GfnSelection:
    return app.GfnSelection(
        cv.gfn_ranges(request.ranges), np.array(request.gfns, dtype=np.uint64)
    )


class TrackingService(pbg.TrackingServiceServicer):
    """Add, remove and query write tracking."""

    def __init__(self, engine: Engine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits

    @unary
    async def AddTracking(
        self, request: pb.TrackingChangeRequest, context: Ctx
    ) -> pb.TrackingChangeResponse:
        return await self._change(app.add_tracking, request)

    @unary
    async def RemoveTracking(
        self, request: pb.TrackingChangeRequest, context: Ctx
    ) -> pb.TrackingChangeResponse:
        return await self._change(app.remove_tracking, request)

    async def _change(
        self, use_case: _Change, request: pb.TrackingChangeRequest
    ) -> pb.TrackingChangeResponse:
        who = tenant()
        self.engine.vm(who, request.vm)  # an unknown VM or lease is refused first
        self.engine.lease_owner(who, request.lease_id)
        cv.enum_value(_WRITE_MODE, request.mode, "mode")
        done = await use_case(
            self.engine, who, request.vm, _selection(request), request.lease_id,
            self.limits.max_gfns_per_request,
        )
        return pb.TrackingChangeResponse(
            references=done.references, transitions=done.transitions,
            tracked_gfns=done.tracked_gfns,
        )

    @unary
    async def QueryTracking(
        self, request: pb.QueryTrackingRequest, context: Ctx
    ) -> pb.QueryTrackingResponse:
        who = tenant()
        self.engine.vm(who, request.vm)  # an unknown VM is refused first
        cv.enum_value(_WRITE_MODE, request.mode, "mode")
        reply = pb.QueryTrackingResponse()
        owners, vm_tenant = request.include_owners, str(who)
        async for part in app.query_tracking(
            self.engine, who, request.vm, _selection(request), request.only_tracked
        ):
            if part.fresh:
                reply = pb.QueryTrackingResponse()
            out = reply.gfns  # appended to part by part (one large copy would stall)
            for info, slot in part.items:
                out.append(cv.track_state_pb(info, slot, owners, vm_tenant))
        return reply
