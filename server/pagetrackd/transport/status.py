"""Domain errors to gRPC statuses: one table, most specific class first.

Each error ends the call with its status code and message, and with ``google.rpc.Status``
details (AIP-193) a program can act on: an ``ErrorInfo`` with a stable reason on every
error, ``BadRequest`` field violations for INVALID_ARGUMENT, ``QuotaFailure`` (and
``RetryInfo`` when waiting helps) for RESOURCE_EXHAUSTED, ``ResourceInfo`` for NOT_FOUND,
``PreconditionFailure`` for FAILED_PRECONDITION. docs/api.md lists every reason.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

# Module imports: types-protobuf's google-stubs hide `from google.rpc import ...` from mypy.
import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
import grpc
import structlog
from google.protobuf import any_pb2, descriptor, duration_pb2
from google.protobuf.message import Message
from grpc_status import rpc_status

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.auth import current_caller
from pagetrackd.domain import errors as e
from pagetrackd.replay import ReplayDiverged
from pagetrackd.state import SnapshotError

log = structlog.get_logger("pagetrackd.transport")

#: ErrorInfo.domain of every error pagetrackd sends.
ERROR_DOMAIN = "pagetrack.dev"


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """What the caller sees for one error class."""

    code: grpc.StatusCode
    #: ErrorInfo.reason: UPPER_SNAKE, stable once released (docs/compatibility.md)
    reason: str
    #: ResourceInfo.resource_type, for NOT_FOUND
    resource_type: str = ""


_NF = grpc.StatusCode.NOT_FOUND
_AE = grpc.StatusCode.ALREADY_EXISTS
_IA = grpc.StatusCode.INVALID_ARGUMENT
_FP = grpc.StatusCode.FAILED_PRECONDITION
_RE = grpc.StatusCode.RESOURCE_EXHAUSTED

#: Every error class the daemon raises on purpose, walked along the exception's MRO so a
#: subclass overrides its parent. A reason, once released, never changes meaning.
STATUS_TABLE: dict[type[e.PageTrackError], ErrorKind] = {
    e.PageTrackError: ErrorKind(grpc.StatusCode.INTERNAL, "INTERNAL"),
    e.NotFound: ErrorKind(_NF, "NOT_FOUND", "resource"),
    e.VmNotFound: ErrorKind(_NF, "VM_NOT_FOUND", "vm"),
    e.SlotNotFound: ErrorKind(_NF, "MEMSLOT_NOT_FOUND", "memslot"),
    e.LeaseNotFound: ErrorKind(_NF, "LEASE_NOT_FOUND", "lease"),
    e.PluginNotFound: ErrorKind(_NF, "PLUGIN_NOT_ATTACHED", "plugin"),
    e.WorkloadNotFound: ErrorKind(_NF, "WORKLOAD_NOT_FOUND", "workload"),
    e.NotifierNotFound: ErrorKind(_NF, "NOTIFIER_NOT_FOUND", "notifier"),
    e.AlreadyExists: ErrorKind(_AE, "ALREADY_EXISTS"),
    e.VmAlreadyExists: ErrorKind(_AE, "VM_ALREADY_EXISTS"),
    e.PluginAlreadyAttached: ErrorKind(_AE, "PLUGIN_ALREADY_ATTACHED"),
    e.InvalidArgument: ErrorKind(_IA, "INVALID_FIELD"),
    e.SlotOverlap: ErrorKind(_IA, "MEMSLOT_OVERLAP"),
    SnapshotError: ErrorKind(_IA, "SNAPSHOT_INVALID"),
    e.FailedPrecondition: ErrorKind(_FP, "FAILED_PRECONDITION"),
    e.GfnNotInSlot: ErrorKind(_FP, "GFN_NOT_IN_MEMSLOT"),
    e.NotTracked: ErrorKind(_FP, "GFN_NOT_TRACKED"),
    e.DmaRejected: ErrorKind(_FP, "DMA_REJECTED"),
    e.MoveRefused: ErrorKind(_FP, "MEMSLOT_MOVE_REFUSED"),
    ReplayDiverged: ErrorKind(_FP, "REPLAY_DIVERGED"),
    e.ResourceExhausted: ErrorKind(_RE, "RESOURCE_EXHAUSTED"),
    e.CounterOverflow: ErrorKind(_RE, "TRACK_COUNTER_OVERFLOW"),
    e.QuotaExceeded: ErrorKind(_RE, "QUOTA_EXCEEDED"),
    e.OutOfRange: ErrorKind(grpc.StatusCode.OUT_OF_RANGE, "OUT_OF_RANGE"),
    e.Compacted: ErrorKind(grpc.StatusCode.OUT_OF_RANGE, "HISTORY_COMPACTED"),
    e.Unauthenticated: ErrorKind(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"),
    e.PermissionDenied: ErrorKind(grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_PERMITTED"),
    e.Unavailable: ErrorKind(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
}

#: What anything else (a bug) becomes.
INTERNAL = ErrorKind(grpc.StatusCode.INTERNAL, "INTERNAL")


def kind_for(exc: BaseException) -> ErrorKind:
    """The status code and reason for an exception; INTERNAL for anything not in the table
    (the root class included: raising it bare is a bug)."""
    for cls in type(exc).__mro__:
        kind = STATUS_TABLE.get(cls)
        if kind is not None:
            return kind
    return INTERNAL


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception; INTERNAL for anything not in the table."""
    return kind_for(exc).code


# ----------------------------------------------------------------- field violations

#: a quoted value ('x' or "x"; the apostrophe of "the VM's" opens none)
_QUOTED = re.compile(r"(?<!\w)'[^']*'|(?<!\w)\"[^\"]*\"")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _is_field_path(message: descriptor.Descriptor, path: str) -> bool:
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = message.fields_by_name.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            if field.message_type is None:
                return False
            message = field.message_type
    return True


def request_type(servicer: object, method: str, request: object) -> descriptor.Descriptor | None:
    """The request message type of a call: the request's own, or for a client stream the
    input type that pagetrack.v1 gives the method (servicer classes are named after
    their services)."""
    if isinstance(request, Message):
        return cast(descriptor.Descriptor, request.DESCRIPTOR)
    service = pb.DESCRIPTOR.services_by_name.get(type(servicer).__name__)
    found = service.methods_by_name.get(method) if service is not None else None
    return found.input_type if found is not None else None


def _paths_ending_in(message: descriptor.Descriptor, leaf: str, depth: int = 3) -> list[str]:
    found = [leaf] if leaf in message.fields_by_name else []
    if depth:
        for field in message.fields:
            if field.message_type is not None and not field.message_type.GetOptions().map_entry:
                found += [
                    f"{field.name}.{p}"
                    for p in _paths_ending_in(field.message_type, leaf, depth - 1)
                ]
    return found


def field_at_fault(exc: e.InvalidArgument, message: descriptor.Descriptor | None) -> str:
    """The request field an InvalidArgument is about: the one it names with ``field``,
    else the first field path of the request that its message mentions (quoted values
    aside: they are the caller's data), else the shortest path ending in an identifier
    it mentions (``host_hz`` is ``options.cost.host_hz`` in CreateVm), else a field whose
    name is a word's plural ("option" -> ``options``); "" when none."""
    if message is None:
        return exc.field or ""
    if exc.field is not None and _is_field_path(message, exc.field):
        return str(exc.field)
    words = _WORD.findall(_QUOTED.sub(" ", str(exc)))
    for word in words:
        if _is_field_path(message, word):
            return str(word)
    for word in words:
        if "_" in word:
            paths = _paths_ending_in(message, word.rsplit(".", 1)[-1])
            if paths:
                return min(paths, key=len)
    for word in words:
        if f"{word}s" in message.fields_by_name:
            return f"{word}s"
    return ""


# ------------------------------------------------------------------------ details


def _pack(detail: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def _quota_subject(exc: e.ResourceExhausted, tenant: str | None) -> str:
    if isinstance(exc, e.QuotaExceeded) and tenant is not None:
        return f"tenant:{tenant}"
    return exc.quota or "daemon"


def rich_status(
    exc: BaseException,
    *,
    request: descriptor.Descriptor | None = None,
    tenant: str | None = None,
) -> status_pb2.Status:
    """The google.rpc.Status a call failing with ``exc`` ends with. ``request`` is the
    call's request type (field violations name its fields), ``tenant`` the caller's
    (quota subjects)."""
    kind = kind_for(exc)
    if kind is INTERNAL or kind.code is grpc.StatusCode.INTERNAL:
        message = "internal error in pagetrackd; the daemon log has details"
    else:
        message = str(exc)
    metadata: dict[str, str] = {}
    details: list[Message] = []
    if isinstance(exc, e.NotFound):
        # As the caller named it: the same answer whether or not another tenant has one.
        metadata["resource_type"] = kind.resource_type
        if exc.name:
            metadata["resource_name"] = exc.name
        details.append(error_details_pb2.ResourceInfo(
            resource_type=kind.resource_type, resource_name=exc.name, description=message
        ))
    elif isinstance(exc, e.InvalidArgument):
        field = field_at_fault(exc, request)
        metadata["field"] = field
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=field, description=message, reason=kind.reason
            )
        ]))
    elif isinstance(exc, e.ResourceExhausted):
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=_quota_subject(exc, tenant), description=message, quota_id=exc.quota
        )
        if exc.limit is not None:
            violation.quota_value = int(exc.limit)
            metadata["limit"] = str(int(exc.limit))
        if exc.quota:
            metadata["quota"] = exc.quota
        details.append(error_details_pb2.QuotaFailure(violations=[violation]))
        retry = getattr(exc, "retry_after_s", None)
        if retry is not None:
            delay = duration_pb2.Duration()
            # Rounded up (at least 1 ms): after this long the request fits.
            delay.FromNanoseconds(max(1_000_000, math.ceil(retry * 1e9)))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    elif isinstance(exc, e.FailedPrecondition):
        details.append(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=kind.reason, subject="", description=message
            )
        ]))
    elif isinstance(exc, e.Compacted):
        metadata["oldest_seq"] = str(exc.oldest_seq)
    info = error_details_pb2.ErrorInfo(reason=kind.reason, domain=ERROR_DOMAIN, metadata=metadata)
    return status_pb2.Status(
        code=kind.code.value[0],
        message=message,
        details=[_pack(info), *(_pack(d) for d in details)],
    )


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: BaseException,
    *,
    request: descriptor.Descriptor | None = None,
    tenant: str | None = None,
) -> None:
    """End the call with the status and details for ``exc``; log what is not a client's
    mistake."""
    if kind_for(exc).code is grpc.StatusCode.INTERNAL:
        log.error("rpc.unmapped_exception", exc_info=exc)
    status = rpc_status.to_status(rich_status(exc, request=request, tenant=tenant))
    await context.abort(status.code, status.details, status.trailing_metadata)


def _tenant() -> str | None:
    caller = current_caller.get(None)
    return str(caller.tenant) if caller is not None else None


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
G = TypeVar("G", bound=Callable[..., AsyncIterator[Any]])


def unary(fn: F) -> F:
    """Map exceptions raised by a unary servicer method to statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            failure = exc
        await abort_with(
            context, failure, request=request_type(self, fn.__name__, request), tenant=_tenant()
        )

    return wrapper  # type: ignore[return-value]


def streaming(fn: G) -> G:
    """Map exceptions raised by a server-streaming servicer method to statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            failure = exc
        await abort_with(
            context, failure, request=request_type(self, fn.__name__, request), tenant=_tenant()
        )

    return wrapper  # type: ignore[return-value]
