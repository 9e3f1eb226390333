"""``bench/scale.py --quick`` still runs every curve end to end (a smoke test: it checks
the bench works and prints its fixed summary names, not how fast anything is)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCALE = Path(__file__).resolve().parents[2] / "bench" / "scale.py"
SUMMARY = [
    "track_add_16m_s", "track_add_16m_api_range_s", "tracked_bytes_per_gfn",
    "vms_100k_rss_kib_per_vm", "watchers_1000_cpu_per_event_ratio", "watchers_1000_p99_ms",
    "watchers_1000_writer_on_time",
    "resume_1m_first_batch_ms", "restart_1000_vms_load_s", "save_max_writer_pause_ms",
]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_scale_quick_prints_every_curve_and_the_summary() -> None:
    out = subprocess.run(
        [sys.executable, str(SCALE), "--quick"], capture_output=True, text=True, timeout=380,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(
        line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line
    )
    for name in SUMMARY:
        assert name in lines, f"{name} missing from:\n{out.stdout}"
        float(lines[name])
    for curve in ("track_add_64ki_s", "vms_200_rss_kib_per_vm", "watchers_16_p99_ms",
                  "watchers_raw_16_p99_ms", "watchers_raw_16_daemon_preempted_per_s",
                  "resume_8ki_first_batch_ms", "restart_12_vms_load_s"):
        assert curve in lines, f"{curve} missing"
    # a curve's growth line: the per-unit cost at its largest size and the ratio
    assert "track_add_ns_per_gfn_ratio_64ki_vs_4ki" in lines
    # written in the window and not received: never below zero (the writer's first,
    # connecting call once counted as received in a window not yet set: -100)
    undelivered = {k: float(v) for k, v in lines.items() if k.endswith("_undelivered")}
    assert undelivered and all(v >= 0 for v in undelivered.values()), undelivered


def test_scale_refuses_an_unknown_curve() -> None:
    out = subprocess.run(
        [sys.executable, str(SCALE), "--only", "tracking,nope"], capture_output=True,
        text=True, timeout=60, check=False,
    )
    assert out.returncode == 2 and "nope" in out.stderr
