"""Domain errors to gRPC status codes: one table, most specific class first."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from pagetrackd.domain import errors as e

log = structlog.get_logger("pagetrackd.transport")

#: Walked along the exception's MRO, so a subclass may override its parent's code.
STATUS_TABLE: dict[type[e.PageTrackError], grpc.StatusCode] = {
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    e.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception; INTERNAL for anything not in the table."""
    for cls in type(exc).__mro__:
        code = STATUS_TABLE.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    """End the call with the status for ``exc``; log what is not a client's mistake."""
    code = code_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("rpc.unmapped_exception", exc_info=exc)
        await context.abort(code, "internal error in pagetrackd; the daemon log has details")
    await context.abort(code, str(exc))


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
        await abort_with(context, failure)

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
        await abort_with(context, failure)

    return wrapper  # type: ignore[return-value]
