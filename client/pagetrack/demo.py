"""``make run`` / ``python -m pagetrack.demo``: start ``pagetrackd --demo``, walk through a few
guest writes a newcomer can follow (fast path, tracked and emulated, a read-only ROM, an
MMIO address), then show the daemon's write events live until Ctrl-C.

The daemon's demo VM has a RAM slot, a ROM slot and a random-writes workload over a slot
of its own with 1 in 8 of its pages write-tracked. If no tracked writes show up from the
daemon's own workload, this script drives writes itself (write_batch at a steady rate
over the same pages) so that events always flow.

The daemon dies with this script, however the script ends: it runs with
``--stop-on-stdin-eof`` and its stdin is a pipe only this process holds. Ctrl-C, SIGTERM
and SIGHUP (a closed terminal) stop both cleanly; nothing is left in /tmp.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import numpy as np

from pagetrack.client import DEFAULT_PORT, Client
from pagetrack.errors import NotFound, PageTrackError, Unavailable
from pagetrack.types import EventBatch, Gap, Progress, RegionRemoved, Registered, WritePath

VM = "demo"
TRACKED_PAGES = 4096  # the demo tracks 1 in 8 of gfns 0..4095
READY_S = 60.0  #: how long the daemon may take to serve (only a hang takes this long)
STOP_S = 10.0  #: how long a stopping daemon may take before it is killed


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _daemon_command() -> list[str]:
    exe = Path(sys.executable).with_name("pagetrackd")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("pagetrackd")
    return [found] if found else [sys.executable, "-m", "pagetrackd"]


def _cli_command() -> str:
    """How to run the ``pagetrack`` command from the user's shell, as short as is true."""
    exe = Path(sys.executable).with_name("pagetrack")
    if shutil.which("pagetrack") == str(exe):
        return "pagetrack"
    with contextlib.suppress(ValueError):
        return str(exe.relative_to(Path.cwd()))
    return str(exe)


def start_daemon(port: int) -> subprocess.Popen[bytes]:
    """``pagetrackd --demo`` on 127.0.0.1:``port``, stopping when this process dies (its
    stdin is a pipe whose write end only this process holds). Its warnings and errors go
    to this terminal's stderr."""
    read_end, write_end = os.pipe()
    cmd = [*_daemon_command(), "--demo", "--listen", f"127.0.0.1:{port}", "--grace", "1",
           "--log-level", "warning", "--log-format", "console", "--stop-on-stdin-eof"]
    try:
        proc = subprocess.Popen(
            cmd, stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    # Kept open (and not inherited by other children) until this process ends.
    _LIFELINES.append(write_end)
    return proc


_LIFELINES: list[int] = []


def _wait_ready(proc: subprocess.Popen[bytes], client: Client) -> None:
    """Until the daemon serves the demo VM (or has exited: RuntimeError)."""
    deadline = time.monotonic() + READY_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pagetrackd exited with status {proc.returncode}")
        try:
            client.get_vm(VM)
            return
        except (Unavailable, NotFound):
            if time.monotonic() > deadline:
                raise RuntimeError(f"pagetrackd did not serve within {READY_S:.0f} s") from None
            time.sleep(0.05)


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


#: (what, gpa, bytes): the guided writes, one per path a guest write can take
TOUR: tuple[tuple[str, int, bytes], ...] = (
    ("RAM, gfn 0x1: not write-tracked", 0x1000, bytes.fromhex("1122334455667788")),
    ("RAM, gfn 0x8: write-tracked", 0x8000, bytes.fromhex("1122334455667788")),
    ("RAM, across gfns 0x7 and 0x8: it traps on 0x8, so both pieces are emulated", 0x7FFC,
     bytes.fromhex("aabbccddeeff0011")),
    ("ROM, slot 1: a read-only memslot", 0x1_0000_0000, bytes.fromhex("1122334455667788")),
    ("no memslot: MMIO (the local APIC's page)", 0xFEE0_0000, bytes.fromhex("01000000")),
)

#: what each path means, in the words of the glossary (README.md)
PATH_MEANING = {
    WritePath.FAST: "fast path: applied, nobody told (an untracked page)",
    WritePath.EMULATED: "trapped and emulated: applied, then every watcher is told",
    WritePath.MMIO_EXIT: "MMIO exit: not applied; the VMM in user space would emulate it",
}


def tour(client: Client, cli: str, target_flag: str) -> None:
    """Make the guided writes and say what happened to each, with the command to repeat
    it."""
    print("\nA guest write takes one of three paths. Five writes by vCPU 0, one per case:\n")
    for what, gpa, data in TOUR:
        res = client.write(VM, gpa, data)
        print(f"  {cli}{target_flag} write demo {gpa:#x} 0x{data.hex()}   # {what}")
        for piece in res.pieces:
            seq = f", event #{piece.seq}" if piece.seq is not None else ""
            print(f"      {piece.gpa:#x} +{piece.length}: {piece.path.value}{seq} --"
                  f" {PATH_MEANING.get(piece.path, piece.path.value)}")
        print(f"      cost: {res.cycles} simulated cycles")
    print(flush=True)


def _banner(target: str, pid: int, cli: str, target_flag: str) -> None:
    print(
        f"""
pagetrack demo: pagetrackd (pid {pid}) is running at {target}

  VM "demo": 256 MiB of RAM at gpa 0 (slot 0, dirty-logged), a 16 MiB read-only ROM
  at 4 GiB (slot 1), and 16 MiB more at gpa 0x400000000 (slot 30) where a random-writes
  workload writes 8 bytes at a time, 2000 writes/s from 4 vCPUs. 1 in 8 of those pages
  is write-tracked -- as KVM does for guest page tables a shadow MMU must keep in sync
  (1 in 8 of the first 4096 pages of slot 0 too). Writes to untracked pages take the fast
  path; writes to tracked pages are trapped, emulated and delivered below as events
  (seq, vCPU, address, new bytes). A few lines a second are shown; [stats] lines count
  every write by path, the events received and any dropped. README.md's glossary says
  what gpa, gfn, MMIO exit, fast, emulated and cycles mean.

  Try in another terminal (from this directory):
    {cli}{target_flag} vm show demo
    {cli}{target_flag} watch demo --format jsonl --events-only --count 5
    {cli}{target_flag} stats

  Press Ctrl-C to stop the demo and the daemon.""",
        flush=True,
    )


def _stop_daemon(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _say(text: str, err: bool = False) -> None:
    """Print, unless the terminal is gone (after SIGHUP)."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


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
    port = args.port if args.port and _port_free(args.port) else _free_port()
    proc = start_daemon(port)
    target = f"127.0.0.1:{port}"
    cli = _cli_command()
    target_flag = "" if port == DEFAULT_PORT else f" --target {target}"
    driver: Driver | None = None
    client: Client | None = None
    try:
        client = Client(target)
        try:
            _wait_ready(proc, client)
        except RuntimeError as exc:
            _say(f"pagetrack demo: {exc} (its messages are above)", err=True)
            return 1
        if args.port and port != args.port:
            print(f"(port {args.port} is busy; the daemon listens on {target} instead)")
        _banner(target, proc.pid, cli, target_flag)
        tour(client, cli, target_flag)
        print("Live events of the demo's workload (#seq, vCPU, gpa, gfn, new bytes):",
              flush=True)
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
                    _say(f"pagetrack demo: writes failed: {driver.error}", err=True)
                    return 1
        return 0
    except KeyboardInterrupt:
        _say("\nstopping ...")
        return 0
    except PageTrackError as exc:
        _say(f"pagetrack demo: {exc}", err=True)
        return 1
    finally:
        if driver is not None:
            driver.stop_event.set()
            driver.join(timeout=5)
        # The daemon first: Ctrl-C must stop it even if closing the client were slow.
        status = _stop_daemon(proc)
        _say(f"pagetrackd stopped (exit status {status}).")
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pagetrack.demo``."""
    p = argparse.ArgumentParser(
        prog="python -m pagetrack.demo",
        description="Start pagetrackd --demo and show its write events live; Ctrl-C stops.",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="TCP port on 127.0.0.1 (another free one if it is busy; 0: any)")
    p.add_argument("--rate", type=float, default=2000.0,
                   help="writes/s when this script drives the writes itself")
    p.add_argument("--lines-per-s", type=int, default=12, help="event lines shown a second")
    p.add_argument("--stats-every", type=float, default=2.0, help="seconds between [stats]")
    args = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
