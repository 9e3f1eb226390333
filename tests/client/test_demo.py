"""``make run`` (python -m pagetrack.demo): events flow, and Ctrl-C stops it all cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def test_demo_streams_events_and_stops_on_ctrl_c() -> None:
    """The demo starts pagetrackd --demo, shows event lines and [stats] lines, and on
    SIGINT stops the daemon (SIGTERM, exit 0) and exits 0 itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGETRACK_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagetrack.demo", "--port", "0", "--stats-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("[stats]") and any(x.lstrip().startswith("#") for x in lines):
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = "".join(lines) + rest
    assert proc.returncode == 0, err
    assert 'VM "demo"' in text
    assert any(x.lstrip().startswith("#") and "gpa 0x" in x for x in lines), text
    assert "[stats]" in text and "emulated" in text
    assert "pagetrackd stopped (exit status 0)" in text
    assert "Traceback" not in err
