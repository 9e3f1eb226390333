"""What a test starts dies with the test process, however it ends: SIGKILL of the parent
closes a daemon's stdin pipe and the daemon stops (--stop-on-stdin-eof), and a helper
process started through with_parent() gets SIGKILL (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.waiting import HANG_S, process_gone, wait_until

ROOT = Path(__file__).resolve().parents[2]

#: A parent process: starts a daemon as the tests do, says where it is, then waits.
PARENT = r"""
import json, signal, subprocess, sys
from pathlib import Path
from tests.daemon_process import start_daemon, with_parent
d = start_daemon(Path(sys.argv[1]))
helper = subprocess.Popen(with_parent(["sleep", "3600"]))
print(json.dumps({"pid": d.proc.pid, "address": d.tcp, "helper": helper.pid}), flush=True)
signal.pause()  # until the test's SIGKILL: no time window, nothing is timed
"""


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            pbg.VmServiceStub(ch).ListVms(pb.ListVmsRequest(), timeout=HANG_S)
        except grpc.RpcError:
            return False
        return True


def test_sigkill_of_the_parent_stops_the_daemon(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert parent.stdout is not None
        child = json.loads(parent.stdout.readline())
        assert _serving(child["address"])
        parent.send_signal(signal.SIGKILL)
        parent.communicate(timeout=HANG_S)
        wait_until(lambda: process_gone(child["pid"]), "the orphaned daemon to stop")
        wait_until(lambda: process_gone(child["helper"]), "the orphaned helper process to die")
        log = next(tmp_path.glob("*.log")).read_text()
        assert '"daemon.stdin_closed"' in log and '"daemon.stopped"' in log
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.communicate()
