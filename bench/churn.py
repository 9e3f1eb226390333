"""Churn: many short-lived Watch streams and TTL leases against one pagetrackd, and what the
daemon holds before and after.

Run from the repository root with the project's venv::

    .venv/bin/python bench/churn.py [WATCH_CYCLES [LEASE_CYCLES]]

One daemon on a unix socket. After a warm-up (so that allocator pools and gRPC's own caches
are filled before the baseline is read), the run does:

* ``WATCH_CYCLES`` (default 10,000) Watch open/close cycles, 16 at a time: each stream reads
  its Registered message, half of them add tracking under the stream's lease, and then the
  stream ends -- by the client cancelling it (two in three) or by Unwatch (one in three);
* ``LEASE_CYCLES`` (default 10,000) TTL lease cycles, 32 at a time: CreateLease with the
  shortest TTL (100 ms), AddTracking of 4 gfns under it, then nothing: the lease is left
  to expire.

Then it waits (up to 30 s) for the streams and leases to be gone and prints ``name: value``
lines with the daemon's figures from GetServerInfo.process before and after: asyncio tasks,
notifiers, Watch streams, leases, tracked gfns and RSS. Every count must be back where it
started and RSS within ``RSS_BOUND`` of it; the run exits non-zero otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench helpers, also if loaded by path
from _procs import dying_with_us  # noqa: E402

BIN = Path(sys.executable).parent
VM = "churn"
NPAGES = 4096
#: RSS growth allowed over a full run (10,000 + 10,000 cycles), bytes
RSS_BOUND = 16 << 20
WATCH_PARALLEL = 16
LEASE_PARALLEL = 32
LEASE_TTL_MS = 100  #: the shortest TTL the daemon accepts
LEASE_GFNS = 4
SETTLE_S = 30.0  #: longest wait for streams and leases to be gone


@dataclass(frozen=True)
class Figures:
    """What the daemon holds at one moment."""

    tasks: int
    notifiers: int
    watchers: int
    leases: int
    tracked_gfns: int
    rss_bytes: int

    def counts(self) -> tuple[int, ...]:
        """Every figure but RSS."""
        return (self.tasks, self.notifiers, self.watchers, self.leases, self.tracked_gfns)


async def figures(ch: grpc.aio.Channel) -> Figures:
    """The daemon's figures now (GetServerInfo.process needs an admin caller; with no
    tokens file every caller is one)."""
    info = await pbg.AdminServiceStub(ch).GetServerInfo(pb.GetServerInfoRequest())
    vm = await pbg.VmServiceStub(ch).GetVm(pb.GetVmRequest(vm=VM))
    p = info.process
    return Figures(p.tasks, p.notifiers, p.watchers, p.leases, vm.vm.tracked_gfns, p.rss_bytes)


async def setup(ch: grpc.aio.Channel) -> None:
    """The VM the churn runs against, with one slot and a few tenant-tracked gfns."""
    await pbg.VmServiceStub(ch).CreateVm(pb.CreateVmRequest(name=VM))
    await pbg.MemoryServiceStub(ch).SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=VM, slot=0, npages=NPAGES)
    )
    await pbg.TrackingServiceStub(ch).AddTracking(
        pb.TrackingChangeRequest(vm=VM, ranges=[pb.GfnRange(start=0, count=8)])
    )


async def watch_cycles(ch: grpc.aio.Channel, cycles: int) -> None:
    """Open and close ``cycles`` Watch streams, WATCH_PARALLEL at a time."""
    watch = pbg.WatchServiceStub(ch)
    track = pbg.TrackingServiceStub(ch)
    todo = iter(range(cycles))

    async def worker() -> None:
        for i in todo:
            stream: Any = watch.Watch(pb.WatchRequest(vm=VM, heartbeat_interval_ms=60000))
            reg = (await stream.read()).registered
            if i % 2:
                gfn = 64 + i % (NPAGES - 64)
                await track.AddTracking(pb.TrackingChangeRequest(
                    vm=VM, gfns=[gfn, gfn], lease_id=reg.lease_id))
            if i % 3 == 2:
                await watch.Unwatch(pb.UnwatchRequest(vm=VM, notifier_id=reg.notifier_id))
                msg = await stream.read()
                if msg.WhichOneof("kind") != "closed":
                    raise AssertionError(f"after Unwatch the stream sent {msg}")
                await stream.code()
            else:
                stream.cancel()

    await asyncio.gather(*(worker() for _ in range(WATCH_PARALLEL)))


async def lease_cycles(ch: grpc.aio.Channel, cycles: int) -> None:
    """Create ``cycles`` short TTL leases, each tracking LEASE_GFNS gfns, and let them
    expire on their own."""
    leases = pbg.LeaseServiceStub(ch)
    track = pbg.TrackingServiceStub(ch)
    todo = iter(range(cycles))

    async def worker() -> None:
        for i in todo:
            lease = (await leases.CreateLease(
                pb.CreateLeaseRequest(ttl_ms=LEASE_TTL_MS, label="churn"))).lease
            base = 64 + (i * LEASE_GFNS) % (NPAGES - 64 - LEASE_GFNS)
            try:
                await track.AddTracking(pb.TrackingChangeRequest(
                    vm=VM, ranges=[pb.GfnRange(start=base, count=LEASE_GFNS)],
                    lease_id=lease.id))
            except grpc.aio.AioRpcError as exc:
                # Only possible if the machine stalled past the TTL between the two calls.
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise

    await asyncio.gather(*(worker() for _ in range(LEASE_PARALLEL)))


async def settle(ch: grpc.aio.Channel, base: Figures) -> Figures:
    """Wait until every count is back at ``base`` (or SETTLE_S pass); the figures then."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = await figures(ch)
        if now.counts() == base.counts() or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)


async def run_churn(
    target: str, watches: int, leases: int, warmup: int = 500
) -> tuple[Figures, Figures]:
    """Churn against the daemon at ``target``; (figures before, figures after)."""
    async with grpc.aio.insecure_channel(target) as ch:
        await setup(ch)
        base = await figures(ch)  # the counts before anything ran
        await watch_cycles(ch, warmup)
        await lease_cycles(ch, warmup)
        before = await settle(ch, base)
        await watch_cycles(ch, watches)
        await lease_cycles(ch, leases)
        after = await settle(ch, before)
        return before, after


def start_daemon(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    """A pagetrackd on a unix socket in ``tmp``."""
    sock = os.path.join(tmp, "pt.sock")
    ready = os.path.join(tmp, "ready.json")
    proc = subprocess.Popen(
        dying_with_us([str(BIN / "pagetrackd"), "--listen", f"unix:{sock}", "--ready-file", ready,
                       "--log-level", "warning", "--log-format", "json"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("pagetrackd did not start")
        time.sleep(0.02)
    return proc, f"unix:{sock}"


def main(argv: list[str]) -> int:
    watches = int(argv[0]) if argv else 10_000
    leases = int(argv[1]) if len(argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        proc, target = start_daemon(tmp)
        try:
            t0 = time.perf_counter()
            before, after = asyncio.run(run_churn(target, watches, leases))
            secs = time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"watch_cycles: {watches}")
    print(f"lease_cycles: {leases}")
    for name in (f.name for f in dataclasses.fields(Figures)):
        print(f"{name}_before: {getattr(before, name)}")
        print(f"{name}_after: {getattr(after, name)}")
    growth = after.rss_bytes - before.rss_bytes
    print(f"rss_growth_bytes: {growth}")
    print(f"rss_bound_bytes: {RSS_BOUND}")
    print(f"seconds: {secs:.1f}")
    ok = before.counts() == after.counts() and growth <= RSS_BOUND
    print(f"ok: {str(ok).lower()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
