"""The exporter: finds the tenant's VMs by polling ListVms and runs one pump per VM over a
NATS connection; when that connection is lost, every pump stops and all start again on a
new one, from JetStream's position."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pagetrack.client import AsyncClient, Backoff
from pagetrack.errors import PageTrackError
from pagetrack.export.config import ExportConfig
from pagetrack.export.metrics import ExportMetrics
from pagetrack.export.pump import VmPump, batch_limits
from pagetrack.export.sink import JetStreamSink

log = logging.getLogger("pagetrack.export")


class Exporter:
    """Runs until ``stop`` is set. ``pumps`` maps (tenant, vm) to the running pumps."""

    def __init__(self, config: ExportConfig, metrics: ExportMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ExportMetrics()
        self.pumps: dict[tuple[str, str], VmPump] = {}
        self.sessions = 0  #: NATS connections made
        self.on_session: Callable[[JetStreamSink], None] | None = None  #: for tests

    async def run(self, stop: asyncio.Event) -> None:
        """Connect to the daemon and NATS and export until ``stop`` is set."""
        c = self.config
        client = AsyncClient(c.target, token=c.bearer_token(), ca_file=c.ca_file,
                             backoff=Backoff(initial_s=0.1, max_s=c.retry_max_s))
        delay = c.retry_initial_s
        try:
            while not stop.is_set():
                sink = JetStreamSink(c)
                try:
                    await sink.connect()
                    await sink.ensure_stream()
                    batch_limits(sink.max_message, c.format, c.max_batch_events,
                                 c.max_batch_bytes)
                except PageTrackError:
                    await sink.close()  # a configuration that cannot work: say so, stop
                    raise
                except Exception as exc:  # NATS down or refusing: try again
                    log.warning("nats %s: %r; retrying", ",".join(c.nats_servers), exc)
                    await sink.close()
                    if await _wait(stop, delay):
                        return
                    delay = min(c.retry_max_s, delay * 2)
                    continue
                delay = c.retry_initial_s
                self.sessions += 1
                self.metrics.nats_connects.inc()
                if self.on_session is not None:
                    self.on_session(sink)
                try:
                    await self._session(client, sink, stop)
                finally:
                    await sink.close()
        finally:
            await client.close()

    async def _session(self, client: AsyncClient, sink: JetStreamSink,
                       stop: asyncio.Event) -> None:
        tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        ended = asyncio.ensure_future(_first(stop.wait(), sink.closed.wait()))
        try:
            while not ended.done():
                for key, task in list(tasks.items()):
                    if task.done():
                        del tasks[key]
                        self.pumps.pop(key, None)
                        self.metrics.forget(*key)
                        if not task.cancelled() and task.exception() is not None:
                            log.error("export %s/%s failed: %r", *key, task.exception())
                try:
                    vms = await client.list_vms()
                except PageTrackError as exc:
                    log.warning("cannot list VMs at %s: %s", client.target, exc)
                    vms = []
                for vm in vms:
                    key = (vm.tenant, vm.name)
                    if key in tasks or not self.config.wants(vm.name):
                        continue
                    pump = VmPump(client, sink, self.config, self.metrics, vm.tenant, vm.name)
                    self.pumps[key] = pump
                    tasks[key] = asyncio.create_task(pump.run(), name=f"export {key}")
                    log.info("exporting %s/%s", *key)
                self.metrics.vms.set(len(tasks))
                await asyncio.wait([ended], timeout=self.config.poll_interval_s)
        finally:
            ended.cancel()
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            self.pumps.clear()
            self.metrics.vms.set(0)


async def _first(*aws: Awaitable[object]) -> None:
    """Return when the first of the awaitables does."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
