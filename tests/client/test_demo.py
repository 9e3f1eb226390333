"""``make run`` (python -m pagetrack.demo): the guided writes and the live events, Ctrl-C
and a closed terminal stop it all cleanly, and a demo killed with SIGKILL leaves no daemon
behind (its port is free again) and nothing in the temporary directory."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import with_parent
from tests.waiting import HANG_S, process_gone, wait_until

BANNER = re.compile(r"pagetrackd \(pid (\d+)\) is running at 127\.0\.0\.1:(\d+)")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The demo on a free port, with its own empty TMPDIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGETRACK_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        with_parent([sys.executable, "-m", "pagetrack.demo", "--port", "0", "--stats-every",
                     "1"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not list(tmp_path.iterdir()), "the demo left files in TMPDIR"


def _read_until(proc: subprocess.Popen[str], done: re.Pattern[str]) -> list[str]:
    """Lines of the demo's stdout up to and including the first that matches ``done``."""
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        assert line, "the demo ended early:\n" + "".join(lines)
        lines.append(line)
        if done.search(line):
            return lines


def _daemon(lines: list[str]) -> tuple[int, int]:
    """(pid, port) of the demo's daemon, from its banner."""
    m = next(m for line in lines if (m := BANNER.search(line)))
    return int(m.group(1)), int(m.group(2))


def _port_free(port: int) -> bool:
    """Whether a new daemon could listen on ``port`` (as servers do, with SO_REUSEADDR: a
    connection the old daemon closed may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_demo_walks_through_the_paths_and_stops_on_ctrl_c(
    demo: subprocess.Popen[str],
) -> None:
    """The guided writes show each path (fast, emulated with its event seq, split at a page
    boundary and emulated whole, a read-only ROM and an MMIO address as MMIO exits, with
    their cycles), then
    event and [stats] lines come; SIGINT stops the daemon (exit 0) and the demo (exit 0)."""
    lines = _read_until(demo, re.compile(r"^\[stats\]"))
    pid, port = _daemon(lines)
    lines += _read_until(demo, re.compile(r"^\s+#\d+ .*gpa 0x"))
    text = "".join(lines)
    assert 'VM "demo"' in text
    tour = text[text.index("A guest write takes"):text.index("Live events")]
    assert re.search(r"write demo 0x1000 0x1122334455667788 .*\n\s+0x1000 \+8: fast", tour)
    assert re.search(r"write demo 0x8000 .*\n\s+0x8000 \+8: emulated, event #\d+", tour)
    # A write crossing into tracked gfn 0x8 is emulated whole (R4.3).
    assert re.search(r"0x7ffc \+4: emulated, event #\d+.*\n\s+0x8000 \+4: emulated", tour)
    assert re.search(r"write demo 0x100000000 .*ROM.*\n\s+0x100000000 \+8: mmio_exit", tour)
    assert re.search(r"write demo 0xfee00000 .*MMIO.*\n\s+0xfee00000 \+4: mmio_exit", tour)
    assert "cost: 5000 simulated cycles" in tour
    assert "--events-only" in text  # the hint
    demo.send_signal(signal.SIGINT)
    rest, err = demo.communicate(timeout=HANG_S)
    assert demo.returncode == 0, err
    assert "pagetrackd stopped (exit status 0)" in rest
    assert "Traceback" not in err
    assert process_gone(pid) and _port_free(port)


def test_closed_terminal_stops_demo_and_daemon(demo: subprocess.Popen[str]) -> None:
    """SIGHUP (the terminal of `make run` closed) stops the daemon and the demo."""
    pid, port = _daemon(_read_until(demo, BANNER))
    demo.send_signal(signal.SIGHUP)
    demo.communicate(timeout=HANG_S)
    assert demo.returncode == 0
    assert process_gone(pid) and _port_free(port)


def test_killed_demo_leaves_no_daemon(demo: subprocess.Popen[str]) -> None:
    """SIGKILL gives the demo no chance to clean up: its daemon sees its stdin pipe close
    and stops by itself, and the port is free again."""
    pid, port = _daemon(_read_until(demo, BANNER))
    assert not process_gone(pid) and not _port_free(port)
    demo.kill()
    demo.communicate(timeout=HANG_S)
    wait_until(lambda: process_gone(pid), f"the demo's daemon (pid {pid}) to exit")
    wait_until(lambda: _port_free(port), f"port {port} to be free")
