"""SIGKILL while incremental saves run under a writer (``--state-dir``, interval mode).

The VM's guest memory spans many chunks, a save runs every 0.2 s, and the writer keeps
writing into every chunk, so kills land before, during and after saves, and writes land
in chunks a save has not copied yet. After each restart the VM must hold one consistent
moment: every page as the writes up to one seq left it (never a mix of older and newer
chunks), and that moment no older than the last save that began and ended before the
kill.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemon, Daemons
from tests.robustness.support import PAGE, tracked_vm, wait_for_a_save_begun_now
from tests.state.daemon import free_port
from tests.waiting import wait_until

PAGES = 8 * 256  #: eight 1 MiB chunks
BATCH = 32
STRIDE = 131  #: consecutive writes land in different chunks


def _read_all(d: Daemon) -> list[int]:
    mem = d.stub("MemoryService")
    step = 256 * PAGE  # a read returns at most 1 MiB
    data = b"".join(
        mem.ReadGuest(pb.ReadGuestRequest(vm="vm1", gpa=at, length=step)).data
        for at in range(0, PAGES * PAGE, step)
    )
    return [int.from_bytes(data[p * PAGE : p * PAGE + 8], "little") for p in range(PAGES)]


class _Writer:
    """Write k (k = 1, 2, ...) to page k * STRIDE % PAGES, in batches, until the daemon
    dies; every page's value tells which write left it."""

    def __init__(self, d: Daemon, k: int) -> None:
        self.d = d
        self.k = k
        self.acked_at: list[tuple[float, int]] = []  #: (when, last k acknowledged)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def started(self) -> bool:
        """Some batches were acknowledged."""
        return len(self.acked_at) > 20

    def _run(self) -> None:
        mem = self.d.stub("MemoryService")
        while True:
            ks = range(self.k, self.k + BATCH)
            try:
                mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
                    vm="vm1", gpa=[k * STRIDE % PAGES * PAGE for k in ks], vcpu=[0],
                    length=[8] * BATCH, data=b"".join(k.to_bytes(8, "little") for k in ks)),
                    timeout=10)
            except (grpc.RpcError, ValueError):
                return
            self.k += BATCH
            self.acked_at.append((time.monotonic(), self.k - 1))


def _consistent_moment(values: list[int], base: list[int], first: int) -> int:
    """The k such that memory is ``base`` with writes ``first..k`` on top (k < first:
    none of them); fails if there is no such k."""
    k = max(values)
    want = list(base)
    for j in range(max(first, k - 4 * PAGES), k + 1):  # older writes are all overwritten
        want[j * STRIDE % PAGES] = j
    assert values == want, "memory mixes writes from different moments"
    return k


def test_sigkill_during_saves_keeps_one_consistent_moment(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Killed at random moments while saves run, the daemon comes back with the memory
    of one moment, no older than the last save that began and ended before the kill
    (counted through /metrics, not timed, so a loaded machine does not fail it)."""
    rng = random.Random(23)
    state = tmp_path / "state"
    args = ("--save-interval", "0.2", "--metrics-port", str(free_port()))
    d = daemons.start(*args, state_dir=state)
    tracked_vm(d, pages=PAGES)
    k = 1
    base = [0] * PAGES  # the memory the round starts from
    for _round in range(5):
        w = _Writer(d, k)
        w.thread.start()
        wait_until(w.started, "the writer got going")
        saved_from = wait_for_a_save_begun_now(d)
        time.sleep(rng.uniform(0.0, 0.4))  # a random moment: before, during or after a save
        d.kill()
        w.thread.join(20)
        d = daemons.start(*args, state_dir=state)
        assert "state.file_refused" not in d.log_text()
        values = _read_all(d)
        moment = _consistent_moment(values, base, k)
        old = [last for at, last in w.acked_at if at < saved_from]
        if old:
            assert moment >= max(old), (moment, max(old))
        base = values
        k = w.k + BATCH  # past anything that may have been written
    assert d.stop() == 0
