"""The consumer examples of docs/export.md, in Python and in Node.js, read what the
exporter stored and print the same records."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import pytest

from pagetrack.client import AsyncClient
from pagetrack.export import ExportConfig, Exporter
from tests.daemon_process import DaemonProcess
from tests.export.conftest import tracked_vm, write_events
from tests.export.support import NatsServer, eventually
from tests.node_tools import ROOT, npm_ci

EXAMPLES = ROOT / "examples" / "export"


async def _export(client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer,
                  fmt: str) -> tuple[str, int]:
    vm = await tracked_vm(client, f"consumed-{fmt}", history_events=64)
    stop = asyncio.Event()
    exporter = Exporter(ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,),
                                     format=fmt, max_batch_events=50,
                                     ).with_overrides(stream_create=True))
    head = await write_events(client, vm, 200)  # the ring holds 64: a gap, then events
    await client.set_memory_region(vm, 1, 0x400, 1)
    await client.delete_memory_region(vm, 1)
    head = await write_events(client, vm, 30, start=200)
    task = asyncio.create_task(exporter.run(stop))
    try:
        async def done() -> bool:
            return any(p.exported_seq >= head for p in exporter.pumps.values())

        await eventually(done, "the export")
    finally:
        stop.set()
        await task
    return vm, head


def _python_consumer(url: str, subject: str, until: int) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "consumer.py"), url, subject, "--until", str(until)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _node_consumer(url: str, subject: str, until: int) -> list[str]:
    app = EXAMPLES / "node"
    npm_ci(app)  # from its lockfile, as `make tools` does; fails loudly without npm
    node = shutil.which("node")
    assert node is not None
    out = subprocess.run([node, "consumer.mjs", url, subject, str(until)], cwd=app,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("fmt", ["protobuf", "jsonl"])
async def test_python_and_node_consumers_read_the_same_records(
    fmt: str, client: AsyncClient, daemon: DaemonProcess,
    nats_server: NatsServer,
) -> None:
    vm, head = await _export(client, daemon, nats_server, fmt)
    subject = f"pagetrack.default.{vm}.>"
    py = await asyncio.to_thread(_python_consumer, nats_server.url, subject, head)
    assert py[0].startswith(f"{vm} gap 1..") and " COMPACTED (" in py[0]
    assert f"{vm} region removed at seq 200" in py
    assert py[-1].startswith(f"{vm} events ") and py[-1].split()[2].endswith(f"..{head}")
    js = await asyncio.to_thread(_node_consumer, nats_server.url, subject, head)
    assert js == py
