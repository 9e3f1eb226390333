"""Start and stop a real pagetrackd subprocess for tests (one helper for every suite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.waiting import HANG_S

BIN = Path(sys.executable).parent


@dataclass
class DaemonProcess:
    """A running daemon: its process, addresses and log file."""

    proc: subprocess.Popen[bytes]
    addresses: list[str]
    log: Path
    metrics: str = ""  #: HOST:PORT of the metrics endpoint, when one was asked for

    @property
    def tcp(self) -> str:
        """The first TCP address."""
        return next(a for a in self.addresses if not a.startswith("unix:"))

    def rss_bytes(self) -> int:
        """Resident set size of the daemon process."""
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_daemon(
    tmp: Path,
    *args: str,
    listen: tuple[str, ...] = ("127.0.0.1:0",),
    log_name: str = "daemon.log",
) -> DaemonProcess:
    """Start ``pagetrackd`` with ``args``, wait until it serves, return it. Its log is
    appended to ``tmp / log_name``."""
    ready = tmp / f"ready-{time.monotonic_ns()}.json"
    log = tmp / log_name
    listen_args = [x for addr in listen for x in ("--listen", addr)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(BIN / "pagetrackd"), *listen_args, "--ready-file", str(ready),
             "--log-format", "json", *args],
            stdout=subprocess.DEVNULL, stderr=out,
        )
    deadline = time.monotonic() + HANG_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"pagetrackd did not start:\n{log.read_text()}")
        time.sleep(0.02)
    doc = json.loads(ready.read_text())
    return DaemonProcess(proc, doc["addresses"], log, doc.get("metrics", ""))
