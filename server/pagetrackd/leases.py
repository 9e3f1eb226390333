"""Leases: tracking references that end when their holder goes away.

A lease is an owner name (``lease:<id>``) for tracking references. It ends when its TTL
passes without a keep-alive, when it is revoked, or -- for a *stream* lease -- when the
Watch stream that holds it ends. When it ends, exactly the references added under it
are released in every VM of its tenant, so a crashed tool never leaves pages
write-protected.

``on_change`` hooks hear of every TTL lease made or ended (the journal, with
``durability = "journal"``, writes them down so an acknowledged lease survives a crash).
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagetrackd.domain import InvalidArgument, LeaseNotFound, TenantId
from pagetrackd.limits import MAX_LEASE_TTL_MS, MIN_LEASE_TTL_MS


class LeaseKind(enum.Enum):
    """How a lease is kept alive."""

    TTL = "ttl"  #: by KeepAlive calls before the TTL runs out
    STREAM = "stream"  #: by the Watch stream that holds it


@dataclass(slots=True)
class Lease:
    """One lease of one tenant."""

    lease_id: str
    tenant: TenantId
    kind: LeaseKind
    ttl_ms: int
    expires_at: float  #: monotonic seconds; inf for stream leases
    label: str = ""

    @property
    def owner(self) -> str:
        """The owner name its tracking references carry."""
        return f"lease:{self.lease_id}"


class LeaseTable:
    """Every live lease. ``release`` is called with a lease when it ends, to drop its
    references; ``clock`` is monotonic seconds (a hook for tests)."""

    def __init__(
        self,
        release: Callable[[Lease], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._leases: dict[str, Lease] = {}
        self._release = release
        self._clock = clock
        self.expired_total = 0
        #: called with ("create" | "end", lease) for every TTL lease made or ended
        self.on_change: list[Callable[[str, Lease], None]] = []

    def __len__(self) -> int:
        return len(self._leases)

    def create(
        self, tenant: TenantId, ttl_ms: int, label: str = "", kind: LeaseKind = LeaseKind.TTL
    ) -> Lease:
        """A new lease; TTL leases must have MIN_LEASE_TTL_MS <= ttl_ms <= MAX_LEASE_TTL_MS."""
        if kind is LeaseKind.TTL and not MIN_LEASE_TTL_MS <= ttl_ms <= MAX_LEASE_TTL_MS:
            raise InvalidArgument(
                f"ttl_ms {ttl_ms} must be between {MIN_LEASE_TTL_MS} and {MAX_LEASE_TTL_MS}"
            )
        if len(label) > 128:
            raise InvalidArgument(f"lease label is {len(label)} characters; at most 128")
        lease_id = secrets.token_hex(8)
        expires = (
            self._clock() + ttl_ms / 1000 if kind is LeaseKind.TTL else float("inf")
        )
        lease = Lease(lease_id, tenant, kind, ttl_ms, expires, label)
        self._leases[lease_id] = lease
        self._tell("create", lease)
        return lease

    def _tell(self, change: str, lease: Lease) -> None:
        if lease.kind is LeaseKind.TTL:
            for hook in self.on_change:
                hook(change, lease)

    def adopt(
        self, tenant: TenantId, lease_id: str, ttl_ms: int, remaining_ms: int, label: str = ""
    ) -> Lease:
        """Re-create a saved TTL lease under its old id, expiring ``remaining_ms`` from
        now (the daemon's state directory uses this at start)."""
        if not MIN_LEASE_TTL_MS <= ttl_ms <= MAX_LEASE_TTL_MS or remaining_ms <= 0:
            raise InvalidArgument(f"lease {lease_id!r}: bad ttl_ms or remaining_ms")
        if lease_id in self._leases:
            raise InvalidArgument(f"lease {lease_id!r} already exists")
        lease = Lease(
            lease_id, tenant, LeaseKind.TTL, ttl_ms,
            self._clock() + min(remaining_ms, ttl_ms) / 1000, label,
        )
        self._leases[lease_id] = lease
        return lease

    def is_ttl(self, lease_id: str) -> bool:
        """Whether a live TTL lease has that id (of any tenant)."""
        lease = self._leases.get(lease_id)
        return lease is not None and lease.kind is LeaseKind.TTL

    def drop(self, lease_id: str) -> None:
        """Forget a lease without releasing anything (at start, replaying the journal:
        the VMs are not loaded yet, and their releases are replayed with them)."""
        self._leases.pop(lease_id, None)

    def get(self, tenant: TenantId, lease_id: str) -> Lease:
        """The tenant's lease; another tenant's lease is NotFound too."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.tenant != tenant:
            raise LeaseNotFound(
                f"lease {lease_id!r} not found (expired, revoked or never made)", name=lease_id
            )
        return lease

    def keep_alive(self, tenant: TenantId, lease_id: str) -> Lease:
        """Push the lease's expiry a full TTL into the future."""
        lease = self.get(tenant, lease_id)
        if lease.kind is LeaseKind.TTL:
            lease.expires_at = self._clock() + lease.ttl_ms / 1000
        return lease

    def end(self, lease: Lease) -> None:
        """End a lease now and release its references."""
        if self._leases.pop(lease.lease_id, None) is not None:
            self._tell("end", lease)
            self._release(lease)

    def revoke(self, tenant: TenantId, lease_id: str) -> Lease:
        """End one of the tenant's leases."""
        lease = self.get(tenant, lease_id)
        self.end(lease)
        return lease

    def expire(self) -> int:
        """End every lease whose TTL has passed; returns how many."""
        now = self._clock()
        dead = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in dead:
            self.end(lease)
        self.expired_total += len(dead)
        return len(dead)

    def live(self) -> list[Lease]:
        """Every live lease, of every tenant."""
        return list(self._leases.values())

    def of_tenant(self, tenant: TenantId) -> list[Lease]:
        """The tenant's live leases."""
        return [lease for lease in self._leases.values() if lease.tenant == tenant]

    def remaining_ms(self, lease: Lease) -> int:
        """Milliseconds until a TTL lease expires (0 for stream leases)."""
        if lease.kind is LeaseKind.STREAM:
            return 0
        return max(0, int((lease.expires_at - self._clock()) * 1000))
