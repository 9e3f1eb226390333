"""The compose stack's consumer (deploy/compose/consumer.py): where it resumes, how it
repairs a cut-off last line, and a real run against a daemon, stopped and restarted."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.daemon_process import start_daemon, with_parent
from tests.deploy.conftest import DEPLOY
from tests.waiting import HANG_S, wait_until

BIN = Path(sys.executable).parent
SCRIPT = DEPLOY / "compose" / "consumer.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("consumer", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


consumer = _load()


def _event(seq: int) -> str:
    return json.dumps({"type": "event", "seq": seq, "vm": "demo", "data": "00"}) + "\n"


def test_next_seq_of_a_new_or_empty_file(tmp_path: Path) -> None:
    assert consumer.next_seq(tmp_path / "missing.jsonl") == 1
    (tmp_path / "empty.jsonl").write_text("")
    assert consumer.next_seq(tmp_path / "empty.jsonl") == 1
    (tmp_path / "reg.jsonl").write_text('{"type": "registered", "start_seq": 1}\n')
    assert consumer.next_seq(tmp_path / "reg.jsonl") == 1


def test_next_seq_after_events_gaps_and_progress(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    progress = json.dumps({"type": "progress", "head_seq": 99, "sent_seq": 99}) + "\n"
    path.write_text(_event(1) + _event(2) + progress * 3)
    assert consumer.next_seq(path) == 3
    gap = json.dumps({"type": "gap", "first_seq": 3, "last_seq": 9, "count": 7}) + "\n"
    path.write_text(_event(1) + _event(2) + gap + progress)
    assert consumer.next_seq(path) == 10


def test_next_seq_scans_back_over_many_chunks(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    progress = json.dumps({"type": "progress", "pad": "x" * 200}) + "\n"
    path.write_text(_event(41) + progress * (3 * consumer.CHUNK // len(progress)))
    assert consumer.next_seq(path) == 42


def test_repair_cuts_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text(_event(1) + _event(2) + '{"type": "event", "se')
    consumer.repair(path)
    assert path.read_text() == _event(1) + _event(2)
    assert consumer.next_seq(path) == 3
    consumer.repair(path)  # a whole file is left alone
    assert path.read_text() == _event(1) + _event(2)
    path.write_text('{"type": "ev')
    consumer.repair(path)
    assert path.read_text() == ""


@pytest.fixture
def demo_daemon(tmp_path: Path) -> Iterator[str]:
    """pagetrackd --demo (a VM "demo" with a steady workload) on a free loopback port."""
    d = start_daemon(tmp_path, "--demo")
    try:
        yield d.tcp
    finally:
        d.stop()


def _events_in(path: Path) -> int:
    """Event lines the consumer has written so far."""
    if not path.exists():
        return 0
    return sum('"type": "event"' in line for line in path.read_text().splitlines())


def _run_consumer(target: str, out: Path, until_events: int) -> str:
    """Run the consumer until its file holds more than ``until_events`` events, then
    stop it with SIGTERM; returns what it said on stderr."""
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PAGETRACK_TARGET": target,
        "PAGETRACK_WATCH_VM": "demo",
        "PAGETRACK_EVENTS_FILE": str(out),
        "PAGETRACK_TOKEN_FILE": str(out.parent / "no-token"),
    }
    env.pop("PAGETRACK_TOKEN", None)
    proc = subprocess.Popen(
        with_parent([sys.executable, str(SCRIPT)]), env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(
            lambda: proc.poll() is not None or _events_in(out) > until_events,
            f"the consumer to write more than {until_events} events",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 0, err
    return err


def test_consumer_resumes_where_its_file_ends(demo_daemon: str, tmp_path: Path) -> None:
    out = tmp_path / "events" / "demo.jsonl"
    first = _run_consumer(demo_daemon, out, 0)
    assert "from seq 1 " in first
    count_after_first = _events_in(out)
    second = _run_consumer(demo_daemon, out, count_after_first)
    assert "from seq 1 " not in second

    data = out.read_bytes()
    records = [json.loads(x) for x in data[: data.rfind(b"\n") + 1].splitlines()]
    seqs = [r["seq"] for r in records if r["type"] == "event"]
    assert count_after_first > 0 and len(seqs) > count_after_first
    # every event from the first on, once and in order, over two runs of the consumer
    assert seqs == list(range(1, len(seqs) + 1))
    assert not [r for r in records if r["type"] == "gap"]
    assert sum(r["type"] == "registered" for r in records) == 2
