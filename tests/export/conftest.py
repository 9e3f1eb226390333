"""Fixtures of the export tests: a nats-server with JetStream and a pagetrackd, both real
processes of this test alone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from pagetrack.client import AsyncClient
from tests.daemon_process import DaemonProcess, start_daemon
from tests.export.support import NatsServer

PAGES = 64
BASE_GFN = 0x100


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path)
    yield d
    assert d.stop() == 0


@pytest.fixture
async def client(daemon: DaemonProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(daemon.tcp) as c:
        yield c


async def tracked_vm(client: AsyncClient, name: str, history_events: int | None = None) -> str:
    """A VM whose slot 0 (64 pages) is write-tracked: every write there is one event."""
    await client.create_vm(name, history_events=history_events)
    await client.set_memory_region(name, 0, BASE_GFN, PAGES)
    await client.add_tracking(name, ranges=[(BASE_GFN, PAGES)])
    return name


async def write_events(client: AsyncClient, vm: str, n: int, start: int = 0) -> int:
    """``n`` guest writes of 8 bytes to tracked pages; returns the VM's head seq after."""
    i = np.arange(start, start + n, dtype=np.uint64)
    gpa = ((np.uint64(BASE_GFN) + i % np.uint64(PAGES)) << np.uint64(12)) + (i % 8) * 8
    data = np.repeat(i.astype(np.uint8), 8).tobytes()
    result = await client.write_batch(vm, gpa, data)
    return int(result.last_seq) if result.last_seq else 0
