"""LeaseService: leases for tracking that must not outlive its holder."""

from __future__ import annotations

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.application import Engine
from pagetrackd.application.views import lease_view
from pagetrackd.transport.services._common import Ctx, require, tenant
from pagetrackd.transport.status import unary
from pagetrackd.transport.views_pb import lease_pb


class LeaseService(pbg.LeaseServiceServicer):
    """Leases for tracking that must not outlive its holder."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @unary
    async def CreateLease(
        self, request: pb.CreateLeaseRequest, context: Ctx
    ) -> pb.CreateLeaseResponse:
        lease = self.engine.create_lease(tenant(), request.ttl_ms, request.label)
        return pb.CreateLeaseResponse(lease=lease_pb(lease_view(self.engine, lease)))

    @unary
    async def KeepAliveLease(
        self, request: pb.KeepAliveLeaseRequest, context: Ctx
    ) -> pb.KeepAliveLeaseResponse:
        lease = self.engine.leases.keep_alive(tenant(), require(request.lease_id, "lease_id"))
        return pb.KeepAliveLeaseResponse(lease=lease_pb(lease_view(self.engine, lease)))

    @unary
    async def RevokeLease(
        self, request: pb.RevokeLeaseRequest, context: Ctx
    ) -> pb.RevokeLeaseResponse:
        done = self.engine.revoke_lease(tenant(), require(request.lease_id, "lease_id"))
        return pb.RevokeLeaseResponse(
            released_references=done.released_references, untracked_gfns=done.untracked_gfns
        )

    @unary
    async def ListLeases(
        self, request: pb.ListLeasesRequest, context: Ctx
    ) -> pb.ListLeasesResponse:
        leases = self.engine.leases.of_tenant(tenant())
        return pb.ListLeasesResponse(
            leases=[lease_pb(lease_view(self.engine, le)) for le in leases]
        )
