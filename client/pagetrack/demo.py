"""``make run`` / ``python -m pagetrack.demo``: start ``pagetrackd --demo`` and show its
write events live in the terminal until Ctrl-C, which stops the daemon cleanly.

The daemon's demo VM has a RAM slot, a ROM slot and a random-writes workload over a slot
of its own with 1 in 8 of its pages write-tracked. If no tracked writes show up from the
daemon's own workload, this script drives writes itself (write_batch at a steady rate
over the same pages) so that events always flow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import numpy as np

from pagetrack.client import Client
from pagetrack.errors import NotFound, PageTrackError
from pagetrack.types import EventBatch, Gap, Progress, RegionRemoved, Registered

VM = "demo"
DEFAULT_PORT = 50051
TRACKED_PAGES = 4096  # the demo tracks 1 in 8 of gfns 0..4095


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _daemon_command() -> list[str]:
    exe = Path(sys.executable).with_name("pagetrackd")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("pagetrackd")
    return [found] if found else [sys.executable, "-m", "pagetrackd"]


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pagetrackd exited with status {proc.returncode}")
        if ready.exists():
            try:
                addresses = json.loads(ready.read_text())["addresses"]
            except (ValueError, KeyError):
                addresses = None
            if addresses:
                return [str(a) for a in addresses]
        time.sleep(0.05)
    raise RuntimeError(f"pagetrackd was not ready after {timeout:.0f} s")


class Driver(threading.Thread):
    """Steady guest writes from the client: ``rate`` writes/s of 8 random bytes at random
    8-byte-aligned addresses in the first 4096 pages, from 4 vCPUs."""

    def __init__(self, client: Client, rate: float) -> None:
        super().__init__(name="demo-driver", daemon=True)
        self.client = client
        self.rate = rate
        self.stop_event = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        rng = np.random.default_rng(1)
        start = time.monotonic()
        made = 0
        while not self.stop_event.wait(0.02):
            due = int((time.monotonic() - start) * self.rate) - made
            if due <= 0:
                continue
            n = min(due, 4096)
            gpa = rng.integers(0, TRACKED_PAGES, n, dtype=np.uint64) << np.uint64(12)
            gpa |= rng.integers(0, 512, n, dtype=np.uint64) << np.uint64(3)
            vcpu = rng.integers(0, 4, n, dtype=np.uint32)
            data = rng.integers(0, 256, n * 8, dtype=np.uint8)
            try:
                self.client.write_batch(VM, gpa, data, vcpu=vcpu)
            except PageTrackError as exc:
                self.error = str(exc)
                return
            made += n


class View:
    """Prints at most ``lines_per_s`` event lines a second plus a stats line every
    ``stats_every`` seconds."""

    def __init__(self, client: Client, lines_per_s: int, stats_every: float) -> None:
        self.client = client
        self.lines_per_s = lines_per_s
        self.stats_every = stats_every
        self.next_line_t = 0.0
        self.events = 0
        self.shown = 0
        self.gaps = 0
        self.last_stats_t = time.monotonic()
        self.last_events = 0
        self.last_paths = (0, 0, 0)
        self.last_writes = 0

    def event_batch(self, batch: EventBatch) -> None:
        self.events += len(batch)
        now = time.monotonic()
        # Spread the shown lines evenly over time rather than in a burst each second.
        if now < self.next_line_t:
            return
        lines: list[str] = []
        for e in batch.events():
            if len(lines) >= max(1, self.lines_per_s // 4):
                break
            self.shown += 1
            who = "dma   " if e.vcpu is None else f"vcpu {e.vcpu}"
            lines.append(
                f"  #{e.seq:<8} {who}  gpa {e.gpa:#011x}  gfn {e.gfn:#07x}  {e.data.hex()}"
            )
        if lines:
            self.next_line_t = now + len(lines) / self.lines_per_s
            print("\n".join(lines), flush=True)

    def maybe_stats(self, driver: Driver | None) -> None:
        now = time.monotonic()
        dt = now - self.last_stats_t
        if dt < self.stats_every:
            return
        try:
            (st,) = self.client.stats(VM)
        except (PageTrackError, ValueError):
            return
        paths = (st.writes.mmio_exit, st.writes.fast, st.writes.emulated)
        rates = [(a - b) / dt for a, b in zip(paths, self.last_paths, strict=True)]
        writes_s = (st.guest_writes - self.last_writes) / dt
        ev_s = (self.events - self.last_events) / dt
        self.last_stats_t, self.last_events = now, self.events
        self.last_paths, self.last_writes = paths, st.guest_writes
        who = "daemon workload + client driver" if driver is not None else "daemon workload"
        print(
            f"[stats] {writes_s:,.0f} writes/s ({who}): mmio {rates[0]:,.0f}/s, fast"
            f" {rates[1]:,.0f}/s, emulated {rates[2]:,.0f}/s | events {ev_s:,.0f}/s,"
            f" {self.events:,} received, {self.shown:,} shown | dropped {st.events_dropped}"
            f" | seq {st.head_seq:,}",
            flush=True,
        )


def _banner(target: str, log: Path) -> None:
    print(
        f"""
pagetrack demo: pagetrackd is running at {target} (log: {log})

  VM "demo": 256 MiB of RAM at gpa 0 (slot 0, dirty-logged), a 16 MiB read-only ROM
  at 4 GiB (slot 1), and 16 MiB more at gpa 0x400000000 (slot 30) where a random-writes
  workload writes 8 bytes at a time, 2000 writes/s from 4 vCPUs. 1 in 8 of those pages
  is write-tracked -- as KVM does for guest page tables a shadow MMU must keep in sync
  (1 in 8 of the first 4096 pages of slot 0 too). Writes to untracked pages take the fast
  path; writes to tracked pages are trapped, emulated and delivered below as events
  (seq, vCPU, address, new bytes). A few lines a second are shown; [stats] lines count
  every write by path, the events received and any dropped.

  Try in another terminal:
    pagetrack -t {target} vm show demo
    pagetrack -t {target} watch demo --format jsonl --count 5
    pagetrack -t {target} stats

  Press Ctrl-C to stop the demo and the daemon.
""",
        flush=True,
    )


def _stop_daemon(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _drive_needed(client: Client, wait_s: float) -> bool:
    """Whether the daemon's own workload fails to produce tracked (emulated) writes."""
    try:
        before = client.stats(VM)[0].writes.emulated
        time.sleep(wait_s)
        return client.stats(VM)[0].writes.emulated == before
    except PageTrackError:
        return True


def run(args: argparse.Namespace) -> int:
    """Start the daemon, show the stream, stop everything on Ctrl-C; the exit status."""
    port = args.port if _port_free(args.port) else 0
    tmp = Path(tempfile.mkdtemp(prefix="pagetrack-demo-"))
    ready = tmp / "ready.json"
    log_path = tmp / "pagetrackd.log"
    cmd = [*_daemon_command(), "--demo", "--listen", f"127.0.0.1:{port}",
           "--ready-file", str(ready), "--log-format", "json"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
    driver: Driver | None = None
    client: Client | None = None
    try:
        try:
            target = _wait_ready(proc, ready, timeout=30)[0]
        except RuntimeError as exc:
            print(f"pagetrack demo: {exc}; daemon log:\n{log_path.read_text()[-3000:]}",
                  file=sys.stderr)
            return 1
        if port != args.port:
            print(f"(port {args.port} is busy; the daemon listens on {target} instead)")
        client = Client(target)
        for _ in range(100):
            try:
                client.get_vm(VM)
                break
            except NotFound:
                time.sleep(0.05)
        _banner(target, log_path)
        view = View(client, args.lines_per_s, args.stats_every)
        decided = False
        started = time.monotonic()
        with client.watch(VM, heartbeat_interval_ms=500) as stream:
            for msg in stream:
                if isinstance(msg, EventBatch):
                    view.event_batch(msg)
                elif isinstance(msg, Gap):
                    view.gaps += 1
                    print(f"  !! gap: seqs {msg.first_seq}-{msg.last_seq}, {msg.count} events"
                          f" not delivered ({msg.reason.value})", flush=True)
                elif isinstance(msg, RegionRemoved):
                    print(f"  -- region removed: slot {msg.slot} at seq {msg.at_seq}",
                          flush=True)
                elif isinstance(msg, Registered) and msg.reconnects:
                    print(f"  (reconnected; resuming at seq {msg.start_seq})", flush=True)
                if not decided and time.monotonic() - started >= 1.0:
                    decided = True
                    if view.events == 0 and _drive_needed(client, 0.5):
                        print("  (the daemon's demo workload makes no tracked writes yet;"
                              f" writing {args.rate:.0f}/s from this client instead)",
                              flush=True)
                        driver = Driver(client, args.rate)
                        driver.start()
                if isinstance(msg, EventBatch | Progress):
                    view.maybe_stats(driver)
                if driver is not None and driver.error:
                    print(f"pagetrack demo: writes failed: {driver.error}", file=sys.stderr)
                    return 1
        return 0
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except PageTrackError as exc:
        print(f"pagetrack demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if driver is not None:
            driver.stop_event.set()
            driver.join(timeout=5)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        status = _stop_daemon(proc)
        print(f"pagetrackd stopped (exit status {status}).", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pagetrack.demo``."""
    p = argparse.ArgumentParser(
        prog="python -m pagetrack.demo",
        description="Start pagetrackd --demo and show its write events live; Ctrl-C stops.",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="TCP port on 127.0.0.1 (another free one if it is busy)")
    p.add_argument("--rate", type=float, default=2000.0,
                   help="writes/s when this script drives the writes itself")
    p.add_argument("--lines-per-s", type=int, default=12, help="event lines shown a second")
    p.add_argument("--stats-every", type=float, default=2.0, help="seconds between [stats]")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
