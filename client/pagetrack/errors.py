"""Client exceptions: one per gRPC status code the daemon uses, under one root.

The client catches ``grpc.RpcError`` (and ``grpc.aio.AioRpcError``) and raises one of
these with ``raise ... from None``, so callers never branch on grpc codes; the daemon's
google.rpc.Status details (AIP-193) become attributes: ``reason``, ``field_violations``,
``quota_violations``, ``retry_delay`` and ``resource_info``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

# Module imports: types-protobuf's google-stubs hide `from google.rpc import ...` from mypy.
import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
import grpc
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    #: the request field at fault, a dotted path such as ``options.limits.gfn_bits``
    field: str
    #: what is wrong with it and what would be accepted
    description: str
    #: the error's reason (as PageTrackError.reason)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One exhausted quota or limit (google.rpc.QuotaFailure.Violation)."""

    #: whose quota: ``tenant:<name>`` for tenant quotas, else what ran out
    subject: str
    description: str
    #: the quota's name (``vms``, ``tracked_gfns``, ``write_rate``, ``queue_limit`` ...)
    quota_id: str = ""
    #: its size, when the daemon said
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class ResourceInfo:
    """The missing thing of a NOT_FOUND error, as the caller named it
    (google.rpc.ResourceInfo)."""

    #: ``vm``, ``memslot``, ``lease``, ``plugin``, ``workload``, ``notifier`` or ``resource``
    resource_type: str
    resource_name: str
    description: str = ""


class PageTrackError(Exception):
    """Root of every error the pagetrack client raises; ``code`` names the status.

    Errors from the daemon carry its google.rpc.Status details: ``reason`` (a stable
    UPPER_SNAKE name, listed in docs/api.md) and ``domain`` always; ``field_violations``
    for INVALID_ARGUMENT, ``quota_violations`` and (for rate quotas) ``retry_delay`` in
    seconds for RESOURCE_EXHAUSTED, ``resource_info`` for NOT_FOUND. Errors the client
    raises itself have ``reason == ""``.
    """

    #: gRPC status code name of this class (an unmapped code keeps its own name).
    default_code: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        quota_violations: Sequence[QuotaViolation] = (),
        retry_delay: float | None = None,
        resource_info: ResourceInfo | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.quota_violations = tuple(quota_violations)
        self.retry_delay = retry_delay
        self.resource_info = resource_info

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

    def __init__(self, message: str, *, oldest_seq: int | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        if oldest_seq is None and "oldest_seq" in self.metadata:
            oldest_seq = int(self.metadata["oldest_seq"])
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


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status the daemon attached, if any and if it agrees with the call's
    own code and message."""
    if not callable(getattr(err, "trailing_metadata", None)):
        return None
    try:
        # An AioRpcError is not a grpc.Call but has the same code/details/trailing_metadata.
        status: status_pb2.Status | None = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return None  # a proxy rewrote the status: keep the plain code and message
    return status


def _details(status: status_pb2.Status) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for packed in status.details:
        kind = packed.TypeName()
        if kind == "google.rpc.ErrorInfo":
            info = error_details_pb2.ErrorInfo.FromString(packed.value)
            out.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif kind == "google.rpc.BadRequest":
            bad = error_details_pb2.BadRequest.FromString(packed.value)
            out["field_violations"] = [
                FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations
            ]
        elif kind == "google.rpc.QuotaFailure":
            quota = error_details_pb2.QuotaFailure.FromString(packed.value)
            out["quota_violations"] = [
                QuotaViolation(
                    v.subject, v.description, v.quota_id,
                    v.quota_value if v.quota_id or v.quota_value else None,
                )
                for v in quota.violations
            ]
        elif kind == "google.rpc.RetryInfo":
            retry = error_details_pb2.RetryInfo.FromString(packed.value)
            out["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9
        elif kind == "google.rpc.ResourceInfo":
            res = error_details_pb2.ResourceInfo.FromString(packed.value)
            out["resource_info"] = ResourceInfo(
                res.resource_type, res.resource_name, res.description
            )
    return out


def from_rpc_error(err: grpc.RpcError) -> PageTrackError:
    """The client exception for a failed RPC (``grpc.RpcError`` or ``grpc.aio.AioRpcError``),
    with the daemon's error details when it sent them."""
    code, details = _code_and_details(err)
    cls = _BY_CODE.get(code, PageTrackError)
    status = _rich_status(err)
    extra = _details(status) if status is not None else {}
    return cls(details, code=code.name, **extra)


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
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PageTrackError",
    "PermissionDenied",
    "QuotaViolation",
    "ResourceExhausted",
    "ResourceInfo",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "map_rpc_errors",
]
