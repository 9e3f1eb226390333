"""The gpu-ppgtt workload end to end: a real pagetrackd, the vGPU attached, one remote
Watch subscriber receiving every event, next to the C trap-and-emulate reference.

Run from the repository root with the project's venv::

    .venv/bin/python bench/workloads.py              # --writes N, --profile DIR

Processes, over a unix socket: the daemon (``pagetrackd``), this script (the client that
creates the VM, starts the workload through WorkloadService and polls it), and one
*subscriber* holding a Watch stream on the VM. The workload runs as fast as the daemon
can (rate 0) for ``--writes`` guest writes; its setup attaches the vGPU, which shadows
every PPGTT and write-tracks every guest table page, so each PTE update is trapped,
emulated, handled by the vGPU synchronously and streamed to the subscriber.

Prints ``name: value`` lines:

* ``gpu_ppgtt_tracked_writes_per_s``: emulated (tracked) writes of the run divided by its
  elapsed time, both from GetWorkload (cross-checked with GetStats);
* ``gpu_ppgtt_dropped``: events the subscriber was told it lost (Gap counts; must be 0);
* ``gpu_ppgtt_audit_mismatches``: stale vGPU shadow entries after the run (must be 0);
* the cost-model comparison the workload reports: the simulated share of a host CPU that
  in-daemon emulation and a userspace exit per write take, at the achieved rate and at
  the seed's 100k tracked writes/s (the seed's ~15% for userspace);
* ``c_trap_writes_per_s``: the C reference (``bench/_c_trap.py``), in the same run;
* ``ratio_vs_seed_100k`` (target >= 2.0) and ``ratio_gpu_ppgtt_vs_c_trap`` (>= 1.0) last.

The subscriber checks that it received exactly the emulated events, seqs 1..N in order
(with no Gap); any other outcome aborts the run with a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from _c_trap import c_trap_writes_per_s  # noqa: E402

VM = "gpu"
WRITES = 1_000_000  #: guest writes of the workload (about 97% land on tracked tables)
SEED = 1
C_WRITES = 500_000
SEED_RATE = 100_000  #: the seed thread's graphics case: up to 100k tracked writes/s
BIN = Path(sys.executable).parent


def _start_daemon(tmp: str, profile: str | None) -> subprocess.Popen[bytes]:
    sock = os.path.join(tmp, "pt.sock")
    ready = os.path.join(tmp, "r.json")
    if profile:
        Path(profile).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "cProfile", "-o", str(Path(profile) / "daemon.prof"),
               "-m", "pagetrackd"]
    else:
        cmd = [str(BIN / "pagetrackd")]
    proc = subprocess.Popen(
        [*cmd, "--listen", f"unix:{sock}", "--ready-file", ready, "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("pagetrackd did not start")
        time.sleep(0.02)
    return proc


def _subscriber(target: str, ready: Any, expected: Any, out: Any) -> None:
    """Watch the VM; count events and gaps until ``expected`` (set by the parent once the
    run is over) events are accounted for; check seqs are exactly 1..expected."""
    import uvloop

    async def run() -> None:
        from pagetrack.v1 import pagetrack_pb2 as pb
        from pagetrack.v1 import pagetrack_pb2_grpc as pbg

        async with grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as ch:
            stream: Any = pbg.WatchServiceStub(ch).Watch(
                pb.WatchRequest(vm=VM, queue_limit=1 << 22, max_batch_events=16384,
                                max_batch_delay_ms=2, heartbeat_interval_ms=100)
            )
            first = await stream.read()
            start = first.registered.head_seq + 1
            ready.set()
            got = lost = 0
            next_seq = start
            bad = ""
            while True:
                want = expected.value
                if want >= 0 and got + lost >= want - start + 1:
                    break
                msg = await stream.read()
                if msg is grpc.aio.EOF:
                    bad = bad or "stream ended early"
                    break
                kind = msg.WhichOneof("kind")
                if kind == "events":
                    seqs = msg.events.seq
                    n = len(seqs)
                    if n and (seqs[0] != next_seq or seqs[-1] != next_seq + n - 1):
                        bad = bad or f"seqs {seqs[0]}..{seqs[-1]} where {next_seq} was next"
                    got += n
                    next_seq += n
                elif kind == "gap":
                    lost += msg.gap.count
                    next_seq = msg.gap.last_seq + 1
            stream.cancel()
            out.put((got, lost, next_seq - 1, bad))

    uvloop.run(run())


async def _drive(target: str, writes: int, expected: Any) -> dict[str, Any]:
    from pagetrack.v1 import pagetrack_pb2 as pb
    from pagetrack.v1 import pagetrack_pb2_grpc as pbg

    async with grpc.aio.insecure_channel(target) as ch:
        work = pbg.WorkloadServiceStub(ch)
        admin = pbg.AdminServiceStub(ch)
        plugins = pbg.PluginServiceStub(ch)
        started = await work.StartWorkload(pb.StartWorkloadRequest(
            vm=VM, kind=pb.WORKLOAD_KIND_GPU_PPGTT, count=writes, rate=0, seed=SEED,
        ))
        run_id = started.workload.id
        while True:
            await asyncio.sleep(0.1)
            status = (await work.GetWorkload(pb.GetWorkloadRequest(id=run_id))).workload
            if status.state != pb.WORKLOAD_STATE_RUNNING:
                break
        if status.state != pb.WORKLOAD_STATE_FINISHED:
            raise SystemExit(f"the workload ended {pb.WorkloadState.Name(status.state)}:"
                             f" {status.error}")
        stats = (await admin.GetStats(pb.GetStatsRequest(vm=VM))).vms[0]
        expected.value = stats.head_seq
        listed = await plugins.ListPlugins(pb.ListPluginsRequest(vm=VM))
        audit = await plugins.AuditPlugin(
            pb.AuditPluginRequest(vm=VM, kind=pb.PLUGIN_KIND_VGPU, max_mismatches=5)
        )
        vm = (await pbg.VmServiceStub(ch).GetVm(pb.GetVmRequest(vm=VM))).vm
        return {"status": status, "stats": stats, "plugins": listed.plugins, "audit": audit,
                "cost": vm.options.cost}


async def _create_vm(target: str) -> None:
    from pagetrack.v1 import pagetrack_pb2 as pb
    from pagetrack.v1 import pagetrack_pb2_grpc as pbg

    async with grpc.aio.insecure_channel(target) as ch:
        await pbg.VmServiceStub(ch).CreateVm(pb.CreateVmRequest(name=VM))


def run_gpu_ppgtt(writes: int, profile: str | None = None) -> dict[str, Any]:
    """One run of the workload with one subscriber; returns the figures."""
    from pagetrack.v1 import pagetrack_pb2 as pb

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ptw-") as tmp:
        daemon = _start_daemon(tmp, profile)
        target = f"unix:{os.path.join(tmp, 'pt.sock')}"
        try:
            asyncio.run(_create_vm(target))
            ready = ctx.Event()
            expected = ctx.Value("q", -1)
            out = ctx.Queue()
            sub = ctx.Process(target=_subscriber, args=(target, ready, expected, out))
            sub.start()
            if not ready.wait(60):
                raise SystemExit("the subscriber did not register")
            res = asyncio.run(_drive(target, writes, expected))
            got, lost, last_seq, bad = out.get(timeout=600)
            sub.join(30)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    status, stats = res["status"], res["stats"]
    emulated = status.writes_by_path.emulated
    if bad or got != stats.head_seq or last_seq != stats.head_seq:
        raise SystemExit(
            f"the subscriber got {got} events (last seq {last_seq}, {lost} lost) of"
            f" {stats.head_seq}: {bad or 'count mismatch'}"
        )
    if emulated != stats.writes.emulated or emulated != stats.head_seq:
        raise SystemExit(
            f"emulated writes disagree: workload {emulated}, GetStats {stats.writes.emulated},"
            f" head seq {stats.head_seq}"
        )
    if status.writes != writes:
        raise SystemExit(f"the workload made {status.writes} writes, not {writes}")
    kinds = [p.kind for p in res["plugins"]]
    if pb.PLUGIN_KIND_VGPU not in kinds:
        raise SystemExit(f"ListPlugins does not show the vGPU: {kinds}")
    cost = res["cost"]
    secs = status.elapsed_ms / 1000
    rate = emulated / secs
    per_write = status.cycles.emulated / emulated if emulated else 0.0
    hz = float(cost.host_hz)
    return {
        "writes": status.writes,
        "tracked": emulated,
        "elapsed_s": secs,
        "rate": rate,
        "dropped": lost + stats.events_dropped,
        "audit": res["audit"].mismatch_count,
        "audit_checked": res["audit"].checked_entries,
        "emulated_frac": per_write * rate / hz,
        "userspace_frac": cost.mmio_exit_cycles * rate / hz,
        "emulated_frac_100k": per_write * SEED_RATE / hz,
        "userspace_frac_100k": cost.mmio_exit_cycles * SEED_RATE / hz,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writes", type=int, default=WRITES, help="guest writes of the workload")
    p.add_argument("--profile", metavar="DIR", help="cProfile the daemon into DIR/daemon.prof")
    args = p.parse_args()
    r = run_gpu_ppgtt(args.writes, args.profile)
    c = c_trap_writes_per_s(C_WRITES)
    print(f"gpu_ppgtt_writes: {r['writes']}")
    print(f"gpu_ppgtt_tracked_writes: {r['tracked']}")
    print(f"gpu_ppgtt_elapsed_s: {r['elapsed_s']:.3f}")
    print(f"gpu_ppgtt_tracked_writes_per_s: {r['rate']:.0f}")
    print(f"gpu_ppgtt_dropped: {r['dropped']}")
    print(f"gpu_ppgtt_audit_mismatches: {r['audit']}")
    print(f"gpu_ppgtt_audit_checked_entries: {r['audit_checked']}")
    print(f"gpu_ppgtt_cpu_fraction_emulated: {r['emulated_frac']:.4f}")
    print(f"gpu_ppgtt_cpu_fraction_userspace: {r['userspace_frac']:.4f}")
    print(f"cpu_fraction_emulated_at_100k: {r['emulated_frac_100k']:.4f}")
    print(f"cpu_fraction_userspace_at_100k: {r['userspace_frac_100k']:.4f}")
    print(f"c_trap_writes_per_s: {c:.0f}")
    print(f"ratio_vs_seed_100k: {r['rate'] / SEED_RATE:.2f}")
    print(f"ratio_gpu_ppgtt_vs_c_trap: {r['rate'] / c:.2f}")
    return 0 if r["dropped"] == 0 and r["audit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
