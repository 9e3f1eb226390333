"""End-to-end API throughput: writer -> pagetrackd -> Watch subscriber, beside raw grpc.aio.

Run from the repository root with the project's venv::

    .venv/bin/python bench/api.py            # add --profile DIR to cProfile the daemon

``PAGETRACKD_BIN=/path/to/pagetrackd`` measures another build of the daemon with the same
client processes (an older commit, say, to compare against it side by side).

Three processes per measurement, talking over a unix socket, each on uvloop: a *writer*
that makes tracked guest writes, the *daemon* (a real ``pagetrackd``), and a *subscriber*
holding a Watch stream that must receive every event (a lost or reordered event aborts
the run). The baseline keeps the same layout with a minimal raw grpc.aio server (generic
handlers, bytes payloads): a unary ``Write`` that pushes its payload onto the
subscriber's queue and a server stream that sends the queue.

* unary: one WriteGuest per tracked 8-byte write, UNARY_IN_FLIGHT calls in flight;
  ``*_writes_per_s`` = writes / (last event received - first measured write sent);
  ``*_p99_ms`` = 99th percentile of the writer's call latency.
* batch: WriteGuestBatch of 256 tracked 8-byte writes, 4 calls in flight, every event
  received; the raw baseline sends the same 256 writes as one packed payload.

The Watch uses the daemon's default batching (up to 4096 events, 2 ms) with a large
queue; the raw stream sends one message per write call. Rounds are interleaved; each
figure is the median of ROUNDS rounds, and each ratio the median of the per-round ratios
(ours and raw ran back to back in a round). On a busy machine single rounds vary a lot.

Prints ``name: value`` lines, ``ratio_batch_vs_raw`` last. Targets: ratio_unary_vs_raw
>= 0.8, p99_unary_vs_raw <= 1.5, ratio_batch_vs_raw >= 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench helpers, also if loaded by path
from _procs import dying_with_us, pagetrackd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

UNARY_IN_FLIGHT = 4
UNARY_WARMUP = 1_000
UNARY_WRITES = 6_000
BATCH_SIZE = 256
BATCH_IN_FLIGHT = 4
#: a Watch queue's byte bound: a stalled moment of the subscriber (the default bound is
#: 4 MiB, about 110k events) must not drop events, which aborts the run
QUEUE_BYTES = 64 << 20
BATCH_WARMUP = 40  #: calls
BATCH_CALLS = 600  #: measured calls (x 256 writes)
ROUNDS = 5  #: each figure is the median of its rounds
TRACKED_PAGES = 256
WRITE = b"\x5a" * 8
VM = "bench"
RAW_WRITE = "/rawbench.Bench/Write"
RAW_SUBSCRIBE = "/rawbench.Bench/Subscribe"
RAW_RECORD = struct.Struct("<QQQ")  #: gpa, vcpu|length, 8 bytes of data: one raw write


def _now() -> int:
    return time.monotonic_ns()  # CLOCK_MONOTONIC: comparable across the processes


def _run(coro: Awaitable[Any]) -> Any:
    import uvloop

    return uvloop.run(coro)  # type: ignore[arg-type]


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# --------------------------------------------------------------------------- writers


async def _closed_loop(
    call: Callable[[], Awaitable[Any]], calls: int, in_flight: int
) -> tuple[int, list[int]]:
    """Make ``calls`` calls, ``in_flight`` at a time; (start ns, latencies ns)."""
    latencies: list[int] = []
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = _now()
            await call()
            latencies.append(_now() - t)

    start = _now()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return start, latencies


def _write_gpa(i: int) -> int:
    """The i-th write's gpa: cycling over the tracked pages, 8-byte aligned."""
    return ((i % TRACKED_PAGES) << 12) + 8 * ((i // TRACKED_PAGES) % 512)


async def pt_writer(target: str, mode: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        mem = pbg.MemoryServiceStub(ch)
        if mode == "unary":
            reqs = [pb.WriteGuestRequest(vm=VM, vcpu=i % 4, gpa=_write_gpa(i), data=WRITE)
                    for i in range(1024)]
            n = 0

            async def one() -> Any:
                nonlocal n
                n += 1
                return await mem.WriteGuest(reqs[n & 1023])

            await _closed_loop(one, UNARY_WARMUP, UNARY_IN_FLIGHT)
            start, lat = await _closed_loop(one, UNARY_WRITES, UNARY_IN_FLIGHT)
            writes = UNARY_WRITES
        else:
            batch = pb.WriteGuestBatchRequest(
                vm=VM, gpa=[_write_gpa(i) for i in range(BATCH_SIZE)], vcpu=[0],
                length=[len(WRITE)] * BATCH_SIZE, data=WRITE * BATCH_SIZE,
            )

            async def call() -> Any:
                r = await mem.WriteGuestBatch(batch)
                assert r.pieces.emulated == BATCH_SIZE, r
                return r

            await _closed_loop(call, BATCH_WARMUP, BATCH_IN_FLIGHT)
            start, lat = await _closed_loop(call, BATCH_CALLS, BATCH_IN_FLIGHT)
            writes = BATCH_CALLS * BATCH_SIZE
        _emit({"start": start, "writes": writes, "lat": _percentiles(lat)})


async def raw_writer(target: str, mode: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        write: Any = ch.unary_unary(RAW_WRITE)
        count = 0
        size = 1 if mode == "unary" else BATCH_SIZE

        async def call() -> Any:
            nonlocal count
            base = count
            count += size
            payload = b"".join(
                RAW_RECORD.pack(_write_gpa(base + k), len(WRITE), base + k) for k in range(size)
            ) if size == 1 else _raw_batch(base)
            return await write(payload)

        calls, warm = (UNARY_WRITES, UNARY_WARMUP) if mode == "unary" else (
            BATCH_CALLS, BATCH_WARMUP)
        in_flight = UNARY_IN_FLIGHT if mode == "unary" else BATCH_IN_FLIGHT
        await _closed_loop(call, warm, in_flight)
        start, lat = await _closed_loop(call, calls, in_flight)
        _emit({"start": start, "writes": calls * size, "lat": _percentiles(lat)})


_RAW_TEMPLATE = b"".join(RAW_RECORD.pack(_write_gpa(k), len(WRITE), 0) for k in range(BATCH_SIZE))


def _raw_batch(base: int) -> bytes:
    """256 packed raw writes; the first record's data field carries the batch's number so
    the subscriber can check it received every one."""
    return RAW_RECORD.pack(_write_gpa(base), len(WRITE), base) + _RAW_TEMPLATE[RAW_RECORD.size:]


def _percentiles(lat: list[int]) -> dict[str, float]:
    lat.sort()
    return {
        "p50_ms": lat[len(lat) // 2] / 1e6,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6,
    }


# ------------------------------------------------------------------------ subscribers


async def pt_subscriber(target: str, total: int) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        call = pbg.WatchServiceStub(ch).Watch(
            # The daemon's own batching defaults (max_batch_delay_ms 2, 4096 events);
            # a queue large enough that a scheduling hiccup drops nothing.
            pb.WatchRequest(vm=VM, queue_limit=1 << 22, queue_bytes=QUEUE_BYTES,
                            heartbeat_interval_ms=60000)
        )
        first: Any = await call.read()
        assert first.WhichOneof("kind") == "registered", first
        nxt = first.registered.head_seq + 1
        end = nxt + total
        _emit({"ready": True})
        while nxt < end:
            msg: Any = await call.read()
            if msg is grpc.aio.EOF:
                raise SystemExit(f"stream ended at seq {nxt}")
            kind = msg.WhichOneof("kind")
            if kind == "events":
                ev = msg.events
                n = len(ev.seq)
                # Seqs strictly increase, so first and last settle that none is missing.
                if ev.seq[0] != nxt or ev.seq[n - 1] != nxt + n - 1 or len(ev.data) != 8 * n:
                    raise SystemExit(f"expected seq {nxt}, got {ev.seq[0]}..{ev.seq[n - 1]}")
                nxt += n
            elif kind != "progress":
                raise SystemExit(f"unexpected {kind}: {msg}")
        _emit({"last": _now(), "received": total})
        call.cancel()


async def raw_subscriber(target: str, total: int, mode: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        subscribe: Any = ch.unary_stream(RAW_SUBSCRIBE)
        call = subscribe(b"")
        await call.read()  # the server's "subscribed" message
        _emit({"ready": True})
        received = 0
        # Concurrent calls may reach the server in any order: tick off each write's number.
        seen = bytearray(total)
        while received < total:
            raw: Any = await call.read()
            if raw is grpc.aio.EOF:
                raise SystemExit(f"raw stream ended after {received}")
            msg = bytes(raw)
            n = len(msg) // RAW_RECORD.size
            first = RAW_RECORD.unpack_from(msg)[2]
            if first + n > total or seen[first]:
                raise SystemExit(f"raw: write {first} unexpected or seen twice")
            seen[first : first + n] = b"\x01" * n
            received += n
        if seen.count(0):
            raise SystemExit(f"raw: {seen.count(0)} writes missing")
        _emit({"last": _now(), "received": received})
        call.cancel()


# ------------------------------------------------------------------------ raw server


async def raw_server(address: str, ready_file: str) -> None:
    queues: list[asyncio.Queue[bytes]] = []
    ack = b"\x00" * 8

    async def write(request: bytes, context: Any) -> bytes:
        for q in queues:
            q.put_nowait(request)
        return ack

    async def subscribe(request: bytes, context: Any) -> Any:
        q: asyncio.Queue[bytes] = asyncio.Queue()
        queues.append(q)
        try:
            yield b"subscribed"
            while True:
                yield await q.get()
        finally:
            queues.remove(q)

    handler = grpc.method_handlers_generic_handler("rawbench.Bench", {
        "Write": grpc.unary_unary_rpc_method_handler(write),
        "Subscribe": grpc.unary_stream_rpc_method_handler(subscribe),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with open(ready_file, "w") as f:  # noqa: ASYNC230 (once, before any load)
        f.write("{}")
    await stop.wait()
    await server.stop(0)


# ------------------------------------------------------------------------ orchestration


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        dying_with_us([sys.executable, __file__, "--role", *args]), stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _read_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise SystemExit(f"bench child {proc.args!r} failed with {proc.returncode}")
    out: dict[str, Any] = json.loads(line)
    return out


def _wait_file(path: Path, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.02)


def _measure(system: str, mode: str, target: str) -> tuple[float, float]:
    """One round: (writes per second end to end, writer p99 ms)."""
    warm = UNARY_WARMUP if mode == "unary" else BATCH_WARMUP * BATCH_SIZE
    total = warm + (UNARY_WRITES if mode == "unary" else BATCH_CALLS * BATCH_SIZE)
    if system == "pt":
        sub = _spawn("pt-subscriber", target, str(total))
    else:
        sub = _spawn("raw-subscriber", target, str(total), mode)
    assert _read_json(sub)["ready"]
    writer = _spawn(f"{system}-writer", target, mode)
    w = _read_json(writer)
    s = _read_json(sub)
    writer.wait()
    sub.wait()
    if s["received"] != total:
        raise SystemExit(f"{system} {mode}: subscriber got {s['received']} of {total}")
    return w["writes"] / ((s["last"] - w["start"]) / 1e9), w["lat"]["p99_ms"]


def _setup_vm(target: str) -> None:
    with grpc.insecure_channel(target) as ch:
        vm = pbg.VmServiceStub(ch)
        try:
            vm.DeleteVm(pb.DeleteVmRequest(vm=VM))
        except grpc.RpcError:
            pass
        vm.CreateVm(pb.CreateVmRequest(name=VM))
        pbg.MemoryServiceStub(ch).SetMemoryRegion(
            pb.SetMemoryRegionRequest(vm=VM, slot=0, base_gfn=0, npages=TRACKED_PAGES * 4))
        pbg.TrackingServiceStub(ch).AddTracking(
            pb.TrackingChangeRequest(vm=VM, ranges=[pb.GfnRange(start=0, count=TRACKED_PAGES)]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", metavar="DIR", help="cProfile the daemon into DIR/daemon.prof")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ptbench-"))
    pt_sock, raw_sock = f"unix:{tmp}/pt.sock", f"unix:{tmp}/raw.sock"
    daemon_cmd = [pagetrackd()]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        daemon_cmd = [sys.executable, "-m", "cProfile", "-o",
                      str(Path(args.profile) / "daemon.prof"), "-m", "pagetrackd"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGETRACK_")}
    daemon = subprocess.Popen(
        dying_with_us([*daemon_cmd, "--listen", pt_sock, "--ready-file", str(tmp / "pt.json"),
                       "--log-level", "warning"]),
        env=env, cwd=ROOT, stderr=(tmp / "pagetrackd.log").open("wb"),
    )
    raw = _spawn("raw-server", raw_sock, str(tmp / "raw.json"))
    try:
        _wait_file(tmp / "pt.json", daemon, "pagetrackd")
        _wait_file(tmp / "raw.json", raw, "the raw server")
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(ROUNDS):  # interleaved, so drift in machine load hits both alike
            for mode in ("unary", "batch"):
                for system, target in (("pt", pt_sock), ("raw", raw_sock)):
                    if system == "pt":
                        _setup_vm(pt_sock)
                    t = time.monotonic()
                    r = _measure(system, mode, target)
                    results.setdefault((system, mode), []).append(r)
                    print(f"# {system} {mode}: {r[0]:.0f} writes/s, p99 {r[1]:.3f} ms"
                          f" ({time.monotonic() - t:.1f} s)", file=sys.stderr)
    finally:
        daemon.terminate()
        raw.terminate()
        daemon.wait(30)
        raw.wait(30)
    shutil.rmtree(tmp, ignore_errors=True)

    def med(system: str, mode: str, i: int) -> float:
        return statistics.median(r[i] for r in results[(system, mode)])

    def paired(mode: str, i: int) -> float:
        """Median over rounds of ours / raw: each round ran the two back to back, so
        their ratio is not thrown off by the machine's load drifting between rounds."""
        return statistics.median(
            ours[i] / raw[i] for ours, raw in zip(
                results[("pt", mode)], results[("raw", mode)], strict=True)
        )

    print(f"unary_writes_per_s: {med('pt', 'unary', 0):.0f}")
    print(f"unary_p99_ms: {med('pt', 'unary', 1):.3f}")
    print(f"raw_unary_writes_per_s: {med('raw', 'unary', 0):.0f}")
    print(f"raw_unary_p99_ms: {med('raw', 'unary', 1):.3f}")
    print(f"ratio_unary_vs_raw: {paired('unary', 0):.3f}")
    print(f"p99_unary_vs_raw: {paired('unary', 1):.3f}")
    print(f"batch_writes_per_s: {med('pt', 'batch', 0):.0f}")
    print(f"raw_batch_writes_per_s: {med('raw', 'batch', 0):.0f}")
    print(f"ratio_batch_vs_raw: {paired('batch', 0):.3f}")
    return 0


def _role(argv: list[str]) -> None:
    role, *rest = argv
    if role == "pt-writer":
        _run(pt_writer(rest[0], rest[1]))
    elif role == "raw-writer":
        _run(raw_writer(rest[0], rest[1]))
    elif role == "pt-subscriber":
        _run(pt_subscriber(rest[0], int(rest[1])))
    elif role == "raw-subscriber":
        _run(raw_subscriber(rest[0], int(rest[1]), rest[2]))
    elif role == "raw-server":
        _run(raw_server(rest[0], rest[1]))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        _role(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
