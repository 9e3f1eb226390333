"""``pagetrack top``: its rendering function, its loop, and a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pagetrack.top import Sample, VmSample, collect, main, render
from pagetrack.v1 import pagetrack_pb2 as pb
from tests.state.daemon import start_daemon
from tests.state.scenario import PAGE, build_vm
from tests.waiting import HANG_S


def _text(renderable: Any, width: int = 180) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_render_shows_rates_sorted_busiest_first() -> None:
    """Rates are deltas over the interval; the busiest VM comes first; drops, lag,
    watchers and plugins are shown."""
    prev = Sample(0.0, {
        "idle": VmSample("idle", guest_writes=10, events=5),
        "busy": VmSample("busy", guest_writes=100, fast=50, emulated=50, events=50,
                         dropped=0),
    })
    cur = Sample(2.0, {
        "idle": VmSample("idle", guest_writes=12, events=5),
        "busy": VmSample("busy", guest_writes=2100, fast=1050, emulated=1050, events=1050,
                         dropped=40, lag=123, queue_depth=7, watchers=2, tracked_gfns=9,
                         plugins=("vgpu 4 gfns",)),
    })
    text = _text(render(prev, cur, 2.0))
    lines = text.splitlines()
    busy = next(i for i, ln in enumerate(lines) if ln.startswith("busy"))
    idle = next(i for i, ln in enumerate(lines) if ln.startswith("idle"))
    assert busy < idle
    row = lines[busy].split()
    # VM writes/s mmio/s fast/s emul/s events/s drops/s dropped lag queue watch tracked plugins
    assert row[:12] == ["busy", "1000", "0", "500", "500", "500", "20", "40", "123", "7", "2",
                        "9"]
    assert "vgpu 4 gfns" in lines[busy]
    assert lines[idle].split()[:2] == ["idle", "1"]
    assert "2 VMs" in text and "writes/s 1001" in text


def test_render_without_a_previous_sample_shows_dashes() -> None:
    """The first frame has no rates yet, and a new VM shows dashes until its second."""
    cur = Sample(1.0, {"a": VmSample("a", guest_writes=5)})
    line = next(ln for ln in _text(render(None, cur, 1.0)).splitlines() if ln.startswith("a "))
    assert line.split()[1:7] == ["-"] * 6


def test_render_reports_an_unreachable_daemon() -> None:
    """A failed sample is shown as such instead of crashing the view."""
    text = _text(render(None, Sample(1.0, {}, error="connection refused"), 1.0))
    assert "daemon unreachable: connection refused" in text


class _FakeClient:
    def __init__(self) -> None:
        self.calls = 0

    def stats(self) -> list[Any]:
        self.calls += 1
        return [pb.VmStats(vm="vm-x", guest_writes=100 * self.calls, head_seq=10 * self.calls)]


def test_main_refreshes_with_a_client() -> None:
    """main() samples every interval and renders rates from consecutive samples."""
    console = Console(width=160, record=True, color_system=None, force_terminal=False)
    client = _FakeClient()
    main(client, 0.1, iterations=2, console=console)
    assert client.calls == 3
    assert "vm-x" in console.export_text()


def test_collect_through_a_real_daemon(tmp_path: Path) -> None:
    """collect() with a pagetrack.Client sees watchers, lag and plugins."""
    from pagetrack import Client

    d = start_daemon(tmp_path)
    try:
        build_vm(d)
        with Client(d.address) as c:
            s = collect(c)
        v = s.vms["vm1"]
        assert v.guest_writes > 0 and v.events > 0
        assert v.plugins == ("vgpu 4 gfns",)
        s2 = collect(d.channel)  # the raw-stub fallback sees the same
        assert s2.vms["vm1"].plugins == ("vgpu 4 gfns",)
    finally:
        d.stop()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_top_in_a_real_terminal(tmp_path: Path) -> None:
    """`pagetrack top` in a tmux pane shows the VM's row and keeps refreshing."""
    d = start_daemon(tmp_path)
    session = f"pt-top-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "TERM": "xterm-256color", "TMUX": ""}
    tmux = ["tmux", "-L", session]
    try:
        build_vm(d)
        cli = Path(sys.executable).with_name("pagetrack")
        subprocess.run(
            [*tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "30",
             f"{cli} --target {d.address} top --interval 0.3"],
            check=True, env=env,
        )
        deadline = time.monotonic() + HANG_S
        pane = ""
        while time.monotonic() < deadline:
            d.stub("MemoryService").WriteGuest(
                pb.WriteGuestRequest(vm="vm1", vcpu=0, gpa=2 * PAGE, data=b"x")
            )
            pane = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                env=env,
            ).stdout
            row = next((ln for ln in pane.splitlines() if ln.startswith("vm1 ")), "")
            if row and row.split()[1] != "-":
                break
            time.sleep(0.2)
        assert "pagetrack top" in pane, pane
        row = next((ln for ln in pane.splitlines() if ln.startswith("vm1 ")), "")
        assert row, pane
        assert "vgpu 4 gfns" in row
        assert row.split()[1] != "-", pane  # a rate, from two samples
    finally:
        subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)
        d.stop()
