"""Churn leaves nothing behind: Watch open/close cycles and TTL lease create/expire cycles
return the daemon's tasks, notifiers, streams, leases, tracked gfns and RSS to where they
started (``bench/churn.py`` is the full-size run of the same code)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.daemon_process import DaemonProcess, start_daemon

CYCLES = 1000
RSS_BOUND = 8 << 20  #: RSS growth allowed over 1,000 + 1,000 cycles after the warm-up


def _churn() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "churn.py"
    spec = importlib.util.spec_from_file_location("bench_churn", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path)
    yield d
    assert d.stop() == 0


async def test_churn_returns_every_figure_to_its_start(daemon: DaemonProcess) -> None:
    """1,000 Watch cycles (cancelled or unwatched, half with stream-lease tracking) and
    1,000 expiring TTL leases with tracking: every count is back where it started, and
    RSS grew by less than RSS_BOUND."""
    churn = _churn()
    before, after = await churn.run_churn(daemon.tcp, CYCLES, CYCLES, warmup=200)
    assert before.watchers == 0 and before.leases == 0
    assert before.notifiers == 1  # the VM's history
    assert after.counts() == before.counts(), (before, after)
    assert after.rss_bytes - before.rss_bytes < RSS_BOUND, (before, after)
    assert daemon.proc.poll() is None
