"""Every seq of a VM reaches JetStream once, in order, whatever is killed meanwhile."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pagetrack.client import AsyncClient
from pagetrack.export import ExportConfig, Exporter
from tests.daemon_process import DaemonProcess, start_daemon
from tests.export.conftest import tracked_vm, write_events
from tests.export.support import (
    ExporterProcess,
    NatsServer,
    Record,
    connect,
    eventually,
    free_port,
    read_vm,
    tiling,
)


async def _exported_through(url: str, tenant: str, vm: str, head: int) -> list[Record]:
    """Wait until JetStream covers seqs 1..head of the VM; return its records."""
    nc, js = await connect(url)
    try:
        records: list[Record] = []

        async def covered() -> bool:
            nonlocal records
            records = await read_vm(js, tenant, vm)
            return tiling(records).next_seq > head

        await eventually(covered, f"seqs 1..{head} of {vm} in JetStream")
        return records
    finally:
        await nc.close()


async def _tenant(client: AsyncClient, vm: str) -> str:
    return (await client.get_vm(vm)).tenant


async def test_exporter_publishes_every_seq_once(
    client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    vm = await tracked_vm(client, "exp-basic")
    head = await write_events(client, vm, 300)
    stop = asyncio.Event()
    exporter = Exporter(ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,),
                                     max_batch_events=64).with_overrides(stream_create=True))
    task = asyncio.create_task(exporter.run(stop))
    try:
        tenant = await _tenant(client, vm)
        head = await write_events(client, vm, 500, start=300)
        records = await _exported_through(nats_server.url, tenant, vm, head)
        t = tiling(records)
        assert t.events == head == 800 and not t.gaps
        assert records[0].headers["Nats-Msg-Id"].endswith(f".e.1-{records[0].last}")
    finally:
        stop.set()
        await task


async def test_exporter_sigkill_loop(
    tmp_path: Path, client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    vm = await tracked_vm(client, "exp-kill")
    tenant = await _tenant(client, vm)
    exporter = ExporterProcess(tmp_path, daemon.tcp, nats_server.url, "--max-inflight", "4")
    nc, js = await connect(nats_server.url)
    head = 0
    try:
        for round_ in range(5):
            exporter.start()
            head = await write_events(client, vm, 400, start=head)
            seen = len(await read_vm(js, tenant, vm))

            async def progressed(seen: int = seen) -> bool:
                return len(await read_vm(js, tenant, vm)) > seen

            await eventually(progressed, f"round {round_}: the exporter publishes")
            exporter.kill()  # mid-stream: some of the 400 are published, some not
        exporter.start()
        records = await _exported_through(nats_server.url, tenant, vm, head)
        t = tiling(records)
        assert t.events == head and not t.gaps
    finally:
        await nc.close()
        exporter.stop()


async def test_nats_restart(
    tmp_path: Path, client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    vm = await tracked_vm(client, "exp-nats")
    tenant = await _tenant(client, vm)
    stop = asyncio.Event()
    exporter = Exporter(ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,),
                                     retry_max_s=0.5).with_overrides(stream_create=True))
    task = asyncio.create_task(exporter.run(stop))
    head = 0
    try:
        async def connected() -> bool:
            return exporter.sessions > 0

        await eventually(connected, "the exporter connects to NATS")
        for _ in range(3):
            sessions = exporter.sessions
            head = await write_events(client, vm, 500, start=head)

            async def publishing(sessions: int = sessions) -> bool:
                return exporter.sessions == sessions and any(
                    p.exported_seq > 0 for p in exporter.pumps.values())

            await eventually(publishing, "the exporter publishes")
            nats_server.kill()
            head = await write_events(client, vm, 300, start=head)  # while NATS is away
            nats_server.start()

            async def reconnected(sessions: int = sessions) -> bool:
                return exporter.sessions > sessions

            await eventually(reconnected, "the exporter reconnects to NATS")
        records = await _exported_through(nats_server.url, tenant, vm, head)
        t = tiling(records)
        assert t.events == head and not t.gaps
    finally:
        stop.set()
        await task


async def test_daemon_restart_with_state_dir(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    d = start_daemon(tmp_path, "--state-dir", str(state), listen=(listen,))
    exporter = ExporterProcess(tmp_path, listen, nats_server.url)
    exporter.start()
    head = 0
    try:
        async with AsyncClient(listen) as client:
            vm = await tracked_vm(client, "exp-restart")
            tenant = await _tenant(client, vm)
            head = await write_events(client, vm, 700)
        for _ in range(2):
            assert d.stop() == 0
            d = start_daemon(tmp_path, "--state-dir", str(state), listen=(listen,))
            async with AsyncClient(listen) as client:
                head = await write_events(client, vm, 500, start=head)
        records = await _exported_through(nats_server.url, tenant, vm, head)
        t = tiling(records)
        assert t.events == head and not t.gaps
        assert exporter.proc is not None and exporter.proc.poll() is None
    finally:
        exporter.stop()
        d.stop()
