"""Client exceptions: one per gRPC status code the daemon uses, under one root.

The client catches ``grpc.RpcError`` (and ``grpc.aio.AioRpcError``) and raises one of
these with ``raise ... from None``, so callers never branch on grpc codes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import ClassVar

import grpc


class PageTrackError(Exception):
    """Root of every error the pagetrack client raises; ``code`` names the status."""

    #: gRPC status code name of this class (an unmapped code keeps its own name).
    default_code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code

    def __str__(self) -> str:
        return self.message


class NotFound(PageTrackError):
    """Raised when a VM, slot, lease, workload or plugin does not exist for the caller."""

    default_code = "NOT_FOUND"


class AlreadyExists(PageTrackError):
    """Raised when creating something whose name is taken (a VM, an attached plugin)."""

    default_code = "ALREADY_EXISTS"


class InvalidArgument(PageTrackError):
    """Raised when a request is malformed; the message names the field and its limit."""

    default_code = "INVALID_ARGUMENT"


class FailedPrecondition(PageTrackError):
    """Raised when a well-formed request does not fit the current state of the VM."""

    default_code = "FAILED_PRECONDITION"


class ResourceExhausted(PageTrackError):
    """Raised when a quota, a counter or a stream queue has no room left."""

    default_code = "RESOURCE_EXHAUSTED"


class OutOfRange(PageTrackError):
    """Raised when a position is past what is held; ``oldest_seq`` is the oldest still held."""

    default_code = "OUT_OF_RANGE"

    def __init__(
        self, message: str, *, code: str | None = None, oldest_seq: int | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.oldest_seq = oldest_seq if oldest_seq is not None else _parse_oldest(message)


class Unauthenticated(PageTrackError):
    """Raised when the call carries no valid bearer token."""

    default_code = "UNAUTHENTICATED"


class PermissionDenied(PageTrackError):
    """Raised when the caller's role may not make this call."""

    default_code = "PERMISSION_DENIED"


class Unavailable(PageTrackError):
    """Raised when the daemon cannot be reached or is shutting down."""

    default_code = "UNAVAILABLE"


class Unimplemented(PageTrackError):
    """Raised when the daemon does not offer this call (an older or partial version)."""

    default_code = "UNIMPLEMENTED"


class Internal(PageTrackError):
    """Raised when the daemon failed on its side; its log has the details."""

    default_code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[PageTrackError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
}

_OLDEST = re.compile(r"oldest[^0-9]{0,40}?(\d+)", re.IGNORECASE)


def _parse_oldest(message: str) -> int | None:
    m = _OLDEST.search(message)
    return int(m.group(1)) if m else None


def _code_and_details(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else None
    return code or grpc.StatusCode.UNKNOWN, details or str(code.name if code else "error")


def from_rpc_error(err: grpc.RpcError) -> PageTrackError:
    """The client exception for a failed RPC (``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code, details = _code_and_details(err)
    cls = _BY_CODE.get(code, PageTrackError)
    return cls(details, code=code.name)


@contextlib.contextmanager
def map_rpc_errors() -> Iterator[None]:
    """Re-raise any ``grpc.RpcError`` raised inside the block as a PageTrackError."""
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


__all__ = [
    "AlreadyExists",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PageTrackError",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "map_rpc_errors",
]
