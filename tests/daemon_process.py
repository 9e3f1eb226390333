"""Start and stop a real pagetrackd subprocess for tests (one helper for every suite).

Every daemon a test starts dies with the test process, however that ends (SIGKILL too):
its stdin is a pipe whose only writer is this process, and it runs with
--stop-on-stdin-eof.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.waiting import HANG_S

BIN = Path(sys.executable).parent

#: pid -> the write end of that daemon's stdin pipe (closing it stops the daemon)
_LIFELINES: dict[int, int] = {}


#: Runs argv[1:] with PR_SET_PDEATHSIG(SIGKILL) set (Linux; it survives exec): the
#: command is killed when the test process that started it dies, however that dies. SIGINT
#: is put back to its default, as in a terminal: a test run started in the background
#: (nohup ... &) ignores it, and Python then never raises KeyboardInterrupt.
_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "if sys.platform == 'linux':\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != parent:\n"
    "    sys.exit(137)  # the parent died before the signal was armed\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def with_parent(argv: list[str]) -> list[str]:
    """``argv`` made to die with this process (the helper processes a test starts:
    watchers, consumers, clients; daemons use popen_pagetrackd)."""
    return [sys.executable, "-c", _WITH_PARENT, str(os.getpid()), *argv]


def popen_pagetrackd(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``pagetrackd --stop-on-stdin-eof ARGS`` with stdin a pipe only this process writes
    to, so the daemon stops when this process dies; other Popen arguments as given."""
    read_end, write_end = os.pipe()  # not inherited by other children (PEP 446)
    try:
        proc = subprocess.Popen(
            [str(BIN / "pagetrackd"), "--stop-on-stdin-eof", *args], stdin=read_end, **kwargs
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    _LIFELINES[proc.pid] = write_end
    return proc


def let_go(proc: subprocess.Popen[bytes]) -> None:
    """Close the daemon's stdin pipe (once it has exited, or to make it stop)."""
    fd = _LIFELINES.pop(proc.pid, None)
    if fd is not None:
        os.close(fd)


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
        finally:
            let_go(self.proc)


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
        proc = popen_pagetrackd(
            [*listen_args, "--ready-file", str(ready), "--log-format", "json", *args],
            stdout=subprocess.DEVNULL, stderr=out,
        )
    deadline = time.monotonic() + HANG_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            let_go(proc)
            raise RuntimeError(f"pagetrackd did not start:\n{log.read_text()}")
        time.sleep(0.02)
    doc = json.loads(ready.read_text())
    return DaemonProcess(proc, doc["addresses"], log, doc.get("metrics", ""))
