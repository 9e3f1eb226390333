"""Events through the JetStream exporter next to a direct Watch, in the same run.

Run from the repository root with the project's venv (it starts its own pagetrackd and
nats-server, on a unix socket and a free loopback port)::

    .venv/bin/python bench/export.py

Per round, back to back: a writer pushes WriteGuestBatch calls (4096 tracked writes each,
4 in flight) into one VM, and one reader counts the events until the last one arrives:

* ``watch_events_per_s``: the reader Watches the VM directly;
* ``export_events_per_s``: ``pagetrack export nats`` (running all along, default block
  policy) Watches another VM and publishes to JetStream, and the reader is a JetStream
  pull consumer of that VM's events subject, decoding each EventBatch.

Both are events / (time from the writer's start to the reader's last event). After the
rounds the whole exported subject is read back and checked:

* ``export_lost_events``: seqs in 1..head that JetStream holds neither as an event nor
  inside a gap message (target 0); ``export_duplicate_events`` the seqs held twice (0);
* ``ratio_export_vs_watch`` last (target >= 0.5): the median over rounds of export / watch.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench helpers, also if loaded by path
from _procs import die_with_parent, dying_with_us  # noqa: E402

BATCH = 4096
IN_FLIGHT = 4
EVENTS = 250 * BATCH  #: events per run, in whole WriteGuestBatch calls
ROUNDS = 5
BIN = Path(sys.executable).parent
STREAM = "PAGETRACK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(what: str, ok: Any, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not ok():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


async def _setup_vm(target: str, name: str) -> None:
    from pagetrack.v1 import pagetrack_pb2 as pb
    from pagetrack.v1 import pagetrack_pb2_grpc as pbg

    async with grpc.aio.insecure_channel(target) as ch:
        await pbg.VmServiceStub(ch).CreateVm(pb.CreateVmRequest(name=name))
        await pbg.MemoryServiceStub(ch).SetMemoryRegion(
            pb.SetMemoryRegionRequest(vm=name, slot=0, npages=65536))
        await pbg.TrackingServiceStub(ch).AddTracking(
            pb.TrackingChangeRequest(vm=name, ranges=[pb.GfnRange(start=0, count=4096)]))


def _writer(target: str, name: str, events: int, out: Any) -> None:
    import uvloop

    die_with_parent()

    async def run() -> None:
        from pagetrack.v1 import pagetrack_pb2 as pb
        from pagetrack.v1 import pagetrack_pb2_grpc as pbg

        rng = np.random.default_rng(3)
        async with grpc.aio.insecure_channel(target) as ch:
            mem = pbg.MemoryServiceStub(ch)
            reqs = []
            for _ in range(8):
                gfn = rng.integers(0, 4096, BATCH)
                reqs.append(pb.WriteGuestBatchRequest(
                    vm=name, gpa=(gfn << 12).tolist(), vcpu=[0], length=[8] * BATCH,
                    data=b"\x5a" * 8 * BATCH))
            sem = asyncio.Semaphore(IN_FLIGHT)

            async def one(i: int) -> None:
                async with sem:
                    await mem.WriteGuestBatch(reqs[i % 8])

            out.put(time.time())
            await asyncio.gather(*(one(i) for i in range(events // BATCH)))

    uvloop.run(run())


def _watch_reader(target: str, name: str, last_seq: int, ready: Any, out: Any) -> None:
    import uvloop

    die_with_parent()

    async def run() -> None:
        from pagetrack.v1 import pagetrack_pb2 as pb
        from pagetrack.v1 import pagetrack_pb2_grpc as pbg

        async with grpc.aio.insecure_channel(target) as ch:
            stream: Any = pbg.WatchServiceStub(ch).Watch(pb.WatchRequest(
                vm=name, queue_limit=1 << 22, policy=pb.SLOW_CONSUMER_POLICY_BLOCK,
                heartbeat_interval_ms=60000))
            await stream.read()
            ready.set()
            got = 0
            while True:
                msg = await stream.read()
                if msg.WhichOneof("kind") == "events":
                    got += len(msg.events.seq)
                    if msg.events.seq[-1] >= last_seq:
                        break
            stream.cancel()
            out.put((time.time(), got))

    uvloop.run(run())


def _jetstream_reader(url: str, subject: str, last_seq: int, ready: Any, out: Any) -> None:
    import uvloop

    die_with_parent()

    async def run() -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        from pagetrack.v1 import pagetrack_pb2 as pb

        nc = await nats.connect(url)
        js = nc.jetstream(timeout=30)
        # A pull consumer of the new messages, as a reader that keeps no position would be.
        sub = await js.pull_subscribe(subject, stream=STREAM, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.NONE))
        ready.set()
        got = 0
        done = False
        while not done:
            try:
                msgs = await sub.fetch(64, timeout=5)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                seqs = pb.EventBatch.FromString(msg.data).seq
                got += len(seqs)
                done = done or seqs[-1] >= last_seq
        out.put((time.time(), got))
        await nc.close()

    try:
        uvloop.run(run())
    except Exception as exc:  # tell the bench at once rather than let it wait
        out.put(exc)
        raise


def _one_run(reader: Any, reader_args: tuple[Any, ...], target: str, vm: str) -> float:
    ctx = mp.get_context("spawn")
    out, wout, ready = ctx.Queue(), ctx.Queue(), ctx.Event()
    r = ctx.Process(target=reader, args=(*reader_args, ready, out))
    r.start()
    if not ready.wait(60):
        raise RuntimeError("the reader did not start")
    w = ctx.Process(target=_writer, args=(target, vm, EVENTS, wout))
    w.start()
    t_start = wout.get(timeout=60)
    result = out.get(timeout=600)
    if isinstance(result, Exception):
        raise RuntimeError(f"the reader failed: {result!r}")
    t_end, got = result
    w.join(60)
    r.join(60)
    return float(got / (t_end - t_start))


async def _head(target: str, vm: str) -> int:
    from pagetrack.client import AsyncClient

    async with AsyncClient(target) as c:
        return (await c.stats(vm))[0].head_seq


async def _check_export(url: str, subject_filter: str, head: int) -> tuple[int, int]:
    """(lost, duplicated) seqs of 1..head in what JetStream holds for the VM."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from pagetrack.v1 import pagetrack_pb2 as pb

    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info(STREAM, subjects_filter=subject_filter)
    total = sum((info.state.subjects or {}).values())
    # No acks (nothing is redelivered while the check reads), batches of a few MB.
    sub = await js.pull_subscribe(subject_filter, stream=STREAM, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE))
    seen = np.zeros(head + 1, dtype=np.int64)
    n = 0
    while n < total:
        for msg in await sub.fetch(min(16, total - n), timeout=30):
            n += 1
            h = msg.headers or {}
            if h["Pagetrack-Kind"] == "events":
                seqs = np.array(pb.EventBatch.FromString(msg.data).seq, dtype=np.int64)
                np.add.at(seen, seqs[seqs <= head], 1)
            elif h["Pagetrack-Kind"] == "gaps":
                seen[int(h["Pagetrack-First-Seq"]):int(h["Pagetrack-Last-Seq"]) + 1] += 1
    await nc.close()
    covered = seen[1:]
    return int((covered == 0).sum()), int(np.clip(covered - 1, 0, None).sum())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "pt.sock")
        ready_file = os.path.join(tmp, "ready")
        target = f"unix:{sock}"
        port = _free_port()
        url = f"nats://127.0.0.1:{port}"
        procs: list[subprocess.Popen[bytes]] = []
        try:
            daemon = subprocess.Popen(
                dying_with_us([str(BIN / "pagetrackd"), "--listen", target, "--ready-file",
                               ready_file, "--log-level", "warning", "--log-format", "json"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(daemon)
            _wait_for("pagetrackd", lambda: os.path.exists(ready_file), daemon)
            nats_server = subprocess.Popen(
                dying_with_us([str(BIN / "nats-server"), "-js", "-a", "127.0.0.1", "-p",
                               str(port), "-sd", os.path.join(tmp, "js")]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(nats_server)
            _wait_for("nats-server", lambda: _listening(port), nats_server)
            asyncio.run(_setup_vm(target, "direct"))
            asyncio.run(_setup_vm(target, "exported"))
            config = Path(tmp, "export.toml")
            config.write_text("[watch]\nqueue_limit = 1048576\n")
            exporter = subprocess.Popen(
                dying_with_us([str(BIN / "pagetrack"), "--target", target, "export", "nats",
                               "--nats", url, "--create-stream", "--vm", "exported",
                               "--config", str(config)]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(exporter)
            subject = "pagetrack.default.exported.events"
            watch_rates, export_rates, ratios = [], [], []
            for round_ in range(ROUNDS + 1):  # round 0 warms up (connections, the stream)
                head = asyncio.run(_head(target, "direct"))
                w = _one_run(_watch_reader, (target, "direct", head + EVENTS), target, "direct")
                head = asyncio.run(_head(target, "exported"))
                e = _one_run(_jetstream_reader, (url, subject, head + EVENTS), target,
                             "exported")
                if round_:
                    watch_rates.append(w)
                    export_rates.append(e)
                    ratios.append(e / w)
            head = asyncio.run(_head(target, "exported"))
            lost, dup = asyncio.run(_check_export(url, "pagetrack.default.exported.*", head))
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(f"events_per_round: {EVENTS}")
    print(f"watch_events_per_s: {np.median(watch_rates):.0f}")
    print(f"export_events_per_s: {np.median(export_rates):.0f}")
    print(f"export_events_checked: {head}")
    print(f"export_lost_events: {lost}")
    print(f"export_duplicate_events: {dup}")
    print(f"ratio_export_vs_watch: {np.median(ratios):.2f}")


if __name__ == "__main__":
    main()
