"""The Watch stream: a remote notifier delivering batches, gaps, region records and
heartbeats, and its companions Unwatch and ListNotifiers."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
import numpy as np

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.application import Engine, VmEntry
from pagetrackd.auth import current_caller
from pagetrackd.domain import (
    Compacted,
    InvalidArgument,
    NotifierNotFound,
    OutOfRange,
    ResourceExhausted,
    TenantId,
    Unavailable,
)
from pagetrackd.domain.events import EventBatch
from pagetrackd.domain.findings import Finding
from pagetrackd.domain.hub import (
    Gap,
    Item,
    RegionRemoved,
    SlowPolicy,
    Stamped,
    Subscriber,
    make_filter,
)
from pagetrackd.limits import ServerLimits
from pagetrackd.plugins.catalog import canonical_name
from pagetrackd.transport import convert as cv
from pagetrackd.transport.status import streaming, unary

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _bounded(
    request: pb.WatchRequest, field: str, default: int, low: int, high: int, unit: str
) -> int:
    if not request.HasField(field):  # type: ignore[arg-type]
        return default
    value = int(getattr(request, field))
    if not low <= value <= high:
        raise InvalidArgument(f"{field} {value} must be {low}..{high} {unit}")
    return value


@dataclass(frozen=True, slots=True)
class _WatchOptions:
    """A Watch request's batching, queue and heartbeat settings, defaults filled in."""

    max_events: int
    max_bytes: int
    delay_ms: int
    queue_limit: int
    queue_bytes: int
    heartbeat_ms: int
    policy: SlowPolicy
    block_ms: int


def _options(request: pb.WatchRequest, lim: ServerLimits) -> _WatchOptions:
    """The request's settings, each checked against its bounds."""
    max_events = _bounded(request, "max_batch_events", lim.default_watch_batch_events, 1,
                          lim.max_watch_batch_events, "events")
    max_bytes = _bounded(request, "max_batch_bytes", lim.default_watch_batch_bytes, 4096,
                         lim.max_watch_batch_bytes, "bytes")
    delay_ms = _bounded(request, "max_batch_delay_ms", lim.default_watch_batch_delay_ms, 0,
                        lim.max_watch_batch_delay_ms, "ms")
    queue_limit = _bounded(request, "queue_limit", lim.default_queue_limit, 1,
                           lim.max_queue_limit, "events")
    queue_bytes = _bounded(request, "queue_bytes", lim.default_queue_bytes, 4096,
                           lim.max_queue_bytes, "bytes")
    heartbeat_ms = _bounded(request, "heartbeat_interval_ms",
                            lim.default_heartbeat_interval_ms, lim.min_heartbeat_interval_ms,
                            lim.max_heartbeat_interval_ms, "ms")
    cv.enum_value(cv.POLICY, request.policy, "policy")
    policy = cv.POLICY[request.policy]
    block_ms = 0
    if policy is SlowPolicy.BLOCK:
        block_ms = _bounded(request, "block_timeout_ms", lim.default_block_timeout_ms, 1,
                            lim.max_block_timeout_ms, "ms")
    return _WatchOptions(max_events, max_bytes, delay_ms, queue_limit, queue_bytes,
                         heartbeat_ms, policy, block_ms)


class _Signal:
    """``asyncio.Event``'s set, clear and wait for the one task that waits on it (a
    stream's sender), on a loop given once: ``asyncio.Event.wait`` looks the running loop
    up on every wait, which in CPython 3.11 makes a ``getpid`` system call, and a stream
    waits once per message."""

    __slots__ = ("_flag", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> None:
        if self._flag:
            return
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None


def _events_msg(
    parts: list[tuple[EventBatch, int]], head_seq: int, omit_data: bool
) -> pb.WatchResponse:
    """A WatchResponse with these events, already in wire form: the stream's response
    serializer passes bytes through (see interceptors), so no message object is built,
    parsed or serialized for the stream's bulk."""
    return cast(pb.WatchResponse, cv.events_response_wire(parts, head_seq, omit_data))


def _split_by_bytes(batch: EventBatch, max_bytes: int) -> tuple[EventBatch, ...]:
    """``batch`` cut into runs of events whose data fits ``max_bytes`` each (an event
    is at most a page and max_bytes at least a page, so every run holds an event)."""
    ends = np.cumsum(batch.length, dtype=np.int64)
    out = []
    start, base = 0, 0
    while start < len(batch):
        stop = max(int(np.searchsorted(ends, base + max_bytes, side="right")), start + 1)
        out.append(batch.slice(start, stop))
        base, start = int(ends[stop - 1]), stop
    return tuple(out)


def _messages(
    items: list[Item], vm: Vm, max_events: int, max_bytes: int, omit_data: bool
) -> Iterator[pb.WatchResponse]:
    """The stream messages for ``items`` taken from a subscriber's queue, in order.
    Consecutive event batches go out as one message within max_events and max_bytes (a
    stream message costs far more than the events in it); a batch whose data is over
    max_bytes is cut."""
    run: list[tuple[EventBatch, int]] = []
    run_events = run_bytes = 0
    for item in items:
        if isinstance(item, Stamped):
            batch = item.batch
            parts = (
                (batch,) if omit_data or len(batch.data) <= max_bytes
                else _split_by_bytes(batch, max_bytes)
            )
            for part in parts:
                size = 0 if omit_data else len(part.data)
                if run and (run_events + len(part) > max_events or run_bytes + size > max_bytes):
                    yield _events_msg(run, vm.seq, omit_data)
                    run, run_events, run_bytes = [], 0, 0
                run.append((part, item.ts_ns))
                run_events += len(part)
                run_bytes += size
            continue
        if run:
            yield _events_msg(run, vm.seq, omit_data)
            run, run_events, run_bytes = [], 0, 0
        if isinstance(item, Gap):
            yield pb.WatchResponse(gap=cv.gap_pb(item))
        elif isinstance(item, RegionRemoved):
            yield pb.WatchResponse(region_removed=cv.region_pb(item))
        elif isinstance(item, Finding):
            yield pb.WatchResponse(finding=cv.finding_pb(item))
    if run:
        yield _events_msg(run, vm.seq, omit_data)


def _progress(sub: Subscriber, vm: Vm) -> pb.WatchResponse:
    c = sub.counters
    return pb.WatchResponse(
        progress=pb.Progress(
            head_seq=vm.seq,
            sent_seq=sub.last_seq,
            lag=max(0, vm.seq - sub.last_seq),
            queue_depth=sub.depth,
            sent_total=c.sent,
            # what the stream has reported so far, not drops still pending
            dropped_total=c.reported_dropped,
            coalesced_total=c.reported_coalesced,
            timestamp_ns=time.time_ns(),
        )
    )


#: A stream due this close to a flush goes with it. The loop rounds a timer's delay to whole
#: milliseconds and runs one due sooner than half of one at once: waiting out less than this
#: would spin the loop.
_FLUSH_SLACK_S = 0.0005


class _Flusher:
    """Wake-ups for every stream of the daemon (batch delays, heartbeats), with one loop
    timer per delay length instead of one per stream and message.

    A stream whose queue gains events while it has nothing held is put on the list for
    its delay, with its deadline; the timer fires at the list's head and runs every entry
    due by then in the same loop turn, so their messages go out together. The lists are
    in deadline order because a delay's deadlines only grow.

    ``slack_s``: an entry due this close is run with the head (batch delays: waiting out
    less would spin the loop). With no slack (heartbeats) nothing runs before its
    deadline; the timer then waits at least a millisecond for the next head instead."""

    def __init__(self, slack_s: float = _FLUSH_SLACK_S) -> None:
        self._slack = slack_s
        self._due: dict[float, deque[tuple[float, Callable[[int], None], int]]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}

    def hold(self, waker: _Waker, delay_s: float) -> None:
        """Wake ``waker`` (its generation now) ``delay_s`` from now."""
        self.after(delay_s, waker.release, waker.generation)

    def after(self, delay_s: float, fn: Callable[[int], None], arg: int) -> None:
        """Call ``fn(arg)`` ``delay_s`` from now."""
        deadline = time.monotonic() + delay_s
        due = self._due.get(delay_s)
        if due is None:
            due = self._due[delay_s] = deque()
        due.append((deadline, fn, arg))
        if delay_s not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[delay_s] = loop.call_later(delay_s, self._fire, delay_s, loop)

    def _fire(self, delay_s: float, loop: asyncio.AbstractEventLoop) -> None:
        # The loop's timers count from the start of its current turn and round to whole
        # milliseconds, so this may run before the head is due: what is not yet due waits
        # for another timer.
        now = time.monotonic()
        due = self._due[delay_s]
        reach = now + self._slack
        while due and due[0][0] <= reach:
            _, fn, arg = due.popleft()
            fn(arg)
        if due:
            wait = due[0][0] - now
            self._timers[delay_s] = loop.call_later(
                wait if self._slack else max(wait, 0.001), self._fire, delay_s, loop
            )
        else:
            del self._timers[delay_s]
            del self._due[delay_s]


class _Beat:
    """A stream's next heartbeat: the timer entry that wakes its sender. Only the latest
    armed generation wakes it (a beat sent early, on a wake-up for events, leaves an
    older entry behind); a closed stream leaves only this and its signal in the list."""

    __slots__ = ("generation", "signal")

    def __init__(self, signal: _Signal) -> None:
        self.signal = signal
        self.generation = 0

    def ring(self, generation: int) -> None:
        if generation == self.generation:
            self.signal.set()


class _Waker:
    """What a stream's subscriber calls when its queue gains something.

    With a batch delay, the first events after the stream sent (or was idle) are held:
    the waker asks the flusher for a wake-up at the delay's end instead of waking the
    sender, so the batch fills up meanwhile. It wakes the sender at once when the batch
    is full (``max_events``), the VM is gone, or the disconnect policy fired; Unwatch and
    shutdown wake it directly. Without a delay every call wakes the sender."""

    __slots__ = ("delay_s", "event", "flusher", "generation", "held", "max_events", "sub")

    def __init__(
        self, event: _Signal | asyncio.Event, flusher: _Flusher, delay_s: float, max_events: int
    ) -> None:
        self.event = event
        self.flusher = flusher
        self.delay_s = delay_s
        self.max_events = max_events
        self.sub: Subscriber | None = None
        self.held = False  #: events wait for the delay's end
        self.generation = 0  #: which hold a flusher entry belongs to

    def must_go(self, sub: Subscriber) -> bool:
        return (
            sub.depth >= self.max_events or sub.node is None or sub.overflowed_lag is not None
        )

    def __call__(self) -> None:
        sub = self.sub
        if sub is None or not self.delay_s:
            self.event.set()
        elif self.must_go(sub):
            self.release(self.generation)
        elif not self.held:
            self.held = True
            self.flusher.hold(self, self.delay_s)

    def release(self, generation: int) -> None:
        """End the hold (if ``generation`` is the current one) and wake the sender."""
        if generation == self.generation:
            self.held = False
            self.generation += 1
            self.event.set()


class _Stream:
    """State of one open Watch stream."""

    def __init__(self, entry: VmEntry, sub: Subscriber, wake: _Signal) -> None:
        self.entry = entry
        self.sub = sub
        self.wake = wake
        self.beat = _Beat(wake)
        self.unwatched = False
        self.registered_ns = time.time_ns()
        self.lease_id = ""
        self.waker: _Waker | None = None


class WatchService(pbg.WatchServiceServicer):
    """Remote notifiers."""

    def __init__(self, engine: Engine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits
        #: (tenant, vm, notifier id) -> open stream
        self.streams: dict[tuple[str, str, int], _Stream] = {}
        self._flusher = _Flusher()
        self._beats = _Flusher(slack_s=0.0)

    @streaming
    async def Watch(
        self, request: pb.WatchRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchResponse]:
        engine = self.engine
        tenant = current_caller.get().tenant
        entry = engine.vm(tenant, request.vm)
        opts = _options(request, self.limits)
        self._check(request, entry, tenant)
        lease = engine.stream_lease(tenant)
        try:  # nothing below may leave the stream's lease behind
            stream = self._stream(request, entry, tenant, opts, lease.owner, context.peer())
            start_seq = request.start_seq if request.HasField("start_seq") else None
            notifier_id, compacted_gap = self._subscribe(
                entry, stream.sub, start_seq, request.allow_compacted)
        except BaseException:
            engine.leases.end(lease)
            raise
        stream.lease_id = lease.lease_id
        key = (tenant, entry.name, notifier_id)
        self.streams[key] = stream
        try:
            yield pb.WatchResponse(registered=pb.Registered(
                notifier_id=notifier_id,
                head_seq=entry.vm.seq,
                oldest_seq=max(entry.hub.history.oldest_seq, 1),
                start_seq=start_seq if start_seq is not None else entry.vm.seq + 1,
                lease_id=lease.lease_id,
                max_batch_events=opts.max_events,
                max_batch_bytes=opts.max_bytes,
                max_batch_delay_ms=opts.delay_ms,
                queue_limit=opts.queue_limit,
                queue_bytes=opts.queue_bytes,
                policy=cv.POLICY_PB[opts.policy],
                block_timeout_ms=opts.block_ms,
                heartbeat_interval_ms=opts.heartbeat_ms,
                incarnation=engine.incarnation,
            ))
            if compacted_gap is not None:
                yield pb.WatchResponse(gap=compacted_gap)
            async for msg in self._deliver(stream, opts.max_events, opts.max_bytes,
                                           opts.heartbeat_ms, request.omit_data):
                yield msg
        finally:
            self.streams.pop(key, None)
            if stream.sub.node is not None and not entry.vm.closed:
                engine.unsubscribe(entry, stream.sub)
            engine.leases.end(lease)

    def _check(self, request: pb.WatchRequest, entry: VmEntry, tenant: TenantId) -> None:
        """Refuse a filter or start the stream cannot have, before anything is made."""
        lim = self.limits
        if len(request.gfn_ranges) > lim.max_filter_ranges:
            raise InvalidArgument(
                f"{len(request.gfn_ranges)} gfn_ranges; at most {lim.max_filter_ranges}"
            )
        for s in request.sources:
            cv.enum_value(cv.SOURCES, s, "sources", allow_unset=False)
        for m in request.modes:
            cv.enum_value({pb.TRACK_MODE_WRITE: 1}, m, "modes", allow_unset=False)
        if len(request.owner_leases) > 64:
            raise InvalidArgument(f"{len(request.owner_leases)} owner_leases; at most 64")
        for lease_id in request.owner_leases:
            self.engine.leases.get(tenant, lease_id)
        if request.owner_leases and not request.only_owned:
            raise InvalidArgument("owner_leases needs only_owned")
        vm = entry.vm
        for r in request.gfn_ranges:
            if r.count < 1 or r.start + r.count > vm.limits.gfn_limit:
                raise InvalidArgument(
                    f"gfn_ranges start={r.start:#x} count={r.count}: count must be >= 1 and"
                    f" the range inside the VM's {vm.limits.gfn_bits}-bit gfn space"
                )
        if request.HasField("start_seq") and request.start_seq > vm.seq + 1:
            raise OutOfRange(
                f"start_seq {request.start_seq} is in the future: the VM's last seq is"
                f" {vm.seq}, so resume from at most {vm.seq + 1}"
            )

    def _stream(
        self, request: pb.WatchRequest, entry: VmEntry, tenant: TenantId, opts: _WatchOptions,
        stream_owner: str, peer: str,
    ) -> _Stream:
        """The stream's filter, subscriber and waker (not yet subscribed)."""
        owner = None
        if request.only_owned:
            # One owner filter per stream: its own lease, or the first named lease.
            owner = (
                self.engine.leases.get(tenant, request.owner_leases[0]).owner
                if request.owner_leases else stream_owner
            )
        flt = make_filter(
            cv.gfn_ranges(request.gfn_ranges),
            [cv.SOURCES[s] for s in request.sources],
            owner,
            [canonical_name(p) for p in request.plugins],
            request.only_findings,
        )
        wake = _Signal(asyncio.get_running_loop())
        waker = _Waker(wake, self._flusher, opts.delay_ms / 1000, opts.max_events)
        sub = Subscriber(
            name=f"watch:{peer}", flt=flt, queue_limit=opts.queue_limit, policy=opts.policy,
            wake=waker, block_timeout_s=opts.block_ms / 1000, queue_bytes=opts.queue_bytes,
        )
        waker.sub = sub
        stream = _Stream(entry, sub, wake)
        stream.waker = waker
        return stream

    def _subscribe(
        self, entry: VmEntry, sub: Subscriber, start_seq: int | None, allow_compacted: bool
    ) -> tuple[int, pb.Gap | None]:
        """Subscribe from ``start_seq``; with ``allow_compacted``, a start before the
        history's oldest event subscribes from that one, with the Gap(COMPACTED) to send
        first."""
        try:
            return self.engine.subscribe(entry, sub, start_seq), None
        except Compacted as exc:
            if not allow_compacted or start_seq is None:
                raise
            gap = pb.Gap(
                first_seq=start_seq, last_seq=exc.oldest_seq - 1,
                count=exc.oldest_seq - start_seq, reason=pb.GAP_REASON_COMPACTED,
            )
            return self.engine.subscribe(entry, sub, exc.oldest_seq), gap

    async def _deliver(
        self,
        stream: _Stream,
        max_events: int,
        max_bytes: int,
        heartbeat_ms: int,
        omit_data: bool,
    ) -> AsyncIterator[pb.WatchResponse]:
        sub = stream.sub
        vm = stream.entry.vm
        shutdown = self.engine.shutting_down
        heartbeat_s = heartbeat_ms / 1000
        next_beat = time.monotonic() + heartbeat_s
        beat, beats = stream.beat, self._beats
        beats.after(heartbeat_s, beat.ring, beat.generation)
        while True:
            if shutdown.is_set():
                raise Unavailable("pagetrackd is shutting down; reconnect and resume from the"
                                  f" last seq you saw ({sub.last_seq})")
            if sub.overflowed_lag is not None:
                raise ResourceExhausted(
                    f"stream fell {sub.overflowed_lag} events behind its queue limit"
                    f" {sub.queue_limit} (policy disconnect); last seq delivered {sub.last_seq}",
                    quota="queue_limit", limit=sub.queue_limit,
                )
            if not sub.pending:
                if stream.unwatched or sub.node is None:
                    reason = pb.CLOSE_REASON_UNWATCHED if stream.unwatched else (
                        pb.CLOSE_REASON_VM_DELETED
                    )
                    yield pb.WatchResponse(closed=pb.Closed(reason=reason, last_seq=sub.last_seq))
                    return
                await self._sleep(stream, next_beat)
            elif self._holding(stream):
                # the batch fills up until the flusher (or a full batch) wakes the stream
                await self._sleep(stream, next_beat)
            if sub.pending and not self._holding(stream):
                budget = max(1, min(max_events, max_bytes // 8))
                for msg in _messages(sub.take(budget), vm, max_events, max_bytes, omit_data):
                    yield msg
                if sub.policy is SlowPolicy.BLOCK and not sub.full:
                    stream.entry.wake_room()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + heartbeat_s
                beat.generation += 1
                beats.after(heartbeat_s, beat.ring, beat.generation)
                yield _progress(sub, vm)

    @staticmethod
    async def _sleep(stream: _Stream, next_beat: float) -> None:
        """Until the stream is woken: events, its heartbeat's timer, the end. Not at all
        once the beat is due: its timer may have rung while the stream was away sending
        (a slow reader), and that wake-up is what this clears."""
        stream.wake.clear()
        if time.monotonic() < next_beat:
            await stream.wake.wait()

    def _holding(self, stream: _Stream) -> bool:
        """Whether the stream's events wait for its batch delay to end."""
        waker = stream.waker
        return (
            waker is not None and waker.held and not waker.must_go(stream.sub)
            and not stream.unwatched and not self.engine.shutting_down.is_set()
        )

    @unary
    async def Unwatch(self, request: pb.UnwatchRequest, context: Ctx) -> pb.UnwatchResponse:
        tenant = current_caller.get().tenant
        entry = self.engine.vm(tenant, request.vm)
        stream = self.streams.get((tenant, entry.name, request.notifier_id))
        if stream is None:
            raise NotifierNotFound(
                f"no open Watch stream with notifier_id {request.notifier_id}",
                name=str(request.notifier_id),
            )
        # Unregister now: once this call returns, no event is queued for the stream.
        self.engine.unsubscribe(entry, stream.sub)
        stream.unwatched = True
        stream.wake.set()
        return pb.UnwatchResponse(last_seq=entry.vm.seq)

    @unary
    async def ListNotifiers(
        self, request: pb.ListNotifiersRequest, context: Ctx
    ) -> pb.ListNotifiersResponse:
        tenant = current_caller.get().tenant
        entry = self.engine.vm(tenant, request.vm)
        out = []
        plugin_names = {f"{k}" for k in entry.plugins}
        for node in entry.vm.notifiers.nodes():
            n = node.notifier
            if n is entry.hub.history:
                continue
            stream = self.streams.get((tenant, entry.name, node.node_id))
            if stream is not None:
                s = stream.sub
                out.append(
                    pb.NotifierInfo(
                        notifier_id=node.node_id, kind=pb.NOTIFIER_KIND_WATCH, name=s.name,
                        registered_at_ns=stream.registered_ns, policy=cv.POLICY_PB[s.policy],
                        queue_depth=s.depth, queue_limit=s.queue_limit,
                        lag=max(0, entry.vm.seq - s.last_seq), sent_total=s.counters.sent,
                        dropped_total=s.counters.dropped,
                        coalesced_total=s.counters.coalesced, lease_id=stream.lease_id,
                    )
                )
            else:
                kind = pb.NOTIFIER_KIND_PLUGIN if n.name in plugin_names else (
                    pb.NOTIFIER_KIND_UNSPECIFIED
                )
                out.append(pb.NotifierInfo(notifier_id=node.node_id, kind=kind, name=n.name))
        return pb.ListNotifiersResponse(notifiers=out)
