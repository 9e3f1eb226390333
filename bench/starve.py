"""Starving other tenants: each attack of the "nobody starved" issue against a real
pagetrackd with its default configuration, and what it costs.

Run from the repository root with the project's venv::

    .venv/bin/python bench/starve.py

One daemon per case, on loopback, with a tokens file of two tenants (attacker and victim)
and metrics on. Each case prints ``name: value`` lines: the daemon's RSS growth, what
GetStats reports, whether the attack was refused (1) or not (0), and the victim's worst
and p99 latency (ms) while it ran, measured from a process of its own. The figures are
meant to be read side by side with the same run on an earlier checkout: the attacks are
sized so that the earlier code finishes them in seconds. ``--before DIR`` does that in
one run: each case runs first with a daemon from DIR (an earlier checkout's server/
directory, put first on the daemon's PYTHONPATH), then with this one, and each figure is
printed as ``name: before -> after``. ``--only a,b`` runs only the cases named::

    git archive <commit> server | tar -x -C /tmp/before
    .venv/bin/python bench/starve.py --only big_batch,track_1m_list,long_replay \
        --before /tmp/before/server
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from pagetrack.v1 import pagetrack_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.daemon_process import start_daemon  # noqa: E402
from tests.robustness.starve_support import (  # noqa: E402
    ATTACKER,
    MiB,
    Tenant,
    victim_meanwhile,
    write_tokens,
)

#: with --before: each figure of the case running now, kept instead of printed
_KEPT: dict[str, float] | None = None


def emit(name: str, value: float) -> None:
    if _KEPT is not None:
        _KEPT[name] = value
        return
    print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}",
          flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(tmp: Path) -> Any:
    tokens = write_tokens(tmp)
    # An earlier daemon knows no role "metrics": keep the two tenants only.
    tokens.write_text("\n\n".join(tokens.read_text().split("\n\n")[:2]) + "\n")
    return start_daemon(tmp, "--tokens-file", str(tokens), "--metrics-port", str(free_port()))


def _scrape_status(address: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def refused(call: Any) -> int:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return 1 if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   grpc.StatusCode.INVALID_ARGUMENT) else 0
    return 0


async def scattered_writes(d: Any) -> None:
    att = Tenant(d.tcp, ATTACKER)
    vm = await att.new_vm(1 << 30)
    rss0 = d.rss_bytes()
    rng = np.random.default_rng(17)
    batch, stopped = 4096, 0
    async with victim_meanwhile(d.tcp) as lat:
        for _ in range(1024):  # up to 4M scattered 8-byte writes
            gpa = (rng.integers(0, 1 << 30, batch) << 12) | (rng.integers(0, 512, batch) << 3)
            r = pb.WriteGuestBatchRequest(vm=vm, gpa=gpa.tolist(), vcpu=[0],
                                          length=[8] * batch, data=b"\x5a" * 8 * batch)
            if await refused(att.call(att.api.mem.WriteGuestBatch, r)):
                stopped = 1
                break
    stats = (await att.call(att.api.admin.GetStats, pb.GetStatsRequest(vm=vm))).vms[0]
    emit("scattered_writes", stats.guest_writes)
    emit("scattered_refused", stopped)
    emit("scattered_rss_growth_mib", (d.rss_bytes() - rss0) / MiB)
    emit("scattered_reported_memory_mib", stats.memory_bytes / MiB)
    emit("scattered_victim_p99_ms", lat.p99() * 1e3)
    await att.close()


async def huge_slot_tracking(d: Any) -> None:
    att = Tenant(d.tcp, ATTACKER)
    vm = await att.new_vm(1 << 34)
    rss0 = d.rss_bytes()
    gfns = (np.arange(65536, dtype=np.int64) * ((1 << 34) // 65536)).tolist()
    stopped = await refused(att.call(att.api.track.AddTracking, pb.TrackingChangeRequest(
        vm=vm, gfns=gfns, mode=pb.TRACK_MODE_WRITE)))
    emit("huge_slot_tracking_refused", stopped)
    emit("huge_slot_tracking_rss_growth_mib", (d.rss_bytes() - rss0) / MiB)
    async with victim_meanwhile(d.tcp) as lat:
        async for _ in att.api.admin.SnapshotVm(pb.SnapshotVmRequest(vm=vm), metadata=att.md,
                                                timeout=120):
            pass
    emit("huge_slot_snapshot_victim_worst_ms", lat.worst() * 1e3)
    await att.close()


async def big_history(d: Any) -> None:
    att = Tenant(d.tcp, ATTACKER)
    emit("history_4gib_refused", await refused(att.call(att.api.vm.CreateVm, pb.CreateVmRequest(
        name="big", options=pb.VmOptions(limits=pb.VmLimits(history_bytes=4 << 30))))))
    await att.close()


async def stalled_watch(d: Any) -> None:
    att = Tenant(d.tcp, ATTACKER)
    vm = await att.new_vm(256)
    await att.call(att.api.track.AddTracking, pb.TrackingChangeRequest(
        vm=vm, ranges=[pb.GfnRange(start=0, count=256)], mode=pb.TRACK_MODE_WRITE))
    stalled = att.api.watch.Watch(pb.WatchRequest(vm=vm), metadata=att.md)
    await stalled.read()
    rss0 = d.rss_bytes()
    page = b"\xc3" * 4096
    for _ in range(256):  # 256 MiB of tracked 4 KiB writes
        await att.call(att.api.mem.WriteGuestBatch, pb.WriteGuestBatchRequest(
            vm=vm, gpa=[g << 12 for g in range(256)], vcpu=[0], length=[4096] * 256,
            data=page * 256))
    (info,) = (await att.call(att.api.watch.ListNotifiers,
                              pb.ListNotifiersRequest(vm=vm))).notifiers
    emit("stalled_watch_queue_events", info.queue_depth)
    emit("stalled_watch_rss_growth_mib", (d.rss_bytes() - rss0) / MiB)
    stalled.cancel()
    await att.close()


async def _upload(att: Tenant, chunks: list[bytes], finish: bool) -> int:
    call = att.api.admin.RestoreVm(metadata=att.md, timeout=30)
    for i, data in enumerate(chunks):
        await call.write(pb.RestoreVmRequest(vm="" if i else "up", data=data))
    if finish:
        await call.done_writing()
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return 0 if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 1
    return 0


async def uploads(d: Any) -> None:
    att = Tenant(d.tcp, ATTACKER)
    # One message of junk, the stream left open: answered at once, or only at the end?
    emit("junk_upload_refused_on_first_message",
         await _upload(att, [b"\x00NOTSNAP" * (MiB // 8)], finish=False))
    vm = await att.new_vm(64)
    data = b""
    async for chunk in att.api.admin.SnapshotVm(pb.SnapshotVmRequest(vm=vm), metadata=att.md):
        data += chunk.data
    from pagetrackd.state import decode

    header, arrays = decode(data)
    arrays["bomb"] = np.zeros(256 * MiB, dtype=np.uint8)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    out = io.BytesIO()
    np.savez_compressed(out, allow_pickle=False, **arrays)
    payload = out.getvalue()
    import hashlib

    body = b"".join((struct.pack("<8sII", b"PTVMSNAP", 1, len(head)), head,
                     struct.pack("<Q", len(payload)), payload))
    bomb = body + hashlib.sha256(body).digest()
    rss0 = d.rss_bytes()
    emit("bomb_snapshot_bytes", len(bomb))
    emit("bomb_refused", await _upload(att, [bomb], finish=True))
    emit("bomb_rss_growth_mib", (d.rss_bytes() - rss0) / MiB)
    await att.close()


async def stalls(d: Any) -> None:
    att = Tenant(d.tcp, ATTACKER)
    n = 1 << 16
    vm = await att.new_vm(n)
    lease = (await att.call(att.api.lease.CreateLease,
                            pb.CreateLeaseRequest(ttl_ms=600_000))).lease
    await att.call(att.api.track.AddTracking, pb.TrackingChangeRequest(
        vm=vm, ranges=[pb.GfnRange(start=0, count=n)], mode=pb.TRACK_MODE_WRITE,
        lease_id=lease.id))
    async with victim_meanwhile(d.tcp) as lat:
        got, step = 0, n
        while got < n:
            try:
                r = await att.call(att.api.track.QueryTracking, pb.QueryTrackingRequest(
                    vm=vm, ranges=[pb.GfnRange(start=got, count=step)], include_owners=True))
            except grpc.aio.AioRpcError:
                step = 1 << 13
                continue
            got += len(r.gfns)
    emit("query_65536_owned_victim_worst_ms", lat.worst() * 1e3)
    emit("query_65536_owned_victim_p99_ms", lat.p99() * 1e3)
    await att.close()


async def _ended(att: Tenant, run_id: str) -> None:
    """Until the workload has ended (a minute at most)."""
    for _ in range(12000):
        got = await att.call(att.api.workload.GetWorkload, pb.GetWorkloadRequest(id=run_id))
        if got.workload.state != pb.WORKLOAD_STATE_RUNNING:
            return
        await asyncio.sleep(0.005)
    raise SystemExit(f"workload {run_id} still running after a minute")


async def leftovers(d: Any) -> None:
    att = Tenant(d.tcp, ATTACKER)
    vm = await att.new_vm(4096)
    ids = []
    for _ in range(100):
        ids.append((await att.call(att.api.workload.StartWorkload, pb.StartWorkloadRequest(
            vm=vm, kind=pb.WORKLOAD_KIND_RANDOM_WRITES, count=8, seed=1))).workload.id)
        await _ended(att, ids[-1])
    listed = (await att.call(att.api.workload.ListWorkloads, pb.ListWorkloadsRequest())).workloads
    emit("ended_workloads_kept_of_100", len(listed))
    emit("workload_ids_sequential", int(ids[1] == f"w{int(ids[0][1:]) + 1}"
                                        if ids[0][1:].isdigit() else 0))
    big = await att.new_vm(1 << 16)
    page = b"\x7e" * 4096
    for k in range(24):
        await att.call(att.api.mem.WriteGuestBatch, pb.WriteGuestBatchRequest(
            vm=big, gpa=[(k * 1024 + i) << 12 for i in range(1024)], vcpu=[0],
            length=[4096] * 1024, data=page * 1024))
    w = (await att.call(att.api.workload.StartWorkload, pb.StartWorkloadRequest(
        vm=big, kind=pb.WORKLOAD_KIND_RANDOM_WRITES, count=8, seed=1))).workload.id
    await _ended(att, w)
    full = d.rss_bytes()
    await att.call(att.api.vm.DeleteVm, pb.DeleteVmRequest(vm=big))
    emit("deleted_vm_96mib_freed_mib", (full - d.rss_bytes()) / MiB)
    made = 0
    for _ in range(3000):
        if await refused(att.call(att.api.lease.CreateLease,
                                  pb.CreateLeaseRequest(ttl_ms=600_000))):
            break
        made += 1
    emit("leases_granted_of_3000", made)
    anyone = Tenant(d.tcp, "")
    watches, opened = [], 0
    for _ in range(400):
        s = anyone.api.health.Watch(health_pb2.HealthCheckRequest())
        watches.append(s)
        try:
            await s.read()
            opened += 1
        except grpc.aio.AioRpcError:
            break
    emit("health_watches_opened_of_400", opened)
    for s in watches:
        s.cancel()
    emit("metrics_without_token_status", await asyncio.to_thread(_scrape_status, d.metrics))
    await att.close()
    await anyone.close()


async def big_batch(d: Any) -> None:
    """One WriteGuestBatch of 2^20 scattered 8-byte writes (the most one batch may hold),
    half onto tracked pages."""
    att = Tenant(d.tcp, ATTACKER)
    npages = 1 << 21
    vm = await att.new_vm(npages)
    await att.call(att.api.track.AddTracking, pb.TrackingChangeRequest(
        vm=vm, ranges=[pb.GfnRange(start=0, count=npages // 2)], mode=pb.TRACK_MODE_WRITE))
    n = 1 << 20
    gpa = (np.random.default_rng(5).permutation(npages)[:n] << 12) | 8
    req = pb.WriteGuestBatchRequest(vm=vm, gpa=gpa.tolist(), vcpu=[0], length=[8] * n,
                                    data=b"\xa5" * 8 * n)
    async with victim_meanwhile(d.tcp) as lat:
        t0 = time.perf_counter()
        await att.api.mem.WriteGuestBatch(req, metadata=att.md, timeout=600)
        emit("big_batch_request_s", time.perf_counter() - t0)
    emit("big_batch_victim_p99_ms", lat.p99() * 1e3)
    emit("big_batch_victim_worst_ms", lat.worst() * 1e3)
    await att.close()


async def track_1m_list(d: Any) -> None:
    """AddTracking of 2^20 gfns listed one by one, in random order."""
    att = Tenant(d.tcp, ATTACKER)
    n = 1 << 20
    vm = await att.new_vm(2 * n)
    gfns = np.random.default_rng(9).permutation(2 * n)[:n]
    req = pb.TrackingChangeRequest(vm=vm, gfns=gfns.tolist(), mode=pb.TRACK_MODE_WRITE)
    async with victim_meanwhile(d.tcp) as lat:
        t0 = time.perf_counter()
        await att.api.track.AddTracking(req, metadata=att.md, timeout=600)
        emit("track_1m_list_request_s", time.perf_counter() - t0)
    emit("track_1m_list_victim_p99_ms", lat.p99() * 1e3)
    emit("track_1m_list_victim_worst_ms", lat.worst() * 1e3)
    await att.close()


async def long_replay(d: Any) -> None:
    """ReplayVm of a recording of 3,000 batches of 512 scattered writes (66 MB)."""
    from tests.robustness.test_starve_big_requests import _long_recording

    recording, _ = _long_recording()
    att = Tenant(d.tcp, ATTACKER)

    async def upload() -> Any:
        for k in range(0, len(recording), 1 << 20):
            yield pb.ReplayVmRequest(vm="replayed" if k == 0 else "",
                                     data=recording[k : k + (1 << 20)])

    async with victim_meanwhile(d.tcp) as lat:
        t0 = time.perf_counter()
        await att.api.admin.ReplayVm(upload(), metadata=att.md, timeout=600)
        emit("long_replay_request_s", time.perf_counter() - t0)
    emit("long_replay_victim_p99_ms", lat.p99() * 1e3)
    emit("long_replay_victim_worst_ms", lat.worst() * 1e3)
    await att.close()


CASES = [scattered_writes, huge_slot_tracking, big_history, stalled_watch, uploads, stalls,
         leftovers, big_batch, track_1m_list, long_replay]


def _run(case: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="starve-") as tmp:
        d = start(Path(tmp))
        try:
            t0 = time.perf_counter()
            asyncio.run(case(d))
            emit(f"{case.__name__}_seconds", time.perf_counter() - t0)
        finally:
            d.stop()


def _fmt(value: float) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: list[str]) -> int:
    global _KEPT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--before", type=Path, help="an earlier checkout's server/ directory")
    args = parser.parse_args(argv)
    cases = CASES
    if args.only:
        wanted = args.only.split(",")
        cases = [c for c in CASES if c.__name__ in wanted]
        if len(cases) != len(wanted):
            parser.error(f"unknown case in {args.only}; cases: {[c.__name__ for c in CASES]}")
    for case in cases:
        if args.before is None:
            _run(case)
            continue
        figures = []
        for pythonpath in (str(args.before.resolve()), None):
            _KEPT = {}
            saved = os.environ.get("PYTHONPATH")
            if pythonpath is not None:
                os.environ["PYTHONPATH"] = pythonpath
            try:
                _run(case)
            finally:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
            figures.append(_KEPT)
        _KEPT = None
        before, after = figures
        for name in after:
            print(f"{name}: {_fmt(before.get(name, float('nan')))} -> {_fmt(after[name])}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
