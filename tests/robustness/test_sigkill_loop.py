"""SIGKILL at random moments under a running writer, 20 times in a row.

With ``durability = "journal"`` every acknowledged write must be there after each
restart, with the seq it was acknowledged with; no seq is ever handed out twice (a
seq seen once always names the same write); a resume from the start gets every
acknowledged event and, for what a crash lost, RESTART gaps that never cover an
acknowledged seq. With ``durability = "interval"`` nothing acknowledged longer ago than
the stated bound (the save interval plus one save) is lost.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemon, Daemons
from tests.robustness.support import PAGE, tracked_vm, wait_for_a_save_begun_now
from tests.state.daemon import free_port
from tests.waiting import wait_until

PAGES = 64
BATCH = 16


@dataclass
class Writer:
    """Writes batches until the daemon dies; remembers what was acknowledged."""

    d: Daemon
    value: int  #: the next value written (values never repeat across rounds)
    acked: dict[int, tuple[int, int]] = field(default_factory=dict)  #: seq -> (page, value)
    acked_at: list[tuple[float, dict[int, int]]] = field(default_factory=list)
    inflight: dict[int, int] = field(default_factory=dict)  #: page -> value, not acked
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        mem = self.d.stub("MemoryService")
        while True:
            pages = [(self.value + i) % PAGES for i in range(BATCH)]
            values = [self.value + i for i in range(BATCH)]
            self.inflight = dict(zip(pages, values, strict=True))
            try:
                r = mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
                    vm="vm1", gpa=[p * PAGE for p in pages], vcpu=[0], length=[8] * BATCH,
                    data=b"".join(v.to_bytes(8, "little") for v in values)), timeout=10)
            except (grpc.RpcError, ValueError):  # the daemon died; ValueError: channel closed
                return
            assert r.last_seq - r.first_seq + 1 == BATCH
            for k, (p, v) in enumerate(zip(pages, values, strict=True)):
                self.acked[r.first_seq + k] = (p, v)
            self.acked_at.append((time.monotonic(), dict(self.inflight)))
            self.inflight = {}
            self.value += BATCH


def _memory(d: Daemon) -> dict[int, int]:
    data = d.stub("MemoryService").ReadGuest(
        pb.ReadGuestRequest(vm="vm1", gpa=0, length=PAGES * PAGE)).data
    return {p: int.from_bytes(data[p * PAGE : p * PAGE + 8], "little") for p in range(PAGES)}


def _stream_from(d: Daemon, start: int, head: int) -> list[Any]:
    stream = d.stub("WatchService").Watch(pb.WatchRequest(vm="vm1", start_seq=start),
                                          timeout=30)
    next(stream)
    out: list[Any] = []
    seen = start - 1
    try:
        for msg in stream:
            kind = msg.WhichOneof("kind")
            if kind == "events":
                out.append(msg.events)
                seen = msg.events.seq[-1]
            elif kind == "gap":
                out.append(msg.gap)
                seen = msg.gap.last_seq
            if seen >= head:
                break
    finally:
        stream.cancel()
    return out


def _expected_memory(w: Writer) -> dict[int, int]:
    last: dict[int, int] = {}
    for seq in sorted(w.acked):
        page, value = w.acked[seq]
        last[page] = value
    return last


def _more_acked(w: Writer, before: int) -> bool | None:
    return len(w.acked) > before or None


def test_journal_sigkill_loop_loses_nothing_acknowledged(
    daemons: Daemons, tmp_path: Path
) -> None:
    rng = random.Random(16)
    state = tmp_path / "state"
    # The history holds every event of the run, so a resume from seq 1 sees them all.
    args = ("--durability", "journal", "--save-interval", "0.5",
            "--history-events", str(1 << 22))
    d = daemons.start(*args, state_dir=state)
    tracked_vm(d, pages=PAGES)
    w = Writer(d, value=1)
    highest_seen = 0
    for _round in range(20):
        w.d = d
        acked_before = len(w.acked)
        w.start()
        # The kill must come after this round's first acknowledged write (on a busy
        # machine the writer may not have had one yet), then at a random moment.
        wait_until(partial(_more_acked, w, acked_before), "an acknowledged write")
        time.sleep(rng.uniform(0.02, 0.3))  # a random moment while the writer runs
        d.kill()
        assert w.thread is not None
        w.thread.join(20)
        inflight = dict(w.inflight)

        d = daemons.start(*args, state_dir=state)
        head = d.stub("VmService").GetVm(pb.GetVmRequest(vm="vm1")).vm.head_seq
        assert head >= max(w.acked), "the daemon came back below an acknowledged seq"
        # Every acknowledged write is there (or the write in flight at the kill, which
        # may have been applied without its reply).
        mem, want = _memory(d), _expected_memory(w)
        for page, value in want.items():
            assert mem[page] == value or mem[page] == inflight.get(page), (page, mem[page])
        # A resume from seq 1 gets each acknowledged event with its seq, and gaps only
        # for seqs no acknowledged write had.
        delivered: set[int] = set()
        for item in _stream_from(d, 1, head):
            if isinstance(item, pb.Gap):
                assert item.reason == pb.GAP_REASON_RESTART
                assert not [s for s in w.acked if item.first_seq <= s <= item.last_seq]
                continue
            for k, seq in enumerate(item.seq):
                delivered.add(seq)
                if seq in w.acked:
                    page, value = w.acked[seq]
                    assert item.gpa[k] == page * PAGE
                    assert int.from_bytes(item.data[8 * k : 8 * k + 8], "little") == value
        assert not set(w.acked) - delivered, "an acknowledged event is missing"
        highest_seen = max(highest_seen, head)
    # New writes after the last restart never reuse a seq seen before.
    mem_stub = d.stub("MemoryService")
    r = mem_stub.WriteGuestBatch(pb.WriteGuestBatchRequest(
        vm="vm1", gpa=[0], vcpu=[0], length=[8], data=bytes(8)))
    assert r.first_seq > highest_seen
    assert d.stop() == 0


def test_interval_sigkill_loses_nothing_a_save_began_after(
    daemons: Daemons, tmp_path: Path
) -> None:
    """The README's bound for durability = "interval": a SIGKILL loses at most what was
    acknowledged since the last save began (so at most the save interval plus one save).
    The test counts saves through /metrics rather than timing them: everything
    acknowledged before a save that began and ended is there after the kill."""
    rng = random.Random(17)
    state = tmp_path / "state"
    args = ("--save-interval", "0.3", "--metrics-port", str(free_port()))
    d = daemons.start(*args, state_dir=state)
    tracked_vm(d, pages=PAGES)
    assert d.stop() == 0
    d = daemons.start(*args, state_dir=state)
    w = Writer(d, value=1)
    for _round in range(3):
        w.d = d
        w.acked_at.clear()
        acked_before = len(w.acked)
        w.start()
        wait_until(partial(_more_acked, w, acked_before), "an acknowledged write")
        saved_from = wait_for_a_save_begun_now(d)
        time.sleep(rng.uniform(0.0, 0.3))  # a random moment while the writer runs
        d.kill()
        assert w.thread is not None
        w.thread.join(20)
        d = daemons.start(*args, state_dir=state)
        mem = _memory(d)
        # Batches acknowledged before saved_from: each page holds that value or a later
        # one (values only grow).
        old: dict[int, int] = {}
        for at, batch in w.acked_at:
            if at < saved_from:
                old.update(batch)
        assert old, "the writer acknowledged nothing before the save"
        for page, value in old.items():
            assert mem[page] >= value, (page, mem[page], value)
    assert d.stop() == 0
