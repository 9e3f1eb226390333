"""Errors of the page-track core: one root, a shallow tree, one sentence per class.

The transport maps each class to a gRPC status code in one table; messages say what
the caller should change.
"""

from __future__ import annotations


class PageTrackError(Exception):
    """Root of every error the core raises on purpose; state is unchanged when raised."""


class NotFound(PageTrackError):
    """Raised when a named thing (tenant, VM, slot, notifier) does not exist for the caller."""


class VmNotFound(NotFound):
    """Raised when a VM name is unknown to the calling tenant."""


class SlotNotFound(NotFound):
    """Raised when a memslot id is not in use."""


class AlreadyExists(PageTrackError):
    """Raised when creating something whose name or id is taken."""


class InvalidArgument(PageTrackError):
    """Raised when a request is malformed: bad names, flags, ranges or sizes."""


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
    """Raised when a counter or a quota has no room left."""


class CounterOverflow(ResourceExhausted):
    """Raised when a track counter would pass 65535 (KVM WARNs and skips; we refuse)."""


class QuotaExceeded(ResourceExhausted):
    """Raised when a tenant's quota would be exceeded; names the quota and its value."""

    def __init__(self, message: str, *, quota: str, limit: int) -> None:
        super().__init__(message)
        self.quota = quota
        self.limit = limit


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
