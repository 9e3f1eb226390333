"""JetStream as the exporter sees it: one connection, the stream, each VM's stored position,
and publishes whose acks come back as futures.

The connection does not reconnect by itself: a NATS client that reconnects replays the
publishes it buffered while away, after the exporter may already have read the position
and resumed, so a lost connection ends this sink and the exporter starts a new one, from
what JetStream holds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from pagetrack.export.config import ExportConfig
from pagetrack.export.subjects import KINDS, Position, position, subject

if TYPE_CHECKING:
    from nats.aio.client import Client as Nats
    from nats.js import JetStreamContext
    from nats.js.api import PubAck

log = logging.getLogger("pagetrack.export")

class JetStreamSink:
    """A NATS connection with JetStream; ``closed`` is set when the connection is gone."""

    def __init__(self, config: ExportConfig) -> None:
        self.config = config
        self.closed = asyncio.Event()
        self.nc: Nats | None = None
        self._js: JetStreamContext | None = None

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
        self._js = self.nc.jetstream(timeout=c.ack_timeout_s,
                                     publish_async_max_pending=1 << 20)

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
                raise LookupError(
                    f"JetStream has no stream {s.name!r}; create it, or give --create-stream"
                )
            return
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
    ) -> asyncio.Future[PubAck]:
        """Send one message; the future is its ack (or the error JetStream answered)."""
        return await self.js.publish_async(subj, payload, headers=headers)
