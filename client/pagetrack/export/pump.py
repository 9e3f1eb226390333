"""One VM's export: read its position from JetStream, Watch from the next seq, publish
every record in order with a bounded window of unacked publishes.

Any failure (the daemon, NATS, an ack that does not come) ends the attempt; the next one
starts again from what JetStream holds, so nothing is published twice past the duplicate
window and nothing is skipped. While the window is full the pump does not read its Watch
stream, so the daemon's queue for it fills and the stream's slow-consumer policy applies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import grpc

from pagetrack import errors
from pagetrack.client import AsyncClient
from pagetrack.export.config import ExportConfig
from pagetrack.export.metrics import ExportMetrics
from pagetrack.export.sink import Ack, JetStreamSink
from pagetrack.export.subjects import H_GAP_REASON, Encoder, Position, subject
from pagetrack.v1 import pagetrack_pb2 as pb

log = logging.getLogger("pagetrack.export")

_POLICY = {
    "block": pb.SLOW_CONSUMER_POLICY_BLOCK,
    "drop": pb.SLOW_CONSUMER_POLICY_DROP,
    "disconnect": pb.SLOW_CONSUMER_POLICY_DISCONNECT,
}


#: bytes a batch's event costs besides its data: protobuf columns (seq, gpa and timestamp
#: fixed64, length, vcpu and flags varints), or a JSON line's keys and numbers
_EVENT_BYTES = {"protobuf": 48, "jsonl": 200}
_HEADROOM = 4096  #: headers and framing of one message
_MAX_WRITE = 4096  #: the largest single write's data: every batch must take one


def batch_limits(
    max_message: int, fmt: str, events: int | None, data_bytes: int | None
) -> tuple[int, int]:
    """max_batch_events and max_batch_bytes for the Watch such that every batch, encoded,
    fits one NATS message of ``max_message`` bytes (8192 events by default)."""
    per_event = _EVENT_BYTES[fmt]
    factor = 4 / 3 if fmt == "jsonl" else 1.0  # base64
    room = max_message - _HEADROOM
    most_events = int((room - _MAX_WRITE * factor) // per_event)
    if most_events < 1:
        raise errors.InvalidArgument(
            f"NATS messages of {max_message} bytes cannot hold one {_MAX_WRITE}-byte write;"
            " raise max_payload / max_msg_size"
        )
    n = max(1, min(events or 8192, most_events))
    data = int((room - n * per_event) / factor)
    return n, max(_MAX_WRITE, min(data_bytes or data, data))


class Retry(Exception):
    """This attempt ended; start again from JetStream's position."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(slots=True)
class _Sent:
    """A publish awaiting its ack, and what it stores."""

    ack: asyncio.Future[Ack]
    kind: str
    last_seq: int  #: newest seq it covers (events, gaps), else 0
    events: int
    gap_reason: str
    size: int


class _Window:
    """Publishes awaiting their acks, in order, and room for at most ``size`` of them."""

    def __init__(self, size: int) -> None:
        self.sent: deque[_Sent] = deque()
        self.room = asyncio.Semaphore(size)
        self.wake = asyncio.Event()
        self.closed = False  #: no more publishes: the ack loop ends once all are settled


class VmPump:
    """Exports one VM of one tenant until the VM is deleted or the pump is cancelled."""

    def __init__(
        self,
        client: AsyncClient,
        sink: JetStreamSink,
        config: ExportConfig,
        metrics: ExportMetrics,
        tenant: str,
        vm: str,
    ) -> None:
        self.client = client
        self.sink = sink
        self.config = config
        self.metrics = metrics
        self.tenant = tenant
        self.vm = vm
        self.exported_seq = 0  #: newest seq acked as stored (events or gap)
        self.attempts = 0
        self._labels = (tenant, vm)
        self._subjects = {
            k: subject(config.subject_prefix, tenant, vm, k) for k in ("events", "gaps", "regions")
        }

    async def run(self) -> None:
        """Export until the VM is gone; a lost NATS connection ends the pump too (the
        exporter starts a new sink and new pumps)."""
        delay = self.config.retry_initial_s
        while True:
            self.attempts += 1
            before = self.exported_seq
            try:
                await self._attempt()
                return  # the VM was deleted
            except Retry as exc:
                self.metrics.restarts.labels(*self._labels, exc.cause).inc()
                log.warning("export %s/%s: %s; resuming from JetStream", self.tenant,
                            self.vm, exc)
            if self.sink.closed.is_set():
                return
            if self.exported_seq > before:
                delay = self.config.retry_initial_s  # it got somewhere: a fresh failure
            await asyncio.sleep(delay)
            delay = min(self.config.retry_max_s, delay * 2)

    def _request(self, start_seq: int) -> pb.WatchRequest:
        c = self.config
        events, data = batch_limits(self.sink.max_message, c.format, c.max_batch_events,
                                    c.max_batch_bytes)
        req = pb.WatchRequest(vm=self.vm, start_seq=start_seq, allow_compacted=True,
                              policy=_POLICY[c.policy], max_batch_events=events,
                              max_batch_bytes=data)
        for key in ("queue_limit", "block_timeout_ms", "max_batch_delay_ms"):
            value = getattr(c, key)
            if value is not None:
                setattr(req, key, value)
        if c.policy != "block":
            req.ClearField("block_timeout_ms")
        return req

    async def _attempt(self) -> None:
        try:
            pos = await self.sink.position(self.tenant, self.vm)
        except Exception as exc:  # NATS errors have no common base worth naming
            raise Retry("nats", f"cannot read the position from JetStream: {exc!r}") from None
        self.exported_seq = pos.last_seq
        self.metrics.exported_seq.labels(*self._labels).set(pos.last_seq)
        call = self.client.watch_raw(self._request(pos.last_seq + 1))
        window = _Window(self.config.max_inflight)
        acker = asyncio.create_task(self._ack_loop(window))
        reader = asyncio.create_task(self._forward(call, pos, window))
        try:
            done, _ = await asyncio.wait({acker, reader}, return_when=asyncio.FIRST_COMPLETED)
            if acker in done:
                acker.result()  # raises the Retry that ended it
            await reader  # the VM was deleted: wait for the last acks
            window.closed = True
            window.wake.set()
            await acker
        except grpc.RpcError as err:
            failure = errors.from_rpc_error(err)
            if isinstance(failure, errors.NotFound):
                log.info("export %s/%s: the VM is gone", self.tenant, self.vm)
                return
            raise Retry("daemon", f"Watch ended: {failure}") from None
        finally:
            call.cancel()
            for task in (reader, acker):
                task.cancel()
            await asyncio.gather(reader, acker, return_exceptions=True)
            for sent in window.sent:
                sent.ack.cancel()
            self.metrics.inflight.labels(*self._labels).set(0)

    async def _forward(self, call: Any, pos: Position, window: _Window) -> None:
        enc = Encoder(self.tenant, self.vm, self.config.format)
        region_at, region_index = -1, -1
        stall: float | None = 30.0
        while True:
            try:
                async with asyncio.timeout(stall):
                    resp = await call.read()
            except TimeoutError:
                raise Retry("daemon", f"no message from the daemon for {stall:.0f} s") from None
            if resp is grpc.aio.EOF:
                raise Retry("daemon", "the daemon ended the stream")
            kind = resp.WhichOneof("kind")
            if kind == "events":
                batch = resp.events
                if not batch.seq or batch.seq[-1] <= self.exported_seq:
                    continue
                head, payload = enc.events(batch)
                self.metrics.head_seq.labels(*self._labels).set(batch.head_seq)
                await self._send(window, "events", payload, head, batch.seq[-1], len(batch.seq))
            elif kind == "gap":
                gap = resp.gap
                if gap.reason == pb.GAP_REASON_COALESCED:
                    raise Retry("daemon", "the stream coalesced events; refusing to export")
                head, payload = enc.gap(gap)
                await self._send(window, "gaps", payload, head, gap.last_seq, gap.count)
            elif kind == "region_removed":
                rec = resp.region_removed
                if rec.at_seq == region_at:
                    region_index += 1
                else:
                    region_at, region_index = rec.at_seq, 0
                if pos.region_done(region_at, region_index):
                    continue  # replayed from the history, already stored
                head, payload = enc.region(rec, region_index)
                await self._send(window, "regions", payload, head, 0, 0)
            elif kind == "progress":
                self.metrics.head_seq.labels(*self._labels).set(resp.progress.head_seq)
                self.metrics.lag.labels(*self._labels).set(
                    max(0, resp.progress.head_seq - self.exported_seq))
            elif kind == "registered":
                reg = resp.registered
                enc.incarnation = str(getattr(reg, "incarnation", "") or "")
                stall = 3 * reg.heartbeat_interval_ms / 1000 + 2.0
                self.metrics.head_seq.labels(*self._labels).set(reg.head_seq)
            elif kind == "closed":
                if resp.closed.reason == pb.CLOSE_REASON_VM_DELETED:
                    return
                raise Retry("daemon", "the stream was unwatched")

    async def _send(self, window: _Window, kind: str, payload: bytes, headers: dict[str, str],
                    last_seq: int, events: int) -> None:
        if window.room.locked():
            t0 = time.monotonic()
            await window.room.acquire()
            self.metrics.ack_wait.labels(*self._labels).inc(time.monotonic() - t0)
        else:
            await window.room.acquire()
        try:
            ack = await self.sink.publish(self._subjects[kind], payload, headers)
        except BaseException:
            window.room.release()
            raise
        reason = headers.get(H_GAP_REASON, "")
        window.sent.append(_Sent(ack, kind, last_seq, events, reason, len(payload)))
        window.wake.set()
        self.metrics.inflight.labels(*self._labels).set(len(window.sent))

    async def _ack_loop(self, window: _Window) -> None:
        """Settle acks in publish order; a refusal or a late ack ends the attempt."""
        while True:
            while not window.sent:
                if window.closed:
                    return
                window.wake.clear()
                await window.wake.wait()
            sent = window.sent[0]
            try:
                await asyncio.wait_for(asyncio.shield(sent.ack), self.config.ack_timeout_s)
            except TimeoutError:
                raise Retry("nats", f"no ack from JetStream in {self.config.ack_timeout_s} s")\
                    from None
            except asyncio.CancelledError:
                if sent.ack.cancelled():
                    raise Retry("nats", "the NATS connection is gone") from None
                raise
            except Exception:
                pass  # _settled raises it with its cause
            window.sent.popleft()
            window.room.release()
            self._settled(sent)
            self.metrics.inflight.labels(*self._labels).set(len(window.sent))

    def _settled(self, sent: _Sent) -> None:
        exc = sent.ack.exception()
        if exc is not None:
            raise Retry("nats", f"JetStream refused a publish: {exc!r}")
        labels = self._labels
        if sent.ack.result().duplicate:  # stored before: counted then
            self.metrics.duplicates.labels(*labels).inc()
        else:
            self.metrics.messages.labels(*labels, sent.kind).inc()
            self.metrics.bytes.labels(*labels).inc(sent.size)
            if sent.kind == "events":
                self.metrics.events.labels(*labels).inc(sent.events)
            elif sent.kind == "gaps":
                self.metrics.gap_events.labels(*labels, sent.gap_reason).inc(sent.events)
        if sent.last_seq > self.exported_seq:
            self.exported_seq = sent.last_seq
            self.metrics.exported_seq.labels(*labels).set(sent.last_seq)
