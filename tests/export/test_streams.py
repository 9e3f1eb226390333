"""What the exported stream holds: gaps for what the daemon no longer had, region
records once, several consumers, new VMs, JSON lines, and tenants kept apart."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig
from prometheus_client.parser import text_string_to_metric_families

from pagetrack.client import AsyncClient
from pagetrack.export import ExportConfig, Exporter, Position
from pagetrack.export.sink import JetStreamSink, PublishRefused
from pagetrack.export.subjects import Encoder
from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.auth import hash_token
from tests.daemon_process import DaemonProcess, start_daemon
from tests.export.conftest import tracked_vm, write_events
from tests.export.support import (
    STREAM,
    ExporterProcess,
    NatsServer,
    connect,
    eventually,
    read_vm,
    tiling,
)


@asynccontextmanager
async def running(config: ExportConfig) -> AsyncIterator[Exporter]:
    """An exporter in this process, stopped (cleanly) on exit."""
    stop = asyncio.Event()
    exporter = Exporter(config.with_overrides(stream_create=True))
    task = asyncio.create_task(exporter.run(stop))
    try:
        yield exporter
    finally:
        stop.set()
        await task


async def exported(exporter: Exporter, vm: str, seq: int) -> None:
    """Wait until the exporter has JetStream's ack for ``seq`` of ``vm``."""
    async def done() -> bool:
        return any(p.vm == vm and p.exported_seq >= seq for p in exporter.pumps.values())

    await eventually(done, f"{vm} exported through seq {seq}")


async def test_gap_when_the_exporter_was_away_longer_than_the_ring(
    client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    vm = await tracked_vm(client, "exp-gap", history_events=64)
    config = ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,))
    async with running(config) as exporter:
        head = await write_events(client, vm, 50)
        await exported(exporter, vm, head)
    head = await write_events(client, vm, 500, start=50)  # the ring keeps the last 64 only
    async with running(config) as exporter:
        await exported(exporter, vm, head)
    nc, js = await connect(nats_server.url)
    try:
        records = await read_vm(js, "default", vm)
    finally:
        await nc.close()
    t = tiling(records)  # 1..550, each seq once, as an event or inside a gap
    assert t.next_seq == head + 1
    [(first, last, reason)] = t.gaps
    assert (first, reason) == (51, "COMPACTED")
    assert t.events == head - (last - first + 1) and last >= head - 64
    gap = next(r for r in records if r.kind == "gaps")
    assert int(gap.headers["Pagetrack-Count"]) == last - first + 1
    decoded = pb.Gap.FromString(gap.data)
    assert (decoded.first_seq, decoded.last_seq) == (first, last)


async def test_batches_of_large_writes_fit_the_nats_message_limit(
    client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    """600 page-sized writes are 2.4 MB of data, more than one 1 MB NATS message: the
    exporter asks the daemon for batches that fit."""
    vm = await tracked_vm(client, "exp-big")
    gpas = [(0x100 + i % 64) << 12 for i in range(600)]
    result = await client.write_batch(vm, gpas, bytes(4096 * 600))
    head = int(result.last_seq or 0)
    assert head == 600
    config = ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,))
    async with running(config) as exporter:
        await exported(exporter, vm, head)
        [pump] = exporter.pumps.values()
        assert pump.attempts == 1  # no publish was refused
    nc, js = await connect(nats_server.url)
    try:
        records = await read_vm(js, "default", vm)
    finally:
        await nc.close()
    assert tiling(records).events == head and len(records) >= 3
    assert all(len(r.data) <= 1 << 20 for r in records)


async def test_region_records_are_exported_once_across_restarts(
    client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    vm = await tracked_vm(client, "exp-region")
    await client.set_memory_region(vm, 1, 0x400, 4)
    config = ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,))
    async with running(config) as exporter:
        head = await write_events(client, vm, 20)
        await client.delete_memory_region(vm, 1)
        await client.set_memory_region(vm, 1, 0x400, 4)
        await client.delete_memory_region(vm, 1)  # two regions at one seq
        head = await write_events(client, vm, 20, start=20)
        await exported(exporter, vm, head)
    async with running(config) as exporter:  # replays the regions at seq 20: not again
        head = await write_events(client, vm, 20, start=40)
        await exported(exporter, vm, head)
    nc, js = await connect(nats_server.url)
    try:
        records = await read_vm(js, "default", vm)
    finally:
        await nc.close()
    regions = [r for r in records if r.kind == "regions"]
    assert [(r.headers["Pagetrack-At-Seq"], r.headers["Pagetrack-Region-Index"])
            for r in regions] == [("20", "0"), ("20", "1")]
    assert pb.RegionRemoved.FromString(regions[0].data).base_gfn == 0x400
    kinds = [r.kind for r in records]
    assert kinds.index("regions") == sum(1 for r in records if r.kind == "events"
                                         and r.last <= 20)
    assert tiling(records).next_seq == head + 1


async def test_two_consumers_read_one_subject_independently(
    client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    vm = await tracked_vm(client, "exp-fanout")
    config = ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,),
                          max_batch_events=16)
    async with running(config) as exporter:
        head = await write_events(client, vm, 200)
        await exported(exporter, vm, head)
    nc, js = await connect(nats_server.url)
    subject = f"pagetrack.default.{vm}.events"
    try:
        subs = [
            await js.pull_subscribe(subject, durable=name, stream=STREAM, config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT))
            for name in ("audit", "mirror")
        ]
        # "audit" reads and acks half; "mirror" is untouched by that and reads all.
        first = await subs[0].fetch(5, timeout=5)
        for msg in first:
            await msg.ack()
        seqs: dict[str, list[int]] = {"audit": [], "mirror": []}
        for name, sub in zip(("audit", "mirror"), subs, strict=True):
            got = first if name == "audit" else []
            while sum(len(pb.EventBatch.FromString(m.data).seq) for m in got) < head:
                batch = await sub.fetch(100, timeout=5)
                for msg in batch:
                    await msg.ack()
                got.extend(batch)
            seqs[name] = [s for m in got for s in pb.EventBatch.FromString(m.data).seq]
        assert seqs["audit"] == seqs["mirror"] == list(range(1, head + 1))
        infos = {n: await js.consumer_info(STREAM, n) for n in ("audit", "mirror")}
        assert all(i.num_pending == 0 for i in infos.values())
    finally:
        await nc.close()


async def test_new_vms_are_picked_up_by_pattern(
    client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    config = ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,),
                          patterns=("web-*",), vms=("db-main",), poll_interval_s=0.1,
                          format="jsonl")
    async with running(config) as exporter:
        web = await tracked_vm(client, "web-1")  # created after the exporter started
        db = await tracked_vm(client, "db-main")
        other = await tracked_vm(client, "db-other")
        for vm in (web, db, other):
            await write_events(client, vm, 30)
        await exported(exporter, web, 30)
        await exported(exporter, db, 30)
        assert {p.vm for p in exporter.pumps.values()} == {web, db}
    nc, js = await connect(nats_server.url)
    try:
        records = await read_vm(js, "default", web)
        assert not await read_vm(js, "default", other)
    finally:
        await nc.close()
    assert tiling(records).events == 30
    assert records[0].headers["Content-Type"] == "application/x-ndjson"
    line = records[0].data.decode().splitlines()[0]
    assert '"seq": 1' in line and '"data": "AAAAAAAAAAA="' in line


async def test_a_deleted_vm_ends_its_export(
    client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    config = ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,),
                          poll_interval_s=0.1)
    async with running(config) as exporter:
        vm = await tracked_vm(client, "exp-gone")
        await write_events(client, vm, 10)
        await exported(exporter, vm, 10)
        await client.delete_vm(vm)

        async def gone() -> bool:
            return not exporter.pumps

        await eventually(gone, "the deleted VM's pump ends")


async def test_a_tenants_exporter_sees_only_its_own_vms(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("".join(
        f'[[token]]\nsha256 = "{hash_token(t)}"\ntenant = "{n}"\nrole = "tenant"\n\n'
        for t, n in (("alice-secret", "alice"), ("bob-secret", "bob"))
    ))
    daemon = start_daemon(tmp_path, "--tokens-file", str(tokens))
    bob = ExporterProcess(tmp_path, daemon.tcp, nats_server.url, "--vm", "a-private",
                          "--vm", "b-own", token="bob-secret")
    bob.start()
    try:
        async with AsyncClient(daemon.tcp, token="alice-secret") as alice, \
                AsyncClient(daemon.tcp, token="bob-secret") as bob_client:
            await tracked_vm(alice, "a-private")
            await write_events(alice, "a-private", 40)
            await tracked_vm(bob_client, "b-own")
            head = await write_events(bob_client, "b-own", 40)
            nc, js = await connect(nats_server.url)
            try:
                async def bob_exported() -> bool:
                    return tiling(await read_vm(js, "bob", "b-own")).next_seq > head

                await eventually(bob_exported, "bob's VM in JetStream")
                await write_events(alice, "a-private", 40, start=40)
                info = await js.stream_info(STREAM, subjects_filter="pagetrack.>")
                assert set(info.state.subjects or {}) == {"pagetrack.bob.b-own.events"}
            finally:
                await nc.close()
    finally:
        assert bob.stop() == 0
        assert daemon.stop() == 0
    assert "alice" not in bob.log.read_text()


async def test_metrics_show_progress_and_published_counts(
    client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    vm = await tracked_vm(client, "exp-metrics")
    config = ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,),
                          max_batch_events=100)
    async with running(config) as exporter:
        port = exporter.metrics.serve("127.0.0.1", 0)
        head = await write_events(client, vm, 450)
        await exported(exporter, vm, head)

        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            return {
                s.name + str(sorted(s.labels.items())): s.value
                for f in text_string_to_metric_families(text.decode()) for s in f.samples
            }

        samples = await asyncio.to_thread(scrape)
    labels = str(sorted({"tenant": "default", "vm": vm}.items()))
    assert samples["pagetrack_export_events_total" + labels] == head
    assert samples["pagetrack_export_exported_seq" + labels] == head
    kinds = sorted({"kind": "events", "tenant": "default", "vm": vm}.items())
    assert samples["pagetrack_export_messages_total" + str(kinds)] >= 5
    assert samples["pagetrack_export_vms[]"] == 1


async def test_a_full_stream_holds_the_export_back_until_there_is_room(
    client: AsyncClient, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    """JetStream refuses publishes into a full discard-new stream: the export stops and
    retries from JetStream's position, and completes once the stream has room."""
    nc, js = await connect(nats_server.url)
    try:
        await js.add_stream(StreamConfig(name=STREAM, subjects=["pagetrack.>"], max_msgs=3,
                                         discard=DiscardPolicy.NEW))
        vm = await tracked_vm(client, "exp-full")
        config = ExportConfig(target=daemon.tcp, nats_servers=(nats_server.url,),
                              max_batch_events=50, retry_max_s=0.3)
        stop = asyncio.Event()
        exporter = Exporter(config)  # the stream exists: no --create-stream
        task = asyncio.create_task(exporter.run(stop))
        try:
            head = await write_events(client, vm, 500)

            async def refused() -> bool:
                pumps = list(exporter.pumps.values())
                return bool(pumps) and pumps[0].attempts >= 3

            await eventually(refused, "publishes refused by the full stream")
            assert len(await read_vm(js, "default", vm)) == 3
            await js.update_stream(StreamConfig(name=STREAM, subjects=["pagetrack.>"],
                                                max_msgs=-1, discard=DiscardPolicy.NEW))
            await exported(exporter, vm, head)
        finally:
            stop.set()
            await task
        t = tiling(await read_vm(js, "default", vm))
        assert t.events == head and not t.gaps
    finally:
        await nc.close()


async def test_a_repeated_publish_is_stored_once(nats_server: NatsServer) -> None:
    """The same batch published twice (a retry after a lost ack) has the same Nats-Msg-Id:
    JetStream stores it once and acks the repeat as a duplicate."""
    sink = JetStreamSink(ExportConfig(nats_servers=(nats_server.url,)).with_overrides(
        stream_create=True))
    await sink.connect()
    try:
        await sink.ensure_stream()
        batch = pb.EventBatch(seq=[1, 2], gpa=[0, 8], length=[8, 8], vcpu=[0, 0],
                              flags=[0, 0], timestamp_ns=[5, 6], data=bytes(16))
        headers, payload = Encoder("t", "vm.1", "protobuf").events(batch)
        subject = "pagetrack.t.vm%2E1.events"
        first = await (await sink.publish(subject, payload, dict(headers)))
        again = await (await sink.publish(subject, payload, dict(headers)))
        assert (first.duplicate, again.duplicate, again.seq) == (False, True, first.seq)
        assert await sink.position("t", "vm.1") == Position(last_seq=2)
        refused = await sink.publish("elsewhere.events", payload, dict(headers))
        with pytest.raises(PublishRefused, match="no stream takes this subject"):
            await refused
    finally:
        await sink.close()


def test_cli_says_when_the_stream_is_missing(
    tmp_path: Path, daemon: DaemonProcess, nats_server: NatsServer
) -> None:
    exe = Path(sys.executable).parent / "pagetrack"
    out = subprocess.run(
        [str(exe), "--target", daemon.tcp, "export", "nats", "--nats", nats_server.url,
         "--stream", "MISSING"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        "pagetrack: JetStream has no stream 'MISSING'; create it, or give --create-stream")
