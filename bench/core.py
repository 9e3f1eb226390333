"""Throughput of the page-track core's write path next to the C trap-and-emulate reference.

Run from the repository root with the project's venv::

    .venv/bin/python bench/core.py

Prints ``name: value`` lines: the C reference (``bench/baseline/c_trap.c``: mprotect +
SIGSEGV trap and emulate, one real user-space trap per write), single tracked writes through
``Vm.write`` with one in-process notifier, batched writes to tracked and to untracked gfns
through ``Vm.write_batch``, and the ratios of ours to C's; then one batch of 40k and one of
200k writes with a per-event notifier and their rate ratio (linear cost: about 1).

The machine is noisy, so the measurements run in interleaved rounds (C, single, batch, then
again; 7 rounds, or fewer but at least 3 once 40 s have passed) and each figure is the median
of its rounds. Every round checks that the notifier saw
exactly the expected events and that guest memory holds the last written values; any mismatch
aborts the run with a non-zero exit.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _c_trap import c_trap_writes_per_s  # noqa: E402

from pagetrackd.domain import EventBatch, Vm, WriteEvent, WritePath  # noqa: E402

ROUNDS = 7  #: at most; fewer (never under MIN_ROUNDS) once TIME_BUDGET_S has passed
MIN_ROUNDS = 3
TIME_BUDGET_S = 40.0  #: keeps a run on a loaded machine near a minute
C_WRITES = 200_000  #: per round; about 1.1 s at 175k/s
SINGLE_WRITES = 150_000  #: per round
BATCH_WRITES = 4096  #: writes per write_batch call
BATCHES = 64  #: calls per round
WRITE_LEN = 8
TRACKED_PAGES = 256  #: as the C reference's default region
SLOT_BASE_GFN = 0x1000
SLOT_PAGES = 1 << 16  #: 256 MiB slot
SEED = 1


class Recorder:
    """An in-process notifier that records ``(seq, gpa, length)`` of every event."""

    name = "bench-recorder"
    external = True

    def __init__(self) -> None:
        self.events: list[tuple[int, int, int]] = []

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        self.events.append((event.seq, event.gpa, len(event.data)))

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        pass


class BatchRecorder:
    """An in-process batch notifier: keeps each batch's gpa column and bytes, counts events
    and bytes, and checks that seqs arrive gap-free."""

    name = "bench-batch-recorder"
    external = True

    def __init__(self) -> None:
        self.count = 0
        self.nbytes = 0
        self.last_seq = 0
        self.gaps = 0
        self.gpas: list[np.ndarray] = []
        self.data: list[bytes] = []

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        if event.seq != self.last_seq + 1:
            self.gaps += 1
        self.last_seq = event.seq
        self.count += 1
        self.nbytes += len(event.data)
        self.gpas.append(np.array([event.gpa], dtype=np.uint64))
        self.data.append(event.data)

    def track_write_batch(self, vm: Vm, batch: EventBatch) -> None:
        n = len(batch)
        seq = batch.seq
        if int(seq[0]) != self.last_seq + 1 or int(seq[-1]) - int(seq[0]) != n - 1:
            self.gaps += 1
        self.last_seq = int(seq[-1])
        self.count += n
        self.nbytes += int(batch.length.sum())
        self.gpas.append(batch.gpa)
        self.data.append(batch.data)

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        pass


def fail(msg: str) -> None:
    print(f"bench/core.py: verification failed: {msg}", file=sys.stderr)
    raise SystemExit(1)


def make_vm(name: str, tracked: list[int]) -> Vm:
    vm = Vm(name, vcpus=4)
    vm.set_memslot(0, SLOT_BASE_GFN, SLOT_PAGES)
    if tracked:
        vm.track_add(tracked)
    return vm


def random_gpas(rng: np.random.Generator, gfns: list[int], count: int) -> np.ndarray:
    """``count`` 8-byte-aligned gpas in random pages of ``gfns`` at random offsets."""
    pages = np.asarray(gfns, dtype=np.int64)[rng.integers(0, len(gfns), size=count)]
    slots = rng.integers(0, 4096 // WRITE_LEN, size=count, dtype=np.int64)
    gpas: np.ndarray = (pages << 12) + slots * WRITE_LEN
    return gpas


def check_memory(vm: Vm, gpas: np.ndarray, data: bytes) -> None:
    """Guest memory holds, at every written gpa, the value written there last (the
    writes are 8 bytes at 8-byte-aligned gpas, so they overlap only entirely)."""
    values = np.frombuffer(data, dtype=np.uint64)
    # The last write to each gpa: first occurrence in the reversed order.
    uniq, first_rev = np.unique(gpas[::-1], return_index=True)
    last = values[len(gpas) - 1 - first_rev]
    pages = np.unique(uniq >> 12)
    memory = {
        int(p): np.frombuffer(vm.read(int(p) << 12, 4096), dtype=np.uint64) for p in pages
    }
    got = np.array(
        [memory[g >> 12][(g & 4095) // WRITE_LEN] for g in uniq.tolist()], dtype=np.uint64
    )
    bad = np.flatnonzero(got != last)
    if bad.size:
        k = int(bad[0])
        fail(
            f"{vm.name}: gpa {int(uniq[k]):#x} holds {int(got[k]):#x},"
            f" last written {int(last[k]):#x}"
        )


# ---------------------------------------------------------------------------- single writes


class SingleBench:
    def __init__(self, rng: np.random.Generator, gfns: list[int]) -> None:
        self.vm = make_vm("single", gfns)
        self.rec = Recorder()
        self.vm.register_notifier(self.rec)
        self.gfns = gfns
        self.rng = rng
        self.round = 0

    def run(self) -> float:
        self.round += 1
        gpa_array = random_gpas(self.rng, self.gfns, SINGLE_WRITES)
        gpas = gpa_array.tolist()
        # Each write's value names its round and index, so stale data cannot pass.
        buf = (np.arange(SINGLE_WRITES, dtype=np.uint64) | np.uint64(self.round << 40)).tobytes()
        values = [buf[i * WRITE_LEN : (i + 1) * WRITE_LEN] for i in range(SINGLE_WRITES)]
        vm = self.vm
        rec = self.rec
        rec.events.clear()
        seq0 = vm.seq
        write = vm.write
        t0 = time.perf_counter()
        for gpa, value in zip(gpas, values):  # noqa: B905 - hot loop, lengths are equal
            write(0, gpa, value)
        elapsed = time.perf_counter() - t0
        # Verify: one event per write, in order, gap-free seqs, memory holds the last values.
        ev = rec.events
        if len(ev) != SINGLE_WRITES:
            fail(f"single: notifier saw {len(ev)} events for {SINGLE_WRITES} writes")
        expected = [(seq0 + 1 + i, gpa, WRITE_LEN) for i, gpa in enumerate(gpas)]
        if ev != expected:
            fail("single: notifier events differ from the writes made")
        if vm.stats.pieces[WritePath.EMULATED] != self.round * SINGLE_WRITES:
            fail("single: not every write was emulated")
        check_memory(vm, gpa_array, buf)
        rec.events.clear()
        return SINGLE_WRITES / elapsed


# ---------------------------------------------------------------------------- batched writes


class BatchBench:
    def __init__(
        self, name: str, rng: np.random.Generator, gfns: list[int], tracked: bool
    ) -> None:
        self.vm = make_vm(name, gfns if tracked else [])
        self.rec = BatchRecorder()
        self.vm.register_notifier(self.rec)
        self.gfns = gfns
        self.tracked = tracked
        self.rng = rng
        self.round = 0
        self.vcpu = np.zeros(BATCH_WRITES, dtype=np.int64)
        self.length = np.full(BATCH_WRITES, WRITE_LEN, dtype=np.int64)

    def run(self) -> float:
        self.round += 1
        total = BATCHES * BATCH_WRITES
        gpas = random_gpas(self.rng, self.gfns, total)
        gpa_arrays = [gpas[b * BATCH_WRITES : (b + 1) * BATCH_WRITES] for b in range(BATCHES)]
        values = np.arange(total, dtype=np.uint64) | np.uint64(self.round << 40)
        buf = values.tobytes()
        chunks = [
            buf[b * BATCH_WRITES * WRITE_LEN : (b + 1) * BATCH_WRITES * WRITE_LEN]
            for b in range(BATCHES)
        ]
        vm = self.vm
        rec = self.rec
        rec.gpas.clear()
        rec.data.clear()
        count0, bytes0 = rec.count, rec.nbytes
        vcpu, length = self.vcpu, self.length
        write_batch = vm.write_batch
        t0 = time.perf_counter()
        for g, d in zip(gpa_arrays, chunks):  # noqa: B905 - hot loop, lengths are equal
            write_batch(g, vcpu, length, d)
        elapsed = time.perf_counter() - t0
        # Verify the events (tracked) or their absence (untracked), and memory.
        want = total if self.tracked else 0
        if rec.count - count0 != want or rec.nbytes - bytes0 != want * WRITE_LEN:
            fail(f"{vm.name}: notifier saw {rec.count - count0} events, expected {want}")
        if rec.gaps:
            fail(f"{vm.name}: notifier saw {rec.gaps} seq gaps")
        if self.tracked:
            seen = np.concatenate(rec.gpas)
            if not np.array_equal(seen, gpas.astype(np.uint64)):
                fail(f"{vm.name}: event gpas differ from the writes made")
            if b"".join(rec.data) != buf:
                fail(f"{vm.name}: event data differ from the bytes written")
        path = WritePath.EMULATED if self.tracked else WritePath.FAST
        if vm.stats.pieces[path] != self.round * total:
            fail(f"{vm.name}: not every piece took path {path.name}")
        check_memory(vm, gpas, buf)
        rec.gpas.clear()
        rec.data.clear()
        return total / elapsed


class PerEvent:
    """An in-process notifier called per event that does nothing (the cost is the core's)."""

    name = "bench-per-event"
    external = False

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        pass

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        pass


def per_event_batch_writes_per_s(count: int) -> float:
    """Tracked writes per second of one ``write_batch`` of ``count`` writes with a per-event
    notifier: each write is emulated and calls back. The rate must not fall as the batch
    grows (a rescan of the rest of the batch per piece once made it quadratic)."""
    vm = Vm("per-event")
    vm.set_memslot(0, 0, 1024)
    vm.track_add(np.arange(1024))
    vm.register_notifier(PerEvent())
    gpa = (np.arange(count) % 1024) * 4096
    started = time.perf_counter()
    res = vm.write_batch(gpa, np.zeros(count), np.full(count, 8), bytes(8 * count))
    elapsed = time.perf_counter() - started
    if res.count(WritePath.EMULATED) != count:
        fail("per-event batch: not every write was emulated")
    return count / elapsed


def main() -> int:
    rng = np.random.default_rng(SEED)
    drawn = rng.choice(SLOT_PAGES, size=2 * TRACKED_PAGES, replace=False) + SLOT_BASE_GFN
    tracked = sorted(drawn[:TRACKED_PAGES].tolist())
    untracked = sorted(drawn[TRACKED_PAGES:].tolist())
    single = SingleBench(rng, tracked)
    batch_tracked = BatchBench("batch-tracked", rng, tracked, tracked=True)
    batch_fast = BatchBench("batch-fast", rng, untracked, tracked=False)
    # Warm up (allocates the written pages, fills caches) without recording.
    single.run()
    batch_tracked.run()
    batch_fast.run()
    c: list[float] = []
    s: list[float] = []
    bt: list[float] = []
    bf: list[float] = []
    started = time.monotonic()
    for r in range(ROUNDS):
        c.append(c_trap_writes_per_s(C_WRITES))
        s.append(single.run())
        bt.append(batch_tracked.run())
        bf.append(batch_fast.run())
        if r + 1 >= MIN_ROUNDS and time.monotonic() - started > TIME_BUDGET_S:
            break
    c_med = statistics.median(c)
    s_med = statistics.median(s)
    bt_med = statistics.median(bt)
    bf_med = statistics.median(bf)
    print(f"c_trap_writes_per_s: {c_med:.0f}")
    print(f"tracked_writes_per_s: {s_med:.0f}")
    print(f"batch_tracked_writes_per_s: {bt_med:.0f}")
    print(f"batch_fast_writes_per_s: {bf_med:.0f}")
    print(f"ratio_tracked_vs_c_trap: {s_med / c_med:.2f}")
    print(f"ratio_batch_tracked_vs_c_trap: {bt_med / c_med:.2f}")
    small = statistics.median(per_event_batch_writes_per_s(40_000) for _ in range(3))
    large = statistics.median(per_event_batch_writes_per_s(200_000) for _ in range(3))
    print(f"per_event_batch_40k_writes_per_s: {small:.0f}")
    print(f"per_event_batch_200k_writes_per_s: {large:.0f}")
    # about 1 when the cost is linear in the batch size; 0.2 if it were quadratic
    print(f"ratio_per_event_batch_200k_vs_40k: {large / small:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
