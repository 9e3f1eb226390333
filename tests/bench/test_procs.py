"""What a benchmark starts dies with it, also when the benchmark is killed (bench/_procs.py):
a command through dying_with_us() and a multiprocessing child that calls die_with_parent()."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import HANG_S, process_gone, wait_until

BENCH = Path(__file__).resolve().parents[2] / "bench"

#: A benchmark-like parent: starts a command and a multiprocessing child the way the
#: benchmarks do, says their pids, then waits for the test's SIGKILL.
PARENT = r"""
import json, multiprocessing as mp, os, signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from _procs import die_with_parent, dying_with_us

def child(ready):
    die_with_parent()
    ready.set()
    signal.pause()

if __name__ == "__main__":
    settled = sys.argv[2] == "settled"
    cmd = subprocess.Popen(dying_with_us(["/bin/sleep", "3600"]))
    ready = mp.get_context("spawn").Event()
    proc = mp.get_context("spawn").Process(target=child, args=(ready,))
    proc.start()
    if settled:  # both asked for the signal: the command runs sleep, the child said so
        while not open(f"/proc/{cmd.pid}/cmdline").read().startswith("/bin/sleep"):
            time.sleep(0.01)
        ready.wait()
    print(json.dumps({"command": cmd.pid, "child": proc.pid}), flush=True)
    signal.pause()
"""


@pytest.mark.parametrize("when", ["settled", "at_once"])
def test_what_a_killed_benchmark_started_dies_with_it(tmp_path: Path, when: str) -> None:
    """``settled``: killed once both asked the kernel for the signal; ``at_once``: killed
    right after starting them, before they could ask (they see the parent gone and leave)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(BENCH), when], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.communicate(timeout=HANG_S)
        wait_until(lambda: process_gone(pids["command"]), "the bench's command to die")
        wait_until(lambda: process_gone(pids["child"]), "the bench's multiprocessing child to die")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.communicate()
