"""JetStream as the exporter sees it: one connection, the stream, each VM's stored position,
and publishes whose acks come back as futures.

The connection does not reconnect by itself: a NATS client that reconnects replays the
publishes it buffered while away, after the exporter may already have read the position
and resumed, so a lost connection ends this sink and the exporter starts a new one, from
what JetStream holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagetrack import errors
from pagetrack.export.config import ExportConfig
from pagetrack.export.subjects import KINDS, Position, position, subject

if TYPE_CHECKING:
    from nats.aio.client import Client as Nats
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

log = logging.getLogger("pagetrack.export")


@dataclass(frozen=True, slots=True)
class Ack:
    """JetStream stored a message: in which stream, at which stream seq, and whether it
    was a duplicate (its Nats-Msg-Id seen within the duplicate window)."""

    stream: str
    seq: int
    duplicate: bool


class PublishRefused(Exception):
    """JetStream did not store a message, and said why."""

class JetStreamSink:
    """A NATS connection with JetStream; ``closed`` is set when the connection is gone."""

    def __init__(self, config: ExportConfig) -> None:
        self.config = config
        self.closed = asyncio.Event()
        self._acks: dict[str, asyncio.Future[Ack]] = {}
        self._next = 0
        self._inbox = ""
        self.nc: Nats | None = None
        self._js: JetStreamContext | None = None
        #: largest message NATS and the stream take, bytes (known once connected)
        self.max_message = 1 << 20

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "connect() first"
        return self._js

    async def connect(self) -> None:
        """Connect once (no automatic reconnects); raises when NATS cannot be reached."""
        import nats  # lazy: ``pagetrack --help`` does not load the NATS client

        c = self.config

        async def on_closed() -> None:
            self.closed.set()

        async def on_error(exc: Exception) -> None:
            log.warning("nats: %s", exc)

        opts: dict[str, Any] = {}
        if c.nats_user is not None:
            opts["user"], opts["password"] = c.nats_user, c.nats_password
        if c.nats_token is not None:
            opts["token"] = c.nats_token
        if c.nats_creds is not None:
            opts["user_credentials"] = c.nats_creds
        self.nc = await nats.connect(
            list(c.nats_servers), allow_reconnect=False, connect_timeout=5,
            closed_cb=on_closed, disconnected_cb=on_closed, error_cb=on_error, **opts,
        )
        self._js = self.nc.jetstream(timeout=c.ack_timeout_s)
        self.max_message = self.nc.max_payload
        # Acks come to one wildcard inbox, each publish under its own token. (nats-py's
        # publish_async leaves a publish's future pending forever when JetStream answers
        # with an error, such as a full stream.)
        self._inbox = self.nc.new_inbox()
        await self.nc.subscribe(self._inbox + ".*", cb=self._on_ack)

    async def close(self) -> None:
        """Close the connection (pending acks are abandoned)."""
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
        self.closed.set()

    async def ensure_stream(self) -> None:
        """Create the stream (or update its limits) when asked; else check it exists."""
        from nats.js import api
        from nats.js.errors import NotFoundError

        s = self.config.stream
        jsm = self.js
        try:
            info = await jsm.stream_info(s.name)
        except NotFoundError:
            info = None
        if not s.create:
            if info is None:
                raise errors.FailedPrecondition(
                    f"JetStream has no stream {s.name!r}; create it, or give --create-stream"
                )
            if (info.config.max_msg_size or -1) > 0:
                self.max_message = min(self.max_message, info.config.max_msg_size or 0)
            return
        if s.max_msg_size > 0:
            self.max_message = min(self.max_message, s.max_msg_size)
        cfg = api.StreamConfig(
            name=s.name,
            subjects=[f"{self.config.subject_prefix}.>"],
            retention=api.RetentionPolicy(s.retention),
            storage=api.StorageType(s.storage),
            discard=api.DiscardPolicy(s.discard),
            max_age=s.max_age_s or None,
            max_bytes=s.max_bytes,
            max_msgs=s.max_msgs,
            max_msg_size=s.max_msg_size,
            duplicate_window=s.duplicate_window_s,
            num_replicas=s.replicas,
        )
        if info is None:
            await jsm.add_stream(cfg)
        else:
            cfg.subjects = sorted(set(info.config.subjects or ()) | set(cfg.subjects or ()))
            await jsm.update_stream(cfg)

    async def position(self, tenant: str, vm: str) -> Position:
        """What JetStream holds of the VM: the last message on each of its subjects."""
        from nats.js.errors import NotFoundError

        last: dict[str, dict[str, str] | None] = {}
        for kind in KINDS:
            subj = subject(self.config.subject_prefix, tenant, vm, kind)
            try:
                msg = await self.js.get_last_msg(self.config.stream.name, subj)
            except NotFoundError:
                last[kind] = None
                continue
            last[kind] = dict(msg.headers or {})
        return position(last)

    async def publish(
        self, subj: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[Ack]:
        """Send one message; the future is its ack, or the error JetStream answered."""
        assert self.nc is not None
        self._next += 1
        token = str(self._next)
        ack: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._acks[token] = ack
        ack.add_done_callback(lambda _: self._acks.pop(token, None))
        await self.nc.publish(subj, payload, reply=f"{self._inbox}.{token}", headers=headers)
        return ack

    async def _on_ack(self, msg: Msg) -> None:
        ack = self._acks.get(msg.subject.rpartition(".")[2])
        if ack is None or ack.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            ack.set_exception(PublishRefused("no stream takes this subject (no responders)"))
            return
        try:
            doc = json.loads(msg.data)
        except ValueError:
            ack.set_exception(PublishRefused(f"not a JetStream ack: {msg.data[:80]!r}"))
            return
        error = doc.get("error")
        if error:
            ack.set_exception(PublishRefused(
                f"{error.get('description', error)} (code {error.get('code')},"
                f" err_code {error.get('err_code')})"))
            return
        ack.set_result(Ack(str(doc.get("stream", "")), int(doc.get("seq", 0)),
                           bool(doc.get("duplicate", False))))
