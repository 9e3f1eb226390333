"""What saving one VM with a lot of guest memory costs the daemon: peak memory and the
longest pause of a concurrent writer.

Run from the repository root with the project's venv::

    .venv/bin/python bench/bigsave.py [--mib 512]

A pagetrackd with ``--state-dir`` gets a VM whose memslot of MIB MiB is filled with
random bytes through WriteGuest (1 MiB calls) and a small VM for a writer; it stops
(SIGTERM: the final save writes the big VM) and starts again on the same directory
(its load time is printed). Then, with saves every SAVE_INTERVAL_S seconds, a writer
sends one 8-byte WriteGuest after another to the small VM and records each call's
latency, while the big VM gets two kinds of change:

* ``small``: one 8-byte write into the big VM (a save that copies the whole VM copies
  MIB MiB for it; one that saves what changed copies a little);
* ``full``: every byte of the big VM written again (each save must write it all).

For each, the writer runs from the end of the change until SAVES_AFTER more saves have
completed (the daemon logs ``state.saved``) and the peak resident memory over that time (VmHWM,
reset through ``/proc/PID/clear_refs`` first) is compared with the resident memory
before. The figures are the longest writer pause (target <= 50 ms, issue 15), the
longest save, and the peak over the resident memory before (1.0 = no extra memory).
Prints ``name: value`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import PAGE, Daemon, _channel, emit, run, stubs  # noqa: E402

SAVE_INTERVAL_S = 1.0
SAVES_AFTER = 2
CHUNK = 1 << 20


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _saves(log: Path) -> list[tuple[float, int]]:
    """(seconds, VM files written) of every ``state.saved`` line so far."""
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "state.saved" and "s" in rec:
            out.append((float(rec["s"]), int(rec.get("written", 0))))
    return out


async def _fill(target: str, mib: int, create: bool) -> None:
    from pagetrack.v1 import pagetrack_pb2 as pb

    async with _channel(target) as ch:
        s = stubs(ch)
        if create:
            await s.vm.CreateVm(pb.CreateVmRequest(name="big"))
            await s.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(
                vm="big", slot=0, base_gfn=0, npages=mib * (CHUNK // PAGE)))
            await s.vm.CreateVm(pb.CreateVmRequest(name="w"))
            await s.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(
                vm="w", slot=0, base_gfn=0, npages=64))
        block = os.urandom(CHUNK)
        for i in range(mib):
            await s.mem.WriteGuest(pb.WriteGuestRequest(
                vm="big", vcpu=0, gpa=i * CHUNK, data=block[i:] + block[:i]))


async def _one_write(target: str) -> None:
    from pagetrack.v1 import pagetrack_pb2 as pb

    async with _channel(target) as ch:
        await stubs(ch).mem.WriteGuest(pb.WriteGuestRequest(
            vm="big", vcpu=0, gpa=3 * PAGE, data=b"\x77" * 8))


async def _writer(target: str, log: Path, saves_before: int, limit_s: float) -> list[float]:
    """Latencies of writes to the small VM until SAVES_AFTER more saves completed."""
    from pagetrack.v1 import pagetrack_pb2 as pb

    lat: list[float] = []
    async with _channel(target) as ch:
        s = stubs(ch)
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < limit_s:
            t = time.perf_counter()
            await s.mem.WriteGuest(pb.WriteGuestRequest(
                vm="w", vcpu=0, gpa=(i % 64) * PAGE, data=b"\x5a" * 8))
            lat.append(time.perf_counter() - t)
            i += 1
            if i % 50 == 0 and len(_saves(log)) >= saves_before + SAVES_AFTER:
                break
    return lat


def _measure(d: Daemon, name: str, change: Any) -> None:
    pid = d.proc.pid
    rss_kib = _status_kib(pid, "VmRSS")
    peak_ok = _reset_peak(pid)
    t = time.perf_counter()
    run(change)
    emit(f"bigsave_{name}_change_s", time.perf_counter() - t)
    # the saves counted start after the change: one begun during it may not hold it all
    before = len(_saves(d.log))
    lat = run(_writer(d.target, d.log, before, 120.0))
    saves = _saves(d.log)[before:]
    emit(f"bigsave_{name}_saves", len(saves))
    if saves:
        emit(f"bigsave_{name}_save_max_s", max(s for s, _ in saves))
    emit(f"bigsave_{name}_writer_calls", len(lat))
    emit(f"bigsave_{name}_writer_median_ms", statistics.median(lat) * 1e3)
    emit(f"bigsave_{name}_max_writer_pause_ms", max(lat) * 1e3)
    emit(f"bigsave_{name}_rss_before_mib", rss_kib / 1024)
    if peak_ok:
        peak = _status_kib(pid, "VmHWM")
        emit(f"bigsave_{name}_peak_rss_mib", peak / 1024)
        emit(f"bigsave_{name}_peak_vs_before", peak / rss_kib)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=512, help="guest memory of the big VM, MiB")
    a = p.parse_args(argv)
    emit("loadavg_1m", os.getloadavg()[0])
    emit("bigsave_mib", a.mib)
    cfg = f"[quotas]\nguest_memory_bytes = {(a.mib + 64) << 20}\n"
    with tempfile.TemporaryDirectory(prefix="pt-bigsave-") as tmpdir:
        tmp = Path(tmpdir)
        state = tmp / "state"
        d = Daemon(tmp, "--state-dir", str(state), "--save-interval", "86400", config=cfg,
                   name="fill")
        try:
            t = time.perf_counter()
            run(_fill(d.target, a.mib, True))
            emit("bigsave_fill_s", time.perf_counter() - t)
        finally:
            emit("bigsave_shutdown_save_s", d.stop())
        d = Daemon(tmp, "--state-dir", str(state), "--save-interval", str(SAVE_INTERVAL_S),
                   "--log-level", "debug", config=cfg, name="saves")
        try:
            emit("bigsave_load_s", d.ready_s)
            _measure(d, "small", _one_write(d.target))
            _measure(d, "full", _fill(d.target, a.mib, False))
        finally:
            d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
