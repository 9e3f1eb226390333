"""Run the exporter as a program: logging, the metrics endpoint, SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from pagetrack.export.config import ExportConfig
from pagetrack.export.exporter import Exporter


def run_exporter(config: ExportConfig) -> None:
    """Export until SIGTERM or SIGINT; each stops it cleanly (pending acks are awaited
    no longer: what JetStream stored is where the next run resumes)."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exporter = Exporter(config)
    if config.metrics_port is not None:
        port = exporter.metrics.serve(config.metrics_host, config.metrics_port)
        logging.getLogger("pagetrack.export").info(
            "metrics on http://%s:%d/metrics", config.metrics_host, port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await exporter.run(stop)

    asyncio.run(main())
