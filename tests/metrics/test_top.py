"""``pagetrack top``: its rendering function, its loop, and a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pagetrack.top import Sample, VmSample, collect, main, render
from pagetrack.v1 import pagetrack_pb2 as pb
from tests.state.daemon import start_daemon
from tests.state.scenario import PAGE, build_vm
from tests.waiting import wait_until


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


def _many_vms() -> tuple[Sample, Sample]:
    """Two samples of VMs with short and long names, one of them busy in every column."""
    names = ["vm1", "tenant-a-build-server-042", "x" * 60]
    prev = Sample(0.0, {n: VmSample(n) for n in names})
    cur = Sample(1.0, {n: VmSample(n, guest_writes=i * 10, events=i) for i, n in
                       enumerate(names)})
    busy = "tenant-a-build-server-042"
    cur.vms[busy] = VmSample(  # type: ignore[index]
        busy, guest_writes=123456, mmio_exit=5, fast=100000, emulated=23451, events=23451,
        dropped=777, coalesced=0, tracked_gfns=4096, watchers=3, lag=4321, queue_depth=99,
        plugins=("shadow-mmu 12 gfns", "vgpu 4 gfns"),
    )
    return prev, cur


@pytest.mark.parametrize("width", [80, 100, 120, 200])
def test_render_fits_the_terminal_width(width: int) -> None:
    """At any width every line fits, each header shown is whole, every VM keeps its row
    and its name (cut with an ellipsis only when long), and columns are left out from the
    least wanted on: writes/s and events/s stay even at 80 columns."""
    prev, cur = _many_vms()
    lines = _text(render(prev, cur, 1.0, width), width=width).splitlines()
    assert all(len(ln) <= width for ln in lines), [len(ln) for ln in lines]
    assert lines[0].startswith("pagetrack top  3 VMs")
    header = lines[1].split()
    assert header[0] == "VM" and {"writes/s", "events/s", "emul/s"} <= set(header)
    assert all(h in {"VM", "writes/s", "mmio/s", "fast/s", "emul/s", "events/s", "drops/s",
                     "dropped", "lag", "queue", "watch", "tracked", "plugins"}
               for h in header), header  # no header cut short
    rows = lines[2:5]
    assert rows[0].startswith("tenant-a-build-server-042") or rows[0].startswith("tenant-a-")
    assert rows[0].split()[1] == "123k"
    assert any(r.startswith("vm1 ") for r in rows)
    assert any(r.startswith("xxxxxxxxxx") for r in rows)
    shown = len(header)
    if width >= 200:
        assert shown == 13 and "x" * 60 in "\n".join(rows) and "hidden" not in lines[0]
    else:
        assert f"({13 - shown} " in lines[0] or 13 - shown == 0
    if width == 80:
        assert header == ["VM", "writes/s", "mmio/s", "fast/s", "emul/s", "events/s",
                          "drops/s", "lag", "watch"], header


def test_render_gets_wider_with_the_terminal() -> None:
    prev, cur = _many_vms()
    counts = [len(_text(render(prev, cur, 1.0, w), width=w).splitlines()[1].split())
              for w in (60, 80, 120, 200)]
    assert counts == sorted(counts) and counts[0] >= 3 and counts[-1] == 13


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


@pytest.mark.skipif(shutil.which("tmux") is None,
                    reason="tmux is not installed (apt-get install tmux); the rendering at"
                    " 80 and 120 columns is still checked in-process above")
@pytest.mark.parametrize(("cols", "rows"), [(80, 24), (120, 40)])
def test_top_in_a_real_terminal(tmp_path: Path, cols: int, rows: int) -> None:
    """`pagetrack top` in a tmux pane of 80x24 and 120x40: the VM's row with its name and
    a rate, whole headers, nothing wider than the pane; `q` quits."""
    d = start_daemon(tmp_path)
    session = f"pt-top-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "TERM": "xterm-256color", "TMUX": ""}
    tmux = ["tmux", "-L", session]
    done = tmp_path / "top-exited"
    try:
        build_vm(d)
        cli = Path(sys.executable).with_name("pagetrack")
        subprocess.run(
            [*tmux, "new-session", "-d", "-s", session, "-x", str(cols), "-y", str(rows),
             f"{cli} --target {d.address} top --interval 0.3; touch {done}; sleep 600"],
            check=True, env=env,
        )

        def frame() -> str:
            d.stub("MemoryService").WriteGuest(
                pb.WriteGuestRequest(vm="vm1", vcpu=0, gpa=2 * PAGE, data=b"x")
            )
            pane = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                env=env,
            ).stdout
            row = next((ln for ln in pane.splitlines() if ln.startswith("vm1 ")), "")
            return pane if row and row.split()[1] != "-" else ""

        pane = wait_until(frame, "a frame of top with vm1's write rate")
        lines = pane.splitlines()
        assert lines[0].startswith("pagetrack top  1 VMs"), pane
        header = next(ln for ln in lines if ln.startswith("VM "))
        assert header.split()[:3] == ["VM", "writes/s", "mmio/s"], header
        assert all(len(ln) <= cols for ln in lines)
        row = next(ln for ln in lines if ln.startswith("vm1 "))
        if cols >= 120:
            assert "vgpu 4 gfns" in row
        subprocess.run([*tmux, "send-keys", "-t", session, "q"], check=True, env=env)
        wait_until(done.exists, "top to quit on q")
    finally:
        subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)
        d.stop()
