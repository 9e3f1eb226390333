"""Errors of the page-track core: one root, a shallow tree, one sentence per class.

The transport maps each class to a gRPC status code and a stable reason in one table;
messages say what the caller should change. Context a program can act on goes in
keyword-only attributes: the request field at fault, the quota and its limit, the name
of a missing thing as the caller gave it.
"""

from __future__ import annotations


class PageTrackError(Exception):
    """Root of every error the core raises on purpose; state is unchanged when raised."""


class NotFound(PageTrackError):
    """Raised when a named thing (tenant, VM, slot, notifier) does not exist for the caller.

    ``name`` is the name as the caller gave it (never anything about other tenants).
    """

    def __init__(self, message: str = "", *, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class VmNotFound(NotFound):
    """Raised when a VM name is unknown to the calling tenant."""


class SlotNotFound(NotFound):
    """Raised when a memslot id is not in use."""


class LeaseNotFound(NotFound):
    """Raised when a lease id is unknown (expired, revoked or never made)."""


class PluginNotFound(NotFound):
    """Raised when a plugin kind is not attached to the VM."""


class WorkloadNotFound(NotFound):
    """Raised when a workload id is unknown to the calling tenant."""


class NotifierNotFound(NotFound):
    """Raised when no open Watch stream has the given notifier id."""


class AlreadyExists(PageTrackError):
    """Raised when creating something whose name or id is taken."""


class VmAlreadyExists(AlreadyExists):
    """Raised when the calling tenant already has a VM with that name."""


class PluginAlreadyAttached(AlreadyExists):
    """Raised when a plugin of that kind is already attached to the VM."""


class InvalidArgument(PageTrackError):
    """Raised when a request is malformed: bad names, flags, ranges or sizes.

    ``field`` names the request field at fault (a dotted path) when the message does not
    start with it; the transport reports it as a field violation.
    """

    #: the request field at fault; None lets the transport read it off the message
    field: str | None = None

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


class SlotOverlap(InvalidArgument):
    """Raised when a memslot would overlap another one."""


class FailedPrecondition(PageTrackError):
    """Raised when a well-formed request does not fit the current state."""


class GfnNotInSlot(FailedPrecondition):
    """Raised when a gfn to track or untrack lies outside every memslot (KVM: -EINVAL)."""


class NotTracked(FailedPrecondition):
    """Raised when removing a tracking reference that the owner does not hold."""


class DmaRejected(FailedPrecondition):
    """Raised when the VM's DMA policy is ``reject`` and a DMA write hits a tracked gfn."""


class MoveRefused(FailedPrecondition):
    """Raised when linux-6.6 semantics refuse a memslot MOVE while external notifiers exist."""


class ResourceExhausted(PageTrackError):
    """Raised when a counter or a quota has no room left.

    ``quota`` names what ran out and ``limit`` its size, when known.
    """

    quota: str = ""
    limit: int | None = None

    def __init__(
        self, message: str = "", *, quota: str | None = None, limit: int | None = None
    ) -> None:
        super().__init__(message)
        if quota is not None:
            self.quota = quota
        if limit is not None:
            self.limit = limit


class CounterOverflow(ResourceExhausted):
    """Raised when a track counter would pass 65535 (KVM WARNs and skips; we refuse)."""

    quota = "track_counter"
    limit = 65535


class QuotaExceeded(ResourceExhausted):
    """Raised when a tenant's quota would be exceeded; names the quota and its value.

    ``retry_after_s`` is set for rate quotas: how long until the request would fit.
    """

    def __init__(
        self, message: str, *, quota: str, limit: int, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, quota=quota, limit=limit)
        self.retry_after_s = retry_after_s


class OutOfRange(PageTrackError):
    """Raised when a requested position is past what is held (for example a compacted seq)."""


class Compacted(OutOfRange):
    """Raised when resuming from a seq that the history no longer holds."""

    def __init__(self, message: str, *, oldest_seq: int) -> None:
        super().__init__(message)
        self.oldest_seq = oldest_seq


class Unauthenticated(PageTrackError):
    """Raised when a call carries no valid bearer token."""


class PermissionDenied(PageTrackError):
    """Raised when the caller's role may not make this call."""


class Unavailable(PageTrackError):
    """Raised when the daemon is shutting down and takes no new work."""
