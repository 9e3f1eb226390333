"""Run the exporter as a program: logging, the metrics endpoint, SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Iterable
from dataclasses import replace
from typing import Any

from pagetrack.export.config import ExportConfig
from pagetrack.export.exporter import Exporter
from pagetrack.export.metrics import ExportMetrics

log = logging.getLogger("pagetrack.export")
STOP_TIMEOUT_S = 10


def run_exporter(config: ExportConfig) -> None:
    """Export until SIGTERM or SIGINT; each stops it cleanly (pending acks are awaited
    no longer: what JetStream stored is where the next run resumes). A target of several
    comma-separated daemons exports the VMs of each."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = ExportMetrics()
    # Several daemons (--target a,b,c): one exporter each, sharing the metrics.
    exporters = [Exporter(replace(config, target=t.strip()), metrics)
                 for t in config.target.split(",") if t.strip()]
    if config.metrics_port is not None:
        port = metrics.serve(config.metrics_host, config.metrics_port)
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        running = asyncio.ensure_future(_all(e.run(stop) for e in exporters))
        stopping = asyncio.ensure_future(_after(stop))
        await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        try:
            # Nothing is lost by not waiting for a hung close: the next run resumes from
            # what JetStream holds.
            await asyncio.wait_for(running, STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("no clean stop within %d s; exiting", STOP_TIMEOUT_S)

    asyncio.run(main())


async def _all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*coros)


async def _after(event: asyncio.Event) -> None:
    await event.wait()
