"""Small building blocks the robustness tests share: a tracked VM and its writes."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemon
from tests.waiting import wait_until

PAGE = 4096


def tracked_vm(d: Daemon, name: str = "vm1", pages: int = 64, tenant: str | None = None) -> None:
    """A VM with one slot of ``pages`` pages, all tracked (every write is an event)."""
    d.stub("VmService", tenant).CreateVm(pb.CreateVmRequest(name=name))
    d.stub("MemoryService", tenant).SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=0, npages=pages)
    )
    d.stub("TrackingService", tenant).AddTracking(
        pb.TrackingChangeRequest(vm=name, ranges=[pb.GfnRange(start=0, count=pages)])
    )


def write_batch(
    mem: Any, vm: str, n: int, *, start: int = 0, pages: int = 64, value: int = 0
) -> tuple[int, int]:
    """``n`` 8-byte writes, write i to page (start + i) % pages; returns (first, last)
    seq of the batch."""
    gpas = [((start + i) % pages) * PAGE + 8 * ((start + i) // pages % 512) for i in range(n)]
    data = b"".join(((value + start + i) & (2**64 - 1)).to_bytes(8, "little") for i in range(n))
    r = mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
        vm=vm, gpa=gpas, vcpu=[0] * n, length=[8] * n, data=data,
    ))
    return r.first_seq, r.last_seq


def watch_until(d: Daemon, vm: str, start_seq: int | None, until_seq: int,
                tenant: str | None = None) -> tuple[Any, list[Any]]:
    """Open a Watch (resuming at ``start_seq``) and read messages until a batch or gap
    reaches ``until_seq``; returns (registered, [events and gaps in order])."""
    req = pb.WatchRequest(vm=vm)
    if start_seq is not None:
        req.start_seq = start_seq
    stream = d.stub("WatchService", tenant).Watch(req, timeout=30)
    registered = next(stream).registered
    out: list[Any] = []
    try:
        for msg in stream:
            kind = msg.WhichOneof("kind")
            if kind == "events":
                out.append(msg.events)
                if msg.events.seq[-1] >= until_seq:
                    break
            elif kind == "gap":
                out.append(msg.gap)
                if msg.gap.last_seq >= until_seq:
                    break
    finally:
        stream.cancel()
    return registered, out


def saves_completed(d: Daemon) -> int:
    """State saves the daemon has completed, from its /metrics (start it with
    ``--metrics-port``)."""
    with urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("pagetrack_state_saves_total "):
                return int(float(line.split()[1]))
    raise AssertionError("/metrics has no pagetrack_state_saves_total")


def wait_for_a_save_begun_now(d: Daemon) -> float:
    """Wait until a save that began after this call has completed; return the moment of
    the call. A save running at the call ends the first count; the one after it began
    later, so two more saves mean everything acknowledged before the call is on disk.
    Counting saves instead of timing them keeps a loaded machine from failing a test."""
    now = time.monotonic()
    before = saves_completed(d)
    wait_until(lambda: saves_completed(d) >= before + 2, "two more state saves")
    return now
