"""Leases: owners of tracking references that end when their holder goes away."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from pagetrackd.application.streams import Streams
from pagetrackd.domain import QuotaExceeded, TenantId
from pagetrackd.leases import Lease, LeaseKind

log = structlog.get_logger("pagetrackd.engine")


@dataclass(frozen=True, slots=True)
class LeaseRevoked:
    """What revoking a lease released."""

    released_references: int
    untracked_gfns: int  #: gfns no longer tracked by anyone


class Leasing(Streams):
    """The tenant's leases (:class:`~pagetrackd.leases.LeaseTable`) and what ending
    one releases."""

    def check_leases(self, tenant: TenantId) -> None:
        """Raise QuotaExceeded if the tenant may not hold one more TTL lease."""
        q = self.quotas(tenant).leases
        held = sum(
            1 for lease in self.leases.live()
            if lease.tenant == tenant and lease.kind is LeaseKind.TTL
        )
        if held >= q:
            raise QuotaExceeded(
                f"tenant already holds {q} leases, its leases quota; revoke some or let"
                " them expire", quota="leases", limit=q,
            )

    def _release_lease(self, lease: Lease) -> None:
        released = 0
        for entry in self.list_vms(lease.tenant):
            released += entry.vm.release_owner(lease.owner)
        log.info("lease.ended", tenant=lease.tenant, lease=lease.lease_id, untracked=released)

    def stream_lease(self, tenant: TenantId) -> Lease:
        """A lease that lives as long as one Watch stream."""
        return self.leases.create(tenant, 0, "watch", LeaseKind.STREAM)

    def lease_owner(self, tenant: TenantId, lease_id: str) -> str:
        """The owner name for tracking under ``lease_id`` ("" = the tenant)."""
        if not lease_id:
            return "tenant"
        return self.leases.get(tenant, lease_id).owner

    def lease_references(self, lease: Lease) -> int:
        """Tracking references held under a lease, over the tenant's VMs."""
        return sum(e.vm.owner_references(lease.owner) for e in self.list_vms(lease.tenant))

    def create_lease(self, tenant: TenantId, ttl_ms: int, label: str) -> Lease:
        """A TTL lease, within the tenant's leases quota."""
        self.check_serving()
        self.check_leases(tenant)
        return self.leases.create(tenant, ttl_ms, label)

    def revoke_lease(self, tenant: TenantId, lease_id: str) -> LeaseRevoked:
        """End a lease now: its references are released in every VM of the tenant."""
        lease = self.leases.get(tenant, lease_id)
        refs = self.lease_references(lease)
        before = self.usage(tenant)[1]
        self.leases.end(lease)
        after = self.usage(tenant)[1]
        return LeaseRevoked(released_references=refs, untracked_gfns=before - after)
