"""Per-RPC authentication and logging context."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from pagetrackd.auth import Authenticator, current_caller
from pagetrackd.domain import PageTrackError
from pagetrackd.journal import Journal
from pagetrackd.transport.status import abort_with

log = structlog.get_logger("pagetrackd.rpc")

#: Stock services that answer without a token (health checks, grpcurl discovery).
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.", "/grpc.reflection.v1.")
#: Services whose calls name a VM but only touch its event streams, never its state:
#: not serialized with the VM's other calls (Unwatch must not wait behind a write that
#: waits for room in a stream).
UNSERIALIZED_SERVICES = ("/pagetrack.v1.WatchService/",)

#: Takes (tenant, VM name) and returns the context in which one call on that VM runs
#: (the application's per-VM lock).
Serialize = Callable[[str, str], contextlib.AbstractAsyncContextManager[None]]


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else bytes(value).decode()
    return None


def _code(context: Any) -> str:
    try:
        code = context.code()
    except Exception:  # older grpc versions have no code() on aio contexts
        code = None
    if code is None:
        return "OK"
    return str(code.name if hasattr(code, "name") else code)


def _passing_wire(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A response serializer that sends ``bytes`` as they are (a server stream may yield
    a message already in wire form, as Watch does for event batches) and serializes
    anything else with ``serialize``."""
    if serialize is None:
        return None

    def wire(message: Any) -> bytes:
        return message if message.__class__ is bytes else serialize(message)

    return wire


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates each call, binds tenant/rpc/peer for logging, logs the outcome."""

    def __init__(
        self,
        auth: Authenticator,
        observe: Callable[[str, str, float], None] | None = None,
        journal: Journal | None = None,
        *,
        serialize: Serialize | None = None,
    ) -> None:
        self._auth = auth
        #: unary calls that name a VM run inside serialize(tenant, vm): one at a time per
        #: VM, in arrival order, so a request done in slices (which lets the event loop
        #: serve others between them) is seen whole by the VM's other callers
        self._serialize = serialize
        #: with durability = "journal": a call that appended to it replies only once
        #: what it appended is on disk (group commit)
        self._journal = journal
        #: method path -> its handler, wrapped
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        #: called with (method path, status code name, seconds) as each call ends (metrics)
        self._observe = observe

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method
        # The wrapper depends only on the method (the token is read from each call's
        # context, the served methods do not change), so it is made once: building it
        # cost about 20 us a call, and looking the handler up again costs a few.
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        wrapped = self._wrapped[method] = self._wrap(handler, method)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        serialize = None if method.startswith(UNSERIALIZED_SERVICES) else self._serialize
        calls = _Calls(method, self._auth, serialize, self._journal, self._observe)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                calls.awaiting(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                calls.streaming(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=_passing_wire(handler.response_serializer),
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                calls.awaiting(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class _Calls:
    """What runs around every call of one method: authentication, the logging context,
    the VM's lock, the journal's commit, the outcome's log line and metric."""

    def __init__(
        self,
        method: str,
        auth: Authenticator,
        serialize: Serialize | None,
        journal: Journal | None,
        observe: Callable[[str, str, float], None] | None,
    ) -> None:
        self.method = method
        self.rpc = method.rsplit("/", 1)[-1]
        self.auth = auth
        self.serialize = serialize
        self.journal = journal
        self.observe = observe

    def begin(self, context: Any) -> tuple[float, Any]:
        auth = self.auth
        caller = auth.authenticate(_authorization(context) if auth.enabled else None)
        log_tokens = structlog.contextvars.bind_contextvars(
            rpc=self.rpc, peer=context.peer(), tenant=caller.tenant)
        return time.perf_counter(), (current_caller.set(caller), log_tokens)

    def finish(self, context: Any, started: float, error: BaseException | None) -> None:
        seconds = time.perf_counter() - started
        code = _code(context)
        if error is not None and code == "OK":
            code = "CANCELLED"
        if self.observe is not None:
            self.observe(self.method, code, seconds)
        if code in ("OK", "CANCELLED"):
            log.debug("rpc.done", code=code, ms=round(seconds * 1000, 3))
        else:
            log.warning("rpc.failed", code=code, ms=round(seconds * 1000, 3))

    @staticmethod
    def reset(tokens: Any) -> None:
        # An async generator may be finalized in another context; the vars die with it
        # then.
        with contextlib.suppress(ValueError):
            current_caller.reset(tokens[0])
        with contextlib.suppress(ValueError):
            structlog.contextvars.reset_contextvars(**tokens[1])

    async def refuse(self, context: Any, exc: PageTrackError) -> None:
        log.warning("rpc.unauthenticated", rpc=self.rpc, peer=context.peer())
        structlog.contextvars.clear_contextvars()
        await abort_with(context, exc)

    async def _reply(self, inner: Any, request: Any, context: Any) -> Any:
        """The handler's reply, under the VM's lock when the request names a VM, and
        on disk first when it appended to the journal."""
        journal, serialize = self.journal, self.serialize
        mark = journal.last_index if journal is not None else 0
        vm = getattr(request, "vm", None) if serialize is not None else None
        if vm and isinstance(vm, str):
            assert serialize is not None
            async with serialize(current_caller.get().tenant, vm):
                reply = await inner(request, context)
        else:
            reply = await inner(request, context)
        if journal is not None and journal.last_index > mark:
            try:
                await journal.commit()
            except PageTrackError as exc:
                await abort_with(context, exc)
        return reply

    def awaiting(self, inner: Any) -> Any:
        """unary-unary and stream-unary: one awaited reply."""

        async def call(request: Any, context: Any) -> Any:
            try:
                started, token = self.begin(context)
            except PageTrackError as exc:
                await self.refuse(context, exc)
                return None
            error: BaseException | None = None
            try:
                return await self._reply(inner, request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.finish(context, started, error)  # logs with the bindings still on
                self.reset(token)

        return call

    def streaming(self, inner: Any) -> Any:
        """unary-stream: the handler's messages, passed on."""

        async def call(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                started, token = self.begin(context)
            except PageTrackError as exc:
                await self.refuse(context, exc)
                return
            error: BaseException | None = None
            try:
                async for item in inner(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.finish(context, started, error)  # logs with the bindings still on
                self.reset(token)

        return call
