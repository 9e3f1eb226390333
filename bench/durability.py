"""What ``durability = "journal"`` costs: batched guest writes through a real pagetrackd,
journal mode beside interval mode, in one run.

Run from the repository root with the project's venv::

    .venv/bin/python bench/durability.py

Per round, one daemon per mode (each with its own state directory under the system's
temporary directory, on a unix socket) gets the same load: WriteGuestBatch calls of
BATCH_SIZE tracked 8-byte writes, IN_FLIGHT calls in flight, after a warm-up. In journal
mode every reply waits until its writes are fsynced (calls waiting together share one
fsync); in interval mode the state is saved every 30 s and nothing waits. Rounds
alternate the modes; each figure is the median over ROUNDS rounds and the ratio the
median of the per-round ratios.

Prints ``name: value`` lines, ``ratio_journal_vs_interval`` last (target >= 0.5).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench helpers, also if loaded by path
from _procs import dying_with_us  # noqa: E402

PAGETRACKD = Path(sys.executable).with_name("pagetrackd")
PAGE = 4096
PAGES = 1024
BATCH_SIZE = 256
IN_FLIGHT = 8
WARMUP = 40  #: calls
CALLS = 400  #: measured calls per round
ROUNDS = 3


def _start(tmp: Path, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = tmp / "d.sock"
    ready = tmp / "ready.json"
    proc = subprocess.Popen(
        dying_with_us([str(PAGETRACKD), "--listen", f"unix:{sock}", "--ready-file", str(ready),
                       "--state-dir", str(tmp / "state"), "--durability", mode,
                       "--log-level", "warning"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"pagetrackd ({mode}) did not start")
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())["addresses"][0]


async def _load(target: str) -> tuple[float, float]:
    """(writes per second, p99 call latency in ms) of the measured calls."""
    async with grpc.aio.insecure_channel(target) as ch:
        vms = pbg.VmServiceStub(ch)
        mem = pbg.MemoryServiceStub(ch)
        track = pbg.TrackingServiceStub(ch)
        await vms.CreateVm(pb.CreateVmRequest(name="bench"))
        await mem.SetMemoryRegion(pb.SetMemoryRegionRequest(
            vm="bench", slot=0, base_gfn=0, npages=PAGES))
        await track.AddTracking(pb.TrackingChangeRequest(
            vm="bench", ranges=[pb.GfnRange(start=0, count=PAGES)]))
        gpas = [(i * 7 % PAGES) * PAGE for i in range(BATCH_SIZE)]
        req = pb.WriteGuestBatchRequest(vm="bench", gpa=gpas, vcpu=[0],
                                        length=[8] * BATCH_SIZE, data=bytes(8 * BATCH_SIZE))
        latencies: list[float] = []
        todo = WARMUP + CALLS
        started = 0.0

        async def worker() -> None:
            nonlocal todo, started
            while todo > 0:
                todo -= 1
                measured = todo < CALLS
                if measured and not started:
                    started = time.perf_counter()
                t0 = time.perf_counter()
                await mem.WriteGuestBatch(req)
                if measured:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        elapsed = time.perf_counter() - started
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        return len(latencies) * BATCH_SIZE / elapsed, p99


def _round(mode: str) -> tuple[float, float]:
    tmp = Path(tempfile.mkdtemp(prefix=f"pagetrack-bench-{mode}-"))
    proc, target = _start(tmp, mode)
    try:
        return asyncio.run(_load(target))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    results: dict[str, list[tuple[float, float]]] = {"interval": [], "journal": []}
    ratios = []
    for _ in range(ROUNDS):
        for mode in ("interval", "journal"):
            results[mode].append(_round(mode))
        ratios.append(results["journal"][-1][0] / results["interval"][-1][0])
    for mode in ("interval", "journal"):
        print(f"{mode}_writes_per_s: {statistics.median(r[0] for r in results[mode]):.0f}")
        print(f"{mode}_p99_ms: {statistics.median(r[1] for r in results[mode]):.2f}")
    print(f"cpus: {os.cpu_count()}")
    print(f"ratio_journal_vs_interval: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
