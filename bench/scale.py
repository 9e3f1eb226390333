"""Scale: how costs grow with tracked gfns, VMs, watchers, history and saved state.

Run from the repository root with the project's venv::

    .venv/bin/python bench/scale.py                      # every curve (long: minutes)
    .venv/bin/python bench/scale.py --only tracking,vms  # some curves
    .venv/bin/python bench/scale.py --quick              # tiny sizes: a smoke test

Curves (several sizes each; every line is ``name: value``):

* **tracking**: one VM whose one memslot holds N = 1M, 4M and 16.8M pages (a 64 GiB
  guest at the top). In-process (a child process per size, on the domain core): track
  and untrack all N gfns in one call, as the tenant and as a lease (owners included);
  resident bytes per tracked gfn (RSS growth of the child, and what the structures
  hold); one-gfn QueryTracking and one tracked guest write, against the same slot with
  1,000 tracked gfns. Through the API (a real ``pagetrackd`` on a unix socket): the same
  N as one AddTracking/RemoveTracking range, as gfn lists (calls of 1M gfns, encoded
  before the clock starts), the daemon's RSS growth per gfn, and one-gfn QueryTracking
  and WriteGuest latency against 1,000 tracked gfns. Times are the best of two rounds.
* **vms**: one daemon grows to 1k, 10k and 100k VMs, each with a 4 GiB slot and 16
  tracked gfns spread over it: daemon RSS per VM, create rate (CreateVm +
  SetMemoryRegion + AddTracking per VM, 64 in flight), median WriteGuest latency on a
  random VM and median ListVms page (100 VMs at a random offset).
* **watchers**: 1, 100 and 1,000 Watch streams (a subscriber process), each on its own
  VM, while a writer process issues 100k tracked writes/s in total, open loop: daemon
  CPU per delivered event and p99 write-to-subscriber latency (each write carries its
  send time, CLOCK_MONOTONIC, in its 8 bytes), split at the daemon's hub stamp; whether
  the writer kept the rate and its schedule (``rate_kept``, ``writer_on_time``: the share
  of its calls issued within 2 ms of when they were due) and the CPU the writer and
  subscriber used, so a run where the load generators are the limit shows; how often the
  daemon's threads were preempted and its system CPU share, so a run where the machine
  starves the daemon shows. Then the same workload at the largest size against a plain
  grpc.aio server (``watchers_raw_*``: parse the batch, hand one ready message to the VM's
  stream): the floor that grpc.aio and the machine's load set, and our CPU per event
  against it (``cpu_per_event_vs_raw``).
* **history**: one VM with 1M events in its ring (a live Watch attached while they are
  written gives the live rate): a Watch resuming from the oldest seq, time to its first
  batch and its catch-up rate to the head; daemon RSS per held event.
* **restart**: 1,000 VMs (a slot, tenant and lease tracking, 10k events of history
  each) in a daemon with ``--state-dir``: SIGTERM to exit (the shutdown save), bytes on
  disk, start to serving with every VM loaded; then, with a save every 2 s while one
  writer writes to every VM, the writer's longest call (the pause a save causes).
* **bigsave**: one VM with 512 MiB of written guest memory: its first save under a
  writer (the writer's longest call) and the daemon's peak RSS against its RSS before.

After each curve: the per-unit cost at the largest size and the ratio largest/smallest.
The summary lines at the end have fixed names and targets (see the issue). Every daemon
and child dies with the bench (PR_SET_PDEATHSIG). Figures vary a lot on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench helpers, also if loaded by path
from _procs import dying_with_us  # noqa: E402

BIN = Path(sys.executable).parent
KIB = 1024
PAGE = 4096
SLOT_4G = 1 << 20
#: each VM's default event history bound and each Watch's default queue bound, which the
#: tenant's history_bytes and stream_queue_bytes quotas add up: raised here for many VMs
HISTORY_BYTES = 16 << 20
QUEUE_BYTES = 4 << 20

FULL = {
    "tracking": [1 << 20, 1 << 22, 1 << 24],
    "vms": [1_000, 10_000, 100_000],
    "watchers": [1, 100, 1_000],
    "history": [1 << 20],
    "restart": [1_000],
    "bigsave": [512],
}
QUICK = {
    "tracking": [1 << 12, 1 << 14, 1 << 16],
    "vms": [20, 60, 200],
    "watchers": [1, 4, 16],
    "history": [1 << 13],
    "restart": [12],
    "bigsave": [16],
}
SECTIONS = list(FULL)

WATCH_RATE = 100_000  #: tracked writes/s in total, across the VMs
#: a watchers run counts when its writer issued 99% of its calls within 2 ms of schedule
ON_TIME_NS = 2_000_000
HISTORY_EVENTS_RESTART = 10_000
QUERY_BASE_TRACKED = 1_000

_results: dict[str, float] = {}


def emit(name: str, value: float | int | str) -> None:
    if isinstance(value, float):
        value = round(value, 6 if abs(value) < 1 else 3)
    if isinstance(value, (int, float)):
        _results[name] = float(value)
    print(f"{name}: {value}", flush=True)


def label(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}m"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}ki"
    return str(n)


def per_unit(curve: str, unit: str, points: list[tuple[int, float]]) -> None:
    """The per-unit cost at the largest size and the ratio largest / smallest."""
    if len(points) < 2:
        return
    (n0, v0), (n1, v1) = points[0], points[-1]
    emit(f"{curve}_{unit}_at_{label(n1)}", v1)
    emit(f"{curve}_{unit}_ratio_{label(n1)}_vs_{label(n0)}", v1 / v0 if v0 else float("inf"))


# --------------------------------------------------------------------------- processes


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG: this process gets SIGKILL when the bench dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


#: runs argv[1:] after asking for PR_SET_PDEATHSIG (kept across exec): set in the child
#: itself, not through preexec_fn, which is unsafe once gRPC has started threads
class Daemon:
    """A pagetrackd on a unix socket in ``tmp``."""

    def __init__(self, tmp: Path, *args: str, config: str = "", name: str = "pt") -> None:
        self.tmp = tmp
        sock = tmp / f"{name}.sock"
        ready = tmp / f"{name}-{time.monotonic_ns()}.json"
        self.log = tmp / f"{name}.log"
        cmd = dying_with_us([str(BIN / "pagetrackd"),
                             "--listen", f"unix:{sock}", "--ready-file", str(ready),
                             "--log-format", "json", "--log-level", "warning", *args])
        if config:
            cfg = tmp / f"{name}.toml"
            cfg.write_text(config)
            cmd += ["--config", str(cfg)]
        self.started = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)
        deadline = time.monotonic() + 600
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                tail = self.log.read_text()[-3000:]
                raise SystemExit(f"pagetrackd did not start:\n{tail}")
            time.sleep(0.005)
        self.ready_s = time.monotonic() - self.started
        self.target = f"unix:{sock}"

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def cpu_s(self) -> float:
        return _proc_cpu_s(self.proc.pid)

    def stop(self) -> float:
        """SIGTERM; seconds until the process exited."""
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(600)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - t


@contextmanager
def daemon(tmp: Path, *args: str, config: str = "", name: str = "pt") -> Iterator[Daemon]:
    d = Daemon(tmp, *args, config=config, name=name)
    try:
        yield d
    finally:
        d.stop()


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn_child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )


def child_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise SystemExit(f"child {proc.args!r} failed (exit {proc.returncode})")
    out: dict[str, Any] = json.loads(line)
    return out


def run(coro: Awaitable[Any]) -> Any:
    import uvloop

    return uvloop.run(coro)  # type: ignore[arg-type]


def _channel(target: str) -> Any:
    import grpc

    big = 256 << 20
    return grpc.aio.insecure_channel(
        target,
        options=[("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)],
    )


def stubs(ch: Any) -> Any:
    from pagetrack.v1 import pagetrack_pb2_grpc as pbg

    class S:
        vm = pbg.VmServiceStub(ch)
        mem = pbg.MemoryServiceStub(ch)
        track = pbg.TrackingServiceStub(ch)
        lease = pbg.LeaseServiceStub(ch)
        watch = pbg.WatchServiceStub(ch)
        admin = pbg.AdminServiceStub(ch)

    return S


async def _median_latency(call: Callable[[int], Awaitable[Any]], n: int) -> float:
    lat = []
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        lat.append(time.perf_counter() - t)
    return statistics.median(lat)


# --------------------------------------------------------------------------- tracking


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _timed_pair(a: Callable[[int], Any], b: Callable[[int], Any], n: int) -> tuple[float, float]:
    """Seconds per call of ``a`` and of ``b``: seven blocks of each, interleaved (so a
    burst of load hits both alike), the median block of each."""
    ta: list[float] = []
    tb: list[float] = []
    k = max(n // 7, 1)
    for blk in range(7):
        for fn, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            for i in range(blk * k, (blk + 1) * k):
                fn(i)
            out.append((time.perf_counter() - t) / k)
    return statistics.median(ta), statistics.median(tb)


def child_track(n: int, calls: int) -> None:
    """In-process tracking figures for one slot of ``n`` pages (printed as JSON)."""
    import numpy as np

    from pagetrackd.domain import Vm

    def fresh(name: str) -> Any:
        vm = Vm(name)
        vm.set_memslot(0, 0, n)
        return vm

    every = np.arange(n, dtype=np.int64)
    # Fault the process's memory in first: on this machine a page the process touches
    # for the first time costs a host fault, which is not the track pool's doing.
    warm = fresh("warm")
    warm.track_add(every)
    warm.track_remove(every)
    warm.close()
    del warm
    gc.collect()

    out: dict[str, Any] = {}
    # Query and write cost with few tracked gfns, beside the same with every gfn tracked
    # (both with the tenant's and a lease's references).
    few = fresh("few")
    base_gfns = np.unique(np.linspace(0, n - 1, QUERY_BASE_TRACKED, dtype=np.int64))
    few.track_add(base_gfns)
    few.track_add(base_gfns, "lease:bench")
    full = fresh("full")
    full.track_add(every)
    full.track_add(every, "lease:bench")
    picks = base_gfns.tolist()  # the same gfns on both
    data = b"\x5a" * 8

    def query(vm: Any) -> Callable[[int], Any]:
        return lambda i: vm.track_query([picks[i % len(picks)]])

    def write(vm: Any) -> Callable[[int], Any]:
        return lambda i: vm.write(0, (picks[i % 256] << 12) + 8 * (i % 512), data)

    out["query_few_s"], out["query_all_s"] = _timed_pair(query(few), query(full), calls)
    out["write_few_s"], out["write_all_s"] = _timed_pair(write(few), write(full), calls)
    for vm in (few, full):
        vm.close()
    del few, full, vm
    gc.collect()

    rounds = []
    for r in range(2):
        vm = fresh(f"all{r}")
        gc.collect()
        rss0 = _rss()
        t = time.perf_counter()
        started = vm.track_add(every)
        add_s = time.perf_counter() - t
        assert started == n, started
        gc.collect()
        rss_tenant = _rss()
        t = time.perf_counter()
        vm.track_add(every, "lease:bench")
        add_owner_s = time.perf_counter() - t
        gc.collect()
        rss_both = _rss()
        nbytes = vm.counter_bytes
        info = vm.track_query([n // 2])[0]
        assert info.owners == {"tenant": 1, "lease:bench": 1}, info.owners
        t = time.perf_counter()
        vm.track_remove(every, "lease:bench")
        remove_owner_s = time.perf_counter() - t
        t = time.perf_counter()
        stopped = vm.track_remove(every)
        remove_s = time.perf_counter() - t
        assert stopped == n and vm.tracked_count == 0
        rounds.append({
            "add_s": add_s, "add_owner_s": add_owner_s, "remove_s": remove_s,
            "remove_owner_s": remove_owner_s,
            "rss_tenant_per_gfn": (rss_tenant - rss0) / n,
            "rss_both_per_gfn": (rss_both - rss0) / n,
            "struct_per_gfn": nbytes / n,
        })
        vm.close()
        del vm
        gc.collect()
    for k in rounds[0]:
        out[k] = min(r[k] for r in rounds)
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out), flush=True)


async def _atimed_pair(
    a: Callable[[int], Awaitable[Any]], b: Callable[[int], Awaitable[Any]], n: int
) -> tuple[float, float]:
    """:func:`_timed_pair` for calls: the median latency of each, in interleaved blocks."""
    la: list[float] = []
    lb: list[float] = []
    k = max(n // 7, 1)
    for blk in range(7):
        for fn, out in ((a, la), (b, lb)):
            for i in range(blk * k, (blk + 1) * k):
                t = time.perf_counter()
                await fn(i)
                out.append(time.perf_counter() - t)
    return statistics.median(la), statistics.median(lb)


async def _api_tracking(target: str, n: int, calls: int) -> dict[str, float]:
    """Tracking figures for one slot of ``n`` pages through a fresh daemon."""
    import numpy as np

    from pagetrack.v1 import pagetrack_pb2 as pb

    async with _channel(target) as ch:
        s = stubs(ch)
        add_raw = ch.unary_unary(
            "/pagetrack.v1.TrackingService/AddTracking",
            request_serializer=None, response_deserializer=pb.TrackingChangeResponse.FromString,
        )
        rm_raw = ch.unary_unary(
            "/pagetrack.v1.TrackingService/RemoveTracking",
            request_serializer=None, response_deserializer=pb.TrackingChangeResponse.FromString,
        )

        async def rss() -> int:
            return _daemon_rss_by_info(await s.admin.GetServerInfo(pb.GetServerInfoRequest()))

        info = await s.admin.GetServerInfo(pb.GetServerInfoRequest())
        per_call = min(1 << 20, info.limits.max_gfns_per_request)
        for vm in ("few", "full"):
            await s.vm.CreateVm(pb.CreateVmRequest(name=vm))
            await s.mem.SetMemoryRegion(
                pb.SetMemoryRegionRequest(vm=vm, slot=0, base_gfn=0, npages=n)
            )
        rng = pb.GfnRange(start=0, count=n)
        lists = [
            pb.TrackingChangeRequest(
                vm="full", gfns=np.arange(lo, min(lo + per_call, n), dtype=np.uint64)
            ).SerializeToString()
            for lo in range(0, n, per_call)
        ]
        picks = np.unique(np.linspace(0, n - 1, QUERY_BASE_TRACKED, dtype=np.int64)).tolist()
        await s.track.AddTracking(pb.TrackingChangeRequest(vm="few", gfns=picks))

        def query(vm: str) -> Callable[[int], Awaitable[Any]]:
            async def call(i: int) -> None:
                await s.track.QueryTracking(pb.QueryTrackingRequest(
                    vm=vm, gfns=[picks[(i * 7919) % len(picks)]], include_owners=True))
            return call

        def write(vm: str) -> Callable[[int], Awaitable[Any]]:
            async def call(i: int) -> None:
                await s.mem.WriteGuest(pb.WriteGuestRequest(
                    vm=vm, vcpu=0, gpa=(picks[i % 256] << 12) + 8 * (i % 512), data=b"\x5a" * 8))
            return call

        fig: dict[str, float] = {}
        rounds: list[dict[str, float]] = []
        for r in range(2):
            rss0 = await rss()
            t = time.perf_counter()
            resp = await s.track.AddTracking(pb.TrackingChangeRequest(vm="full", ranges=[rng]))
            add = time.perf_counter() - t
            assert resp.transitions == n, resp
            if r == 0:
                # the first add on a fresh daemon: what it holds afterwards
                fig["rss_per_gfn"] = (await rss() - rss0) / n
                fig["query_few_s"], fig["query_all_s"] = await _atimed_pair(
                    query("few"), query("full"), calls)
                fig["write_few_s"], fig["write_all_s"] = await _atimed_pair(
                    write("few"), write("full"), calls)
            t = time.perf_counter()
            resp = await s.track.RemoveTracking(pb.TrackingChangeRequest(vm="full", ranges=[rng]))
            remove = time.perf_counter() - t
            assert resp.transitions == n, resp
            t = time.perf_counter()
            for body in lists:
                await add_raw(body)
            add_list = time.perf_counter() - t
            t = time.perf_counter()
            for body in lists:
                await rm_raw(body)
            remove_list = time.perf_counter() - t
            rounds.append({
                "add_range_s": add, "remove_range_s": remove,
                "add_list_s": add_list, "remove_list_s": remove_list,
            })
        for k in rounds[0]:
            fig[k] = min(r[k] for r in rounds)
        return fig


def _daemon_rss_by_info(info: Any) -> int:
    return int(info.process.rss_bytes)


def section_tracking(sizes: list[int], quick: bool, tmp: Path) -> None:
    calls = 2_000 if quick else 70_000
    inproc: list[tuple[int, dict[str, Any]]] = []
    for n in sizes:
        # one child at a time: each holds up to a few hundred MiB at 16.8M
        inproc.append((n, child_json(spawn_child("track", str(n), str(calls)))))
    for n, r in inproc:
        lb = label(n)
        emit(f"track_add_{lb}_s", r["add_s"])
        emit(f"track_remove_{lb}_s", r["remove_s"])
        emit(f"track_add_{lb}_lease_s", r["add_owner_s"])
        emit(f"track_remove_{lb}_lease_s", r["remove_owner_s"])
        emit(f"track_{lb}_rss_bytes_per_gfn", r["rss_tenant_per_gfn"])
        emit(f"track_{lb}_with_lease_rss_bytes_per_gfn", r["rss_both_per_gfn"])
        emit(f"track_{lb}_with_lease_pool_bytes_per_gfn", r["struct_per_gfn"])
        emit(f"track_{lb}_query_us", r["query_all_s"] * 1e6)
        emit(f"track_{lb}_query_vs_1000_tracked", r["query_all_s"] / r["query_few_s"])
        emit(f"track_{lb}_write_us", r["write_all_s"] * 1e6)
        emit(f"track_{lb}_write_vs_1000_tracked", r["write_all_s"] / r["write_few_s"])
        emit(f"track_{lb}_child_maxrss_mib", r["maxrss_mib"])
    per_unit("track_add", "ns_per_gfn", [(n, r["add_s"] / n * 1e9) for n, r in inproc])
    per_unit("track_remove", "ns_per_gfn", [(n, r["remove_s"] / n * 1e9) for n, r in inproc])
    per_unit("track_rss", "bytes_per_gfn", [(n, r["rss_both_per_gfn"]) for n, r in inproc])

    api: dict[int, dict[str, float]] = {}
    for n in sizes:
        with daemon(tmp, name=f"tracking{n}") as d:
            api[n] = run(_api_tracking(d.target, n, calls // 10))
    for n, f in api.items():
        lb = label(n)
        emit(f"track_add_{lb}_api_range_s", f["add_range_s"])
        emit(f"track_remove_{lb}_api_range_s", f["remove_range_s"])
        emit(f"track_add_{lb}_api_list_s", f["add_list_s"])
        emit(f"track_remove_{lb}_api_list_s", f["remove_list_s"])
        emit(f"track_{lb}_api_rss_bytes_per_gfn", f["rss_per_gfn"])
        emit(f"track_{lb}_api_query_ms", f["query_all_s"] * 1e3)
        emit(f"track_{lb}_api_query_vs_1000_tracked", f["query_all_s"] / f["query_few_s"])
        emit(f"track_{lb}_api_write_ms", f["write_all_s"] * 1e3)
        emit(f"track_{lb}_api_write_vs_1000_tracked", f["write_all_s"] / f["write_few_s"])
    pts = sorted(api.items())
    per_unit("track_add_api_range", "ns_per_gfn", [(n, f["add_range_s"] / n * 1e9) for n, f in pts])
    per_unit("track_add_api_list", "ns_per_gfn", [(n, f["add_list_s"] / n * 1e9) for n, f in pts])

    top_n, top = inproc[-1]
    top_api = api[sizes[-1]]
    _summary["track_add_16m_s"] = top["add_s"]
    _summary["track_add_16m_api_range_s"] = top_api["add_range_s"]
    _summary["tracked_bytes_per_gfn"] = max(top["rss_both_per_gfn"], top["struct_per_gfn"])
    _summary["track_16m_query_vs_1000_tracked"] = top["query_all_s"] / top["query_few_s"]
    _summary["track_16m_write_vs_1000_tracked"] = top["write_all_s"] / top["write_few_s"]


_summary: dict[str, float] = {}


# --------------------------------------------------------------------------- vms


def _spread(n_tracked: int, npages: int, i: int) -> list[int]:
    step = npages // n_tracked
    return [(k * step + i * 97) % npages for k in range(n_tracked)]


async def _create_vms(target: str, first: int, last: int, in_flight: int = 64) -> float:
    from pagetrack.v1 import pagetrack_pb2 as pb

    async with _channel(target) as ch:
        s = stubs(ch)
        nxt = first

        async def worker() -> None:
            nonlocal nxt
            while nxt < last:
                i = nxt
                nxt += 1
                name = f"vm-{i:06d}"
                await s.vm.CreateVm(pb.CreateVmRequest(name=name))
                await s.mem.SetMemoryRegion(
                    pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=0, npages=SLOT_4G)
                )
                await s.track.AddTracking(
                    pb.TrackingChangeRequest(vm=name, gfns=_spread(16, SLOT_4G, i))
                )

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return time.perf_counter() - t


async def _vm_costs(target: str, count: int, calls: int) -> tuple[float, float]:
    from pagetrack.v1 import pagetrack_pb2 as pb

    rnd = random.Random(count)
    async with _channel(target) as ch:
        s = stubs(ch)

        async def w(i: int) -> None:
            v = rnd.randrange(count)
            g = _spread(16, SLOT_4G, v)[i % 16]
            await s.mem.WriteGuest(pb.WriteGuestRequest(
                vm=f"vm-{v:06d}", vcpu=0, gpa=(g << 12) + 8 * (i % 512), data=b"\x5a" * 8))

        async def page(i: int) -> None:
            start = rnd.randrange(max(count - 100, 1))
            r = await s.vm.ListVms(pb.ListVmsRequest(page_size=100, page_token=str(start)))
            assert len(r.vms) == min(100, count - start)

        await _median_latency(w, 20)
        return await _median_latency(w, calls), await _median_latency(page, max(calls // 10, 20))


def section_vms(sizes: list[int], quick: bool, tmp: Path) -> None:
    calls = 200 if quick else 1_000
    cfg = (
        f"[quotas]\nvms = {sizes[-1] + 10}\nguest_pages = {(sizes[-1] + 10) * SLOT_4G}\n"
        f"history_bytes = {(sizes[-1] + 10) * HISTORY_BYTES}\n"
        f"tracking_bytes = {(sizes[-1] + 10) * (64 << 10)}\n"
        f"guest_memory_bytes = {(sizes[-1] + 10) * (64 << 10)}\n"
    )
    points: list[tuple[int, float, float, float, float]] = []
    with daemon(tmp, config=cfg, name="vms") as d:
        base = d.rss()
        have = 0
        for n in sizes:
            secs = run(_create_vms(d.target, have, n))
            rate = (n - have) / secs
            have = n
            gc.collect()
            rss_per_vm = (d.rss() - base) / n
            write_s, page_s = run(_vm_costs(d.target, n, calls))
            points.append((n, rss_per_vm, rate, write_s, page_s))
    for n, rss_per_vm, rate, write_s, page_s in points:
        lb = label(n)
        emit(f"vms_{lb}_rss_kib_per_vm", rss_per_vm / KIB)
        emit(f"vms_{lb}_create_per_s", rate)
        emit(f"vms_{lb}_write_ms", write_s * 1e3)
        emit(f"vms_{lb}_list_page_ms", page_s * 1e3)
    per_unit("vms_rss", "kib_per_vm", [(p[0], p[1] / KIB) for p in points])
    per_unit("vms_write", "ms", [(p[0], p[3] * 1e3) for p in points])
    per_unit("vms_list_page", "ms", [(p[0], p[4] * 1e3) for p in points])
    _summary["vms_100k_rss_kib_per_vm"] = points[-1][1] / KIB


# --------------------------------------------------------------------------- watchers
#
# The clock: the writer puts CLOCK_MONOTONIC (ns, one clock for every process) in each
# write's 8 bytes as it issues the call; the subscriber reads the clock once the message
# is parsed. The daemon stamps each batch with the wall clock as it reaches the hub
# (EventBatch.timestamp_ns), which splits the latency into write-to-hub (the writer's
# call, the daemon's write path) and hub-to-subscriber (queue, stream, socket, parse).
# Every process uses one window [t0, t1] of CLOCK_MONOTONIC: the parent samples the
# processes' CPU at its edges, the writer counts the writes it issues in it, the
# subscriber the events it receives in it.


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ms(ns: Any, q: float) -> float:
    import numpy as np

    return float(np.percentile(ns, q)) / 1e6 if len(ns) else 0.0


async def _watch_subscriber(target: str, vms: int) -> None:
    """Hold one Watch per VM; report the events and latencies received in the window."""
    import grpc
    import numpy as np

    from pagetrack.v1 import pagetrack_pb2 as pb

    total: list[Any] = []  # per message: each event's write-to-subscriber ns
    hub: list[Any] = []  # per message: each event's hub-to-subscriber ns (wall clock)
    got = got_written = gaps = msgs = registered = 0
    # no window until the parent sends one: the writer's first call (stamped 0, to
    # connect) may arrive before it and must not count as written in the window
    t0, t1 = 1, 0
    async with _channel(target) as ch:
        s = stubs(ch)

        async def read(i: int) -> None:
            nonlocal registered, got, got_written, gaps, msgs
            call = s.watch.Watch(pb.WatchRequest(vm=f"w-{i:05d}", queue_limit=1 << 20))
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                async for msg in call:
                    kind = msg.WhichOneof("kind")
                    if kind == "events":
                        now = time.monotonic_ns()
                        wall = time.time_ns()
                        ev = msg.events
                        sent = np.frombuffer(ev.data, dtype="<u8").astype(np.int64)
                        got_written += int(np.count_nonzero((sent >= t0) & (sent <= t1)))
                        if t0 <= now <= t1:
                            got += sent.size
                            msgs += 1
                            total.append(now - sent)
                            hub.append(wall - np.array(ev.timestamp_ns, dtype=np.int64))
                    elif kind == "gap":
                        gaps += msg.gap.count
                    elif kind == "registered":
                        registered += 1

        tasks = [asyncio.create_task(read(i)) for i in range(vms)]
        while registered < vms:  # noqa: ASYNC110 - counted by many streams; a deadline bounds it
            await asyncio.sleep(0.01)
        print(json.dumps({"registered": vms}), flush=True)
        times = json.loads(await asyncio.get_running_loop().run_in_executor(
            None, sys.stdin.readline))
        t0, t1, end = times["t0"], times["t1"], times["end"]
        await asyncio.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lat = np.concatenate(total) if total else np.zeros(0)
    hub_lat = np.concatenate(hub) if hub else np.zeros(0)
    print(json.dumps({
        "events": got, "messages": msgs, "written_received": got_written, "gap_events": gaps,
        "p50_ms": _ms(lat, 50), "p99_ms": _ms(lat, 99), "max_ms": _ms(lat, 100),
        "hub_p50_ms": _ms(hub_lat, 50), "hub_p99_ms": _ms(hub_lat, 99),
        "to_hub_p99_ms": _ms(lat - hub_lat, 99) if lat.size else 0.0,
    }), flush=True)


async def _watch_writer(target: str, vms: int, rate: int) -> None:
    """Issue ``rate`` tracked writes/s in total, open loop and evenly spaced: one
    WriteGuestBatch call of ``rate / 1000`` writes every millisecond, to the next VM in
    turn (the write side does the same work whatever the number of streams; only the
    fan-out differs). A call does not wait for earlier ones unless 64 are in flight.
    Reports how late it issued against its schedule (in the window): a writer that
    cannot keep the rate makes the run measure nothing."""
    import struct

    import grpc
    import numpy as np

    from pagetrack.v1 import pagetrack_pb2 as pb

    tick = 1_000_000  # ns between calls
    per_call = max(rate * tick // 1_000_000_000, 1)
    gpas = [(k % 16) * PAGE + 8 * (k // 16 % 512) for k in range(per_call)]
    # Encoded once per VM; each call appends the data field (5) with its send time in
    # every write's bytes (protobuf takes fields in any order): the writer stays cheap.
    heads = [
        pb.WriteGuestBatchRequest(vm=f"w-{i:05d}", gpa=gpas, vcpu=[0], length=[8] * per_call)
        .SerializeToString() for i in range(vms)
    ]
    data_tag = b"\x2a" + _varint(8 * per_call)
    stamp = struct.Struct("<Q").pack
    sent = in_window = failed = max_pending = 0
    lags: list[int] = []
    call_ns: list[int] = []
    async with _channel(target) as ch:
        write = ch.unary_unary("/pagetrack.v1.MemoryService/WriteGuestBatch",
                               request_serializer=None, response_deserializer=None)

        async def one(body: bytes, issued: int) -> None:
            nonlocal failed
            try:
                await write(body)
            except grpc.aio.AioRpcError:
                failed += 1
                return
            call_ns.append(time.monotonic_ns() - issued)

        await write(heads[0] + data_tag + stamp(0) * per_call)  # channel connected
        print(json.dumps({"ready": True}), flush=True)
        times = json.loads(await asyncio.get_running_loop().run_in_executor(
            None, sys.stdin.readline))
        start, t0, t1, stop = times["start"], times["t0"], times["t1"], times["stop"]
        pending: set[asyncio.Future[Any]] = set()
        k = nxt = 0
        while (due := start + k * tick) < stop:
            now = time.monotonic_ns()
            if now < due:
                await asyncio.sleep((due - now) / 1e9)
                now = time.monotonic_ns()
            if t0 <= due <= t1:
                lags.append(now - due)
            body = heads[nxt] + data_tag + stamp(now) * per_call
            nxt = (nxt + 1) % vms
            sent += per_call
            if t0 <= now <= t1:
                in_window += per_call
            t = asyncio.ensure_future(one(body, now))
            pending.add(t)
            t.add_done_callback(pending.discard)
            k += 1
            max_pending = max(max_pending, len(pending))
            while len(pending) > 64:  # behind: do not queue without bound
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
    lag = np.array(lags, dtype=np.int64)
    print(json.dumps({
        "sent": sent, "in_window": in_window, "failed_calls": failed,
        "lag_p99_ms": _ms(lag, 99), "lag_max_ms": _ms(lag, 100), "max_pending": max_pending,
        # calls issued at most ON_TIME_NS after they were due, of those due in the window
        "on_time": float(np.mean(lag <= ON_TIME_NS)) if lag.size else 0.0,
        "call_p50_ms": _ms(np.array(call_ns), 50), "call_p99_ms": _ms(np.array(call_ns), 99),
    }), flush=True)


async def _setup_watch_vms(target: str, vms: int) -> None:
    from pagetrack.v1 import pagetrack_pb2 as pb

    async with _channel(target) as ch:
        s = stubs(ch)
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                name = f"w-{i:05d}"
                await s.vm.CreateVm(pb.CreateVmRequest(name=name))
                await s.mem.SetMemoryRegion(
                    pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=0, npages=256))
                await s.track.AddTracking(pb.TrackingChangeRequest(
                    vm=name, ranges=[pb.GfnRange(start=0, count=16)]))

        await asyncio.gather(*(one(i) for i in range(vms)))


async def _raw_watch_server(sock: str) -> None:
    """The watchers workload's floor: plain grpc.aio, no pagetrack. WriteGuestBatch
    parses the request, stamps it and hands one ready WatchResponse (the writes' data and
    a timestamp per event) to the VM's stream; Watch sends ``registered`` and then what
    it is handed. Same socket, message limits, uvloop and clients as the daemon's run."""
    import grpc

    from pagetrack.v1 import pagetrack_pb2 as pb

    queues: dict[str, asyncio.Queue[bytes]] = {}

    def queue(vm: str) -> asyncio.Queue[bytes]:
        q = queues.get(vm)
        if q is None:
            q = queues[vm] = asyncio.Queue()
        return q

    async def write(body: bytes, context: Any) -> bytes:
        req = pb.WriteGuestBatchRequest.FromString(body)
        n = len(req.gpa)
        now = time.time_ns()
        msg = pb.WatchResponse(events=pb.EventBatch(
            seq=range(1, n + 1), gpa=req.gpa, length=req.length, vcpu=[0] * n, flags=[0] * n,
            timestamp_ns=[now] * n, data=req.data, head_seq=n))
        queue(req.vm).put_nowait(msg.SerializeToString())
        return b""

    async def watch(body: bytes, context: Any) -> Any:
        q = queue(pb.WatchRequest.FromString(body).vm)
        yield pb.WatchResponse(registered=pb.Registered(notifier_id=1)).SerializeToString()
        while True:
            yield await q.get()

    handler = grpc.method_handlers_generic_handler("pagetrack.v1.MemoryService", {
        "WriteGuestBatch": grpc.unary_unary_rpc_method_handler(write),
    })
    watch_handler = grpc.method_handlers_generic_handler("pagetrack.v1.WatchService", {
        "Watch": grpc.unary_stream_rpc_method_handler(watch),
    })
    big = 256 << 20
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", big),
                                      ("grpc.max_send_message_length", big)])
    server.add_generic_rpc_handlers((handler, watch_handler))
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.stop(0)


def _send_json(proc: subprocess.Popen[str], obj: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(obj) + "\n")
    proc.stdin.flush()


def _sleep_until(mono_ns: int) -> None:
    left = (mono_ns - time.monotonic_ns()) / 1e9
    if left > 0:
        time.sleep(left)


def _sched_stats(pid: int) -> tuple[int, float]:
    """Times the process's threads were preempted (nonvoluntary context switches) and
    its system CPU seconds."""
    preempted = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    preempted += int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        sys_s = int(f.read().rsplit(")", 1)[1].split()[12]) / os.sysconf("SC_CLK_TCK")
    return preempted, sys_s


def _watch_run(
    target: str, server_pid: int, w: int, rate: int, quick: bool
) -> tuple[list[float], dict[str, Any], dict[str, Any], float, tuple[float, float]]:
    """One measured window of the watchers workload against the server at ``target``:
    CPU seconds (server, writer, subscriber), the subscriber's and the writer's reports,
    the load average, and the server's preemptions/s and system CPU share."""
    warm_s, measure_s, drain_s = (0.5, 1.0, 1.0) if quick else (2.0, 5.0, 5.0)
    sub = spawn_child("subscriber", target, str(w))
    writer = spawn_child("writer", target, str(w), str(rate))
    child_json(sub)  # every stream registered
    child_json(writer)  # connected
    start = time.monotonic_ns() + 100_000_000
    t0 = start + int(warm_s * 1e9)
    t1 = t0 + int(measure_s * 1e9)
    stop = t1 + 300_000_000
    _send_json(sub, {"t0": t0, "t1": t1, "end": stop + int(drain_s * 1e9)})
    _send_json(writer, {"start": start, "t0": t0, "t1": t1, "stop": stop})
    procs = (server_pid, writer.pid, sub.pid)
    _sleep_until(t0)
    cpu0 = [_proc_cpu_s(p) for p in procs]
    sched0 = _sched_stats(server_pid)
    load = os.getloadavg()[0]
    _sleep_until(t1)
    cpu = [_proc_cpu_s(p) - c for p, c in zip(procs, cpu0, strict=True)]
    sched1 = _sched_stats(server_pid)
    wr = child_json(writer)
    sr = child_json(sub)
    writer.wait()
    sub.wait()
    sched = ((sched1[0] - sched0[0]) / measure_s, (sched1[1] - sched0[1]) / max(cpu[0], 1e-9))
    return cpu, sr, wr, load, sched


def _emit_watch_run(
    prefix: str, rate: int, quick: bool, run_: tuple[Any, ...]
) -> float:
    """Print one run's lines; returns the server's CPU seconds per delivered event."""
    cpu, sr, wr, load, sched = run_
    measure_s = 1.0 if quick else 5.0
    cpu_per_event: float = cpu[0] / max(sr["events"], 1)
    writes_per_s = wr["in_window"] / measure_s
    emit(f"{prefix}_loadavg_1m", load)
    emit(f"{prefix}_writes_per_s", writes_per_s)
    emit(f"{prefix}_rate_kept", writes_per_s / rate)
    emit(f"{prefix}_writer_on_time", wr["on_time"])
    emit(f"{prefix}_writer_lag_p99_ms", wr["lag_p99_ms"])
    emit(f"{prefix}_writer_max_in_flight", wr["max_pending"])
    emit(f"{prefix}_write_call_p99_ms", wr["call_p99_ms"])
    emit(f"{prefix}_failed_write_calls", wr["failed_calls"])
    emit(f"{prefix}_delivered_per_s", sr["events"] / measure_s)
    emit(f"{prefix}_messages_per_s", sr["messages"] / measure_s)
    # written in the window but not received by the end (drain_s later), and gaps
    emit(f"{prefix}_undelivered", wr["in_window"] - sr["written_received"])
    emit(f"{prefix}_gap_events", sr["gap_events"])
    emit(f"{prefix}_daemon_cpu_cores", cpu[0] / measure_s)
    emit(f"{prefix}_daemon_sys_share", sched[1])
    emit(f"{prefix}_daemon_preempted_per_s", sched[0])
    emit(f"{prefix}_writer_cpu_cores", cpu[1] / measure_s)
    emit(f"{prefix}_subscriber_cpu_cores", cpu[2] / measure_s)
    emit(f"{prefix}_cpu_us_per_event", cpu_per_event * 1e6)
    emit(f"{prefix}_cpu_us_per_message", cpu[0] / max(sr["messages"], 1) * 1e6)
    emit(f"{prefix}_p50_ms", sr["p50_ms"])
    emit(f"{prefix}_p99_ms", sr["p99_ms"])
    emit(f"{prefix}_max_ms", sr["max_ms"])
    emit(f"{prefix}_write_to_hub_p99_ms", sr["to_hub_p99_ms"])
    emit(f"{prefix}_hub_to_subscriber_p50_ms", sr["hub_p50_ms"])
    emit(f"{prefix}_hub_to_subscriber_p99_ms", sr["hub_p99_ms"])
    return cpu_per_event


def section_watchers(sizes: list[int], quick: bool, tmp: Path) -> None:
    rate = WATCH_RATE // 10 if quick else WATCH_RATE
    cfg = (
        f"[quotas]\nvms = {sizes[-1] + 10}\nwatchers = {sizes[-1] + 10}\n"
        f"history_bytes = {(sizes[-1] + 10) * HISTORY_BYTES}\n"
        f"stream_queue_bytes = {(sizes[-1] + 10) * QUEUE_BYTES}\n"
    )
    points = []
    for w in sizes:
        with daemon(tmp, config=cfg, name=f"watch{w}") as d:
            run(_setup_watch_vms(d.target, w))
            one = _watch_run(d.target, d.proc.pid, w, rate, quick)
        cpu_per_event = _emit_watch_run(f"watchers_{label(w)}", rate, quick, one)
        points.append((w, cpu_per_event, one[1], one[2]))
    # The same workload on plain grpc.aio at the largest size, right after: the floor
    # that grpc.aio, Python and this machine's load set for the latency and the CPU.
    w = sizes[-1]
    sock = tmp / "raw-watch.sock"
    raw = spawn_child("rawserver", str(sock))
    try:
        child_json(raw)
        base = _watch_run(f"unix:{sock}", raw.pid, w, rate, quick)
    finally:
        raw.kill()
        raw.wait()
    raw_cpu = _emit_watch_run(f"watchers_raw_{label(w)}", rate, quick, base)
    emit(f"watchers_{label(w)}_cpu_per_event_vs_raw", points[-1][1] / max(raw_cpu, 1e-12))
    per_unit("watchers_cpu", "us_per_event", [(p[0], p[1] * 1e6) for p in points])
    _summary["watchers_1000_cpu_per_event_ratio"] = points[-1][1] / max(points[0][1], 1e-12)
    _summary["watchers_1000_p99_ms"] = points[-1][2]["p99_ms"]
    _summary["watchers_1000_writer_on_time"] = points[-1][3]["on_time"]


# --------------------------------------------------------------------------- history


async def _history(target: str, events: int) -> dict[str, float]:
    from pagetrack.v1 import pagetrack_pb2 as pb

    async with _channel(target) as ch:
        s = stubs(ch)
        await s.vm.CreateVm(pb.CreateVmRequest(name="hist"))
        await s.mem.SetMemoryRegion(
            pb.SetMemoryRegionRequest(vm="hist", slot=0, base_gfn=0, npages=4096))
        await s.track.AddTracking(pb.TrackingChangeRequest(
            vm="hist", ranges=[pb.GfnRange(start=0, count=256)]))
        rss0 = _daemon_rss_by_info(await s.admin.GetServerInfo(pb.GetServerInfoRequest()))
        per_call = min(8192, events)
        gpas = [(k % 256) * PAGE + 8 * (k // 256 % 512) for k in range(per_call)]
        req = pb.WriteGuestBatchRequest(vm="hist", gpa=gpas, vcpu=[0] * per_call,
                                        length=[8] * per_call, data=b"\x5a" * 8 * per_call)
        # A live Watch while the events are written: the live rate.
        live_got = 0
        live_done = asyncio.Event()
        live = s.watch.Watch(pb.WatchRequest(vm="hist", queue_limit=1 << 22))
        registered = asyncio.Event()
        t_first = [0.0, 0.0]

        async def live_reader() -> None:
            nonlocal live_got
            async for msg in live:
                kind = msg.WhichOneof("kind")
                if kind == "registered":
                    registered.set()
                elif kind == "events":
                    if not live_got:
                        t_first[0] = time.perf_counter()
                    live_got += len(msg.events.seq)
                    if live_got >= events:
                        t_first[1] = time.perf_counter()
                        live_done.set()
                        return

        reader = asyncio.create_task(live_reader())
        await registered.wait()
        t = time.perf_counter()
        for _ in range(events // per_call):
            await s.mem.WriteGuestBatch(req)
        write_s = time.perf_counter() - t
        await live_done.wait()
        live.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        live_rate = events / (t_first[1] - t)
        rss1 = _daemon_rss_by_info(await s.admin.GetServerInfo(pb.GetServerInfoRequest()))
        vm = (await s.vm.GetVm(pb.GetVmRequest(vm="hist"))).vm
        held = vm.head_seq - vm.oldest_seq + 1
        # Resume from the oldest held seq.
        t = time.perf_counter()
        first = 0.0
        got = 0
        # The stream's default batch size (4096 events): the ring's stored batches of 8192
        # are cut in two on their way out.
        call = s.watch.Watch(pb.WatchRequest(vm="hist", start_seq=vm.oldest_seq,
                                             queue_limit=1 << 22))
        nxt = vm.oldest_seq
        msgs = 0
        async for msg in call:
            if msg.WhichOneof("kind") == "events":
                if not got:
                    first = time.perf_counter() - t
                seqs = msg.events.seq
                # every held event, once, in order: the catch-up is counted, not assumed
                assert seqs[0] == nxt and seqs[-1] == nxt + len(seqs) - 1, (nxt, seqs[0])
                nxt += len(seqs)
                got += len(seqs)
                msgs += 1
                if got >= held:
                    break
        catch_s = time.perf_counter() - t
        call.cancel()
        assert got == held and nxt == vm.head_seq + 1, (got, held)
        return {
            "held": held, "write_rate": events / write_s, "live_rate": live_rate,
            "first_batch_s": first, "catch_up_rate": got / catch_s, "messages": msgs,
            "rss_per_event": (rss1 - rss0) / held,
        }


def section_history(sizes: list[int], quick: bool, tmp: Path) -> None:
    n = sizes[-1]
    with daemon(tmp, "--history-events", str(n), "--history-bytes", str(n * 64),
                name="history") as d:
        r = run(_history(d.target, n))
    lb = label(n)
    emit(f"history_{lb}_held_events", r["held"])
    emit(f"history_{lb}_write_events_per_s", r["write_rate"])
    emit(f"history_{lb}_live_events_per_s", r["live_rate"])
    emit(f"resume_{lb}_first_batch_ms", r["first_batch_s"] * 1e3)
    emit(f"resume_{lb}_catch_up_events_per_s", r["catch_up_rate"])
    emit(f"resume_{lb}_catch_up_messages", r["messages"])
    emit(f"resume_{lb}_catch_up_vs_live", r["catch_up_rate"] / r["live_rate"])
    emit(f"history_{lb}_rss_bytes_per_event", r["rss_per_event"])
    _summary["resume_1m_first_batch_ms"] = r["first_batch_s"] * 1e3


# --------------------------------------------------------------------------- restart


async def _fill_restart(target: str, vms: int, events: int) -> None:
    from pagetrack.v1 import pagetrack_pb2 as pb

    async with _channel(target) as ch:
        s = stubs(ch)
        sem = asyncio.Semaphore(16)
        per_call = min(5000, events)
        gpas = [(k % 64) * PAGE + 8 * (k // 64 % 512) for k in range(per_call)]
        data = b"\x5a" * 8 * per_call

        async def one(i: int) -> None:
            async with sem:
                name = f"r-{i:05d}"
                await s.vm.CreateVm(pb.CreateVmRequest(name=name))
                await s.mem.SetMemoryRegion(
                    pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=0, npages=1 << 16))
                await s.track.AddTracking(pb.TrackingChangeRequest(
                    vm=name, ranges=[pb.GfnRange(start=0, count=64)]))
                lease = (await s.lease.CreateLease(
                    pb.CreateLeaseRequest(ttl_ms=3_600_000, label=name))).lease
                await s.track.AddTracking(pb.TrackingChangeRequest(
                    vm=name, lease_id=lease.id, gfns=_spread(16, 1 << 16, i)))
                for _ in range(events // per_call):
                    await s.mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
                        vm=name, gpa=gpas, vcpu=[0] * per_call, length=[8] * per_call,
                        data=data))

        await asyncio.gather(*(one(i) for i in range(vms)))


async def _check_loaded(target: str, vms: int) -> None:
    from pagetrack.v1 import pagetrack_pb2 as pb

    async with _channel(target) as ch:
        s = stubs(ch)
        r = await s.vm.ListVms(pb.ListVmsRequest(page_size=1000))
        total = len(r.vms)
        while r.next_page_token:
            r = await s.vm.ListVms(pb.ListVmsRequest(page_size=1000, page_token=r.next_page_token))
            total += len(r.vms)
        assert total == vms, total
        q = await s.track.QueryTracking(pb.QueryTrackingRequest(
            vm="r-00000", gfns=[_spread(16, 1 << 16, 0)[0]], include_owners=True))
        assert len(q.gfns[0].owners) >= 1, q


async def _writer_pauses(target: str, vms: int, seconds: float) -> tuple[float, float, int]:
    from pagetrack.v1 import pagetrack_pb2 as pb

    lat = []
    async with _channel(target) as ch:
        s = stubs(ch)
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds:
            t = time.perf_counter()
            await s.mem.WriteGuest(pb.WriteGuestRequest(
                vm=f"r-{i % vms:05d}", vcpu=0, gpa=(i % 64) * PAGE, data=b"\x5a" * 8))
            lat.append(time.perf_counter() - t)
            i += 1
    return max(lat), statistics.median(lat), len(lat)


def _save_times(log: Path) -> list[float]:
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "state.saved" and "s" in rec:
            out.append(float(rec["s"]))
    return out


def section_restart(sizes: list[int], quick: bool, tmp: Path) -> None:
    n = sizes[-1]
    events = 1_000 if quick else HISTORY_EVENTS_RESTART
    state = tmp / "state"
    cfg = (
        f"[quotas]\nvms = {n + 10}\nhistory_bytes = {(n + 10) * HISTORY_BYTES}\n"
        f"guest_memory_bytes = {(n + 10) << 20}\ntracking_bytes = {(n + 10) << 20}\n"
        f"leases = {n + 10}\n"
    )
    d = Daemon(tmp, "--state-dir", str(state), "--save-interval", "86400", config=cfg,
               name="restart1")
    try:
        t = time.perf_counter()
        run(_fill_restart(d.target, n, events))
        fill_s = time.perf_counter() - t
        rss = d.rss()
    finally:
        save_s = d.stop()
    disk = sum(p.stat().st_size for p in state.rglob("*") if p.is_file())
    d2 = Daemon(tmp, "--state-dir", str(state), "--save-interval", "2", "--log-level", "debug",
                config=cfg, name="restart2")
    try:
        load_s = d2.ready_s
        run(_check_loaded(d2.target, n))
        pause_s, median_s, writes = run(_writer_pauses(d2.target, n, 4.0 if quick else 8.0))
        saves = _save_times(d2.log)
    finally:
        d2.stop()
    # the same start with nothing to load: what the interpreter and imports cost
    d3 = Daemon(tmp, config=cfg, name="empty")
    empty_s = d3.ready_s
    d3.stop()
    lb = label(n)
    emit(f"restart_{lb}_vms_fill_s", fill_s)
    emit(f"restart_{lb}_vms_daemon_rss_mib", rss / (1 << 20))
    emit(f"restart_{lb}_vms_shutdown_save_s", save_s)
    emit(f"restart_{lb}_vms_disk_mib", disk / (1 << 20))
    emit(f"restart_{lb}_vms_load_s", load_s)
    emit("restart_empty_start_s", empty_s)
    emit(f"save_{lb}_vms_periodic_saves", len(saves))
    if saves:
        emit(f"save_{lb}_vms_periodic_save_max_s", max(saves))
    emit("save_writer_calls", writes)
    emit("save_writer_median_ms", median_s * 1e3)
    emit(f"save_max_writer_pause_ms_at_{lb}_vms", pause_s * 1e3)
    _summary["restart_1000_vms_load_s"] = load_s
    _summary["save_max_writer_pause_ms"] = pause_s * 1e3


# --------------------------------------------------------------------------- bigsave


async def _fill_memory(target: str, mib: int) -> None:
    from pagetrack.v1 import pagetrack_pb2 as pb

    pages = mib * 256
    async with _channel(target) as ch:
        s = stubs(ch)
        await s.vm.CreateVm(pb.CreateVmRequest(name="big"))
        await s.mem.SetMemoryRegion(
            pb.SetMemoryRegionRequest(vm="big", slot=0, base_gfn=0, npages=pages))
        per = 64  # 256 KiB a call
        for first in range(0, pages, per):
            n = min(per, pages - first)
            await s.mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
                vm="big", gpa=[(first + i) * PAGE for i in range(n)], vcpu=[0],
                length=[PAGE] * n, data=bytes([first % 251 + 1]) * (PAGE * n)))


async def _pauses_until(target: str, log: Path, saves: int, after_s: float) -> float:
    """The longest WriteGuest call while the daemon completes ``saves`` more saves (and
    ``after_s`` seconds past the last)."""
    from pagetrack.v1 import pagetrack_pb2 as pb

    worst = 0.0
    done_at = None
    async with _channel(target) as ch:
        s = stubs(ch)
        i = 0
        while done_at is None or time.monotonic() < done_at + after_s:
            t = time.perf_counter()
            await s.mem.WriteGuest(pb.WriteGuestRequest(
                vm="big", vcpu=0, gpa=(i * 4099 % 1024) * PAGE, data=b"\x5a" * 8))
            worst = max(worst, time.perf_counter() - t)
            i += 1
            if done_at is None and i % 200 == 0 and len(_save_times(log)) >= saves:
                done_at = time.monotonic()
    return worst


def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    return 0


def section_bigsave(sizes: list[int], quick: bool, tmp: Path) -> None:
    """One VM with ``sizes[-1]`` MiB of written guest memory: the first save of all of
    it under a writer (its longest call) and the daemon's peak RSS against its RSS
    before the save."""
    mib = sizes[-1]
    cfg = f"[quotas]\nguest_memory_bytes = {(mib + 64) << 20}\n"
    d = Daemon(tmp, "--state-dir", str(tmp / "bigstate"), "--save-interval", "15",
               "--log-level", "debug", config=cfg, name="bigsave")
    try:
        t = time.perf_counter()
        run(_fill_memory(d.target, mib))
        fill_s = time.perf_counter() - t
        rss = d.rss()
        before = len(_save_times(d.log))
        pause = run(_pauses_until(d.target, d.log, before + 1, 1.0))
        peak = _hwm(d.proc.pid)
        save_s = _save_times(d.log)[before]
    finally:
        d.stop()
    emit(f"bigsave_{mib}mib_fill_s", fill_s)
    emit(f"bigsave_{mib}mib_rss_before_mib", rss / (1 << 20))
    emit(f"bigsave_{mib}mib_peak_rss_mib", peak / (1 << 20))
    emit(f"bigsave_{mib}mib_peak_over_before", peak / rss)
    emit(f"bigsave_{mib}mib_save_s", save_s)
    emit(f"bigsave_{mib}mib_max_writer_pause_ms", pause * 1e3)


# --------------------------------------------------------------------------- main

TARGETS = [
    ("track_add_16m_s", "<=", 1.0),
    ("track_add_16m_api_range_s", "<=", 2.0),
    ("tracked_bytes_per_gfn", "<=", 4.0),
    ("track_16m_query_vs_1000_tracked", "<=", 1.2),
    ("track_16m_write_vs_1000_tracked", "<=", 1.2),
    ("vms_100k_rss_kib_per_vm", "<=", 16.0),
    ("watchers_1000_cpu_per_event_ratio", "<=", 1.5),
    ("watchers_1000_p99_ms", "<=", 10.0),
    # the writer kept to its schedule (if the load generator lags, the run measures nothing)
    ("watchers_1000_writer_on_time", ">=", 0.99),
    ("resume_1m_first_batch_ms", "<=", 100.0),
    ("restart_1000_vms_load_s", "<=", 10.0),
    ("save_max_writer_pause_ms", "<=", 50.0),
]


def _meets(value: float, op: str, target: float) -> bool:
    return value <= target if op == "<=" else value >= target


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        die_with_parent()
        kind, args = argv[1], argv[2:]
        if kind == "track":
            child_track(int(args[0]), int(args[1]))
        elif kind == "subscriber":
            run(_watch_subscriber(args[0], int(args[1])))
        elif kind == "writer":
            run(_watch_writer(args[0], int(args[1]), int(args[2])))
        elif kind == "rawserver":
            run(_raw_watch_server(args[0]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated curves to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, short windows: checks the bench runs, measures nothing")
    p.add_argument("--sizes", default="",
                   help="comma-separated sizes for the one curve --only names (default: its own)")
    a = p.parse_args(argv)
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in only if x not in SECTIONS]
    if bad:
        p.error(f"unknown curve(s) {bad}; choose from {SECTIONS}")
    sizes = dict(QUICK if a.quick else FULL)
    if a.sizes:
        if len(only) != 1:
            p.error("--sizes goes with exactly one curve in --only")
        sizes[only[0]] = sorted(int(x) for x in a.sizes.split(","))
    emit("mode", "quick" if a.quick else "full")
    emit("cpus", os.cpu_count() or 0)
    emit("loadavg_1m", os.getloadavg()[0])
    sections: dict[str, Callable[[list[int], bool, Path], None]] = {
        "tracking": section_tracking, "vms": section_vms, "watchers": section_watchers,
        "history": section_history, "restart": section_restart, "bigsave": section_bigsave,
    }
    with tempfile.TemporaryDirectory(prefix="pt-scale-") as tmpdir:
        for name in SECTIONS:
            if name in only:
                t = time.perf_counter()
                sections[name](sizes[name], a.quick, Path(tmpdir))
                emit(f"{name}_section_s", time.perf_counter() - t)
    # Summary: fixed names; in --quick mode they hold the small sizes' figures.
    for name, _op, _target in TARGETS:
        if name in _summary:
            emit(name, _summary[name])
    met = [n for n, op, t in TARGETS if n in _summary and _meets(_summary[n], op, t)]
    missed = [n for n, op, t in TARGETS if n in _summary and not _meets(_summary[n], op, t)]
    emit("targets_met", len(met))
    emit("targets_missed", ",".join(missed) if missed else "none")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
