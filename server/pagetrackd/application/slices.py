"""Big requests in slices: no single request holds the event loop for long.

A WriteGuestBatch, AddTracking or RemoveTracking over many writes or gfns, and a
ReplayVm, are checked whole first, so they stay all or nothing, then applied a slice at
a time (:mod:`pagetrackd.domain.steps`, :func:`pagetrackd.replay.replay_steps`); between
two slices the event loop serves other requests. Each slice's size adapts so that it
takes about :data:`SLICE_S`.

Requests on the same VM wait meanwhile: :class:`VmLocks` holds one lock per VM, taken by
the RPC interceptor around every unary call that names a VM, by ReplayVm around its
replay and by workloads around each of their slices. So a big request's effects and
events reach the VM's other users in one piece and in order, as before.

Quotas are charged for the whole request before its first slice: the write rate once
for every write of a batch (given back for the writes not done if the request is
cancelled), tracked_gfns, tracking_bytes and guest_memory_bytes checked against the
whole change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import numpy.typing as npt

from pagetrackd.domain import NotFound
from pagetrackd.domain.arrays import distinct
from pagetrackd.domain.batch import BatchResult
from pagetrackd.domain.steps import BatchSteps, TrackSteps, gfn_set
from pagetrackd.domain.types import TENANT_OWNER
from pagetrackd.replay import ReplayResult, replay_steps

if TYPE_CHECKING:
    from pagetrackd.application.engine import Engine
    from pagetrackd.application.entries import VmEntry

__all__ = [
    "ONE_SHOT_GFNS", "ONE_SHOT_WRITES", "SLICE_S", "Slicer", "VmLocks", "change_tracking",
    "replay_into", "run_steps", "write_batch",
]

#: about how long one slice may hold the event loop, seconds
SLICE_S = 0.002
#: batches of at most this many writes are written in one go (about 2 ms on the loop
#: at the batch path's 0.2 us a write; slicing a batch costs more than that saves)
ONE_SHOT_WRITES = 1 << 13
#: columns of at most this many values are converted on the loop (a worker thread's hop
#: costs more than converting a few thousand values)
ON_LOOP_VALUES = 1 << 16
#: tracking changes naming at most this many gfns are made in one go, as before
ONE_SHOT_GFNS = 1 << 14

T = TypeVar("T")
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


class VmLocks:
    """Calls on one VM, one at a time, in arrival order, keyed by (tenant, VM name) and
    kept only while a call holds the VM or waits for it. A call on a free VM takes it
    with no lock object and no await; only when a second call comes does the VM get an
    :class:`asyncio.Lock`, whose waiters are woken in arrival order."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], _VmLock] = {}

    def busy(self, tenant: str, name: str) -> bool:
        """Whether a call on the VM runs or waits."""
        return (tenant, name) in self._locks

    def hold(self, tenant: str, name: str) -> _Held:
        """``async with`` it to run the block as the only call on VM ``name`` of
        ``tenant``."""
        return _Held(self._locks, (tenant, name))


class _VmLock:
    """Calls holding or waiting for one VM, and its lock once a call had to wait."""

    __slots__ = ("users", "lock")

    def __init__(self) -> None:
        self.users = 1
        self.lock: asyncio.Lock | None = None


class _Held:
    """:meth:`VmLocks.hold`'s context manager. It wraps every unary call that names a
    VM, so the usual case, a free VM, costs a dict entry and nothing else (an
    asyncio.Lock per call was some 4% of a unary WriteGuest in the daemon)."""

    __slots__ = ("_locks", "_key", "_held")

    def __init__(self, locks: dict[tuple[str, str], _VmLock], key: tuple[str, str]) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        held = self._locks.get(self._key)
        if held is None:  # a free VM: held at once
            self._held = self._locks[self._key] = _VmLock()
            return
        self._held = held
        held.users += 1
        if held.lock is None:
            # The first call to wait: the lock is made and taken (at once, it is free)
            # for the call holding the VM, which releases it when it leaves.
            held.lock = asyncio.Lock()
            await held.lock.acquire()
        try:
            await held.lock.acquire()
        except BaseException:  # cancelled while waiting: no longer a user
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        lock = self._held.lock
        if lock is not None:
            lock.release()  # the next waiter, in arrival order, runs
        self._leave()

    def _leave(self) -> None:
        self._held.users -= 1
        if not self._held.users:
            del self._locks[self._key]


class Slicer:
    """Runs the steps of a big request, letting the event loop run between two; each
    step's size (writes, gfns) adapts so that one takes about :data:`SLICE_S`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.steps = 0

    async def run(self, step: Callable[[int], object], finished: Callable[[], bool]) -> None:
        """Call ``step(size)`` until ``finished()``."""
        while not finished():
            started = time.perf_counter()
            step(self.size)
            self.steps += 1
            took = time.perf_counter() - started
            grow = 2.0 if took <= 0 else min(2.0, SLICE_S / took)
            self.size = max(1, int(self.size * grow))
            if not finished():
                await asyncio.sleep(0)  # let the loop serve others


async def columns(gpa: Sequence[int], length: Sequence[int]) -> tuple[U64, I64]:
    """A batch request's gpa (uint64) and length (int64) columns as arrays; converted in
    a worker thread when large (a million protobuf values take a good part of a
    second)."""

    def convert() -> tuple[U64, I64]:
        return np.array(gpa, dtype=np.uint64), np.array(length, dtype=np.int64)

    if len(gpa) <= ON_LOOP_VALUES:
        return convert()
    return await asyncio.to_thread(convert)


async def check_memory(engine: Engine, entry: VmEntry, gpa: I64, length: I64) -> None:
    """``engine.check_memory`` for a batch; a large batch's growth bound is found in a
    worker thread. Only that thread touches the VM's memory meanwhile: the VM's lock is
    held (calls on the VM and its workloads wait), and a bound writes no guest data."""
    if gpa.size <= ONE_SHOT_WRITES:
        engine.check_memory(entry, gpa, length)
        return
    grow = await asyncio.to_thread(entry.vm.memory_growth_bound, gpa, length)
    engine.check_memory(entry, gpa, length, grow=grow)


async def write_batch(
    entry: VmEntry, gpa: I64, vcpu: I64, length: I64, data: bytes
) -> BatchResult:
    """``vm.write_batch`` for the daemon: in one go when small, else checked whole and
    written in slices, its write rate charged once."""
    vm = entry.vm
    if gpa.size <= ONE_SHOT_WRITES or entry.quota is None:
        return vm.write_batch(gpa, vcpu, length, data)  # the guard charges the write rate
    steps = BatchSteps(vm, gpa, vcpu, length, data)
    with entry.quota.prepaid(steps.total, lambda: steps.total - steps.done):
        await Slicer(ONE_SHOT_WRITES).run(steps.step, lambda: steps.finished)
    return steps.result()


async def change_tracking(
    engine: Engine, entry: VmEntry, gfns: I64, owner: str, lease_id: str, *, add: bool
) -> int:
    """Add (``add``) or drop one of ``owner``'s references per listed gfn, all or none;
    returns the transitions (0 -> 1 or 1 -> 0). A large change is sorted in a worker
    thread, checked in slices, checked against the quotas whole, then applied in
    slices."""
    vm = entry.vm
    tenant = entry.tenant
    if gfns.size <= ONE_SHOT_GFNS or entry.quota is None:
        if add:
            engine.check_tracked(tenant, _distinct(gfns))
            engine.check_tracking_memory(entry, gfns, owner)
            return vm.track_add(gfns, owner)
        return vm.track_remove(gfns, owner)
    gset = await asyncio.to_thread(gfn_set, gfns)
    if vm.closed:
        raise NotFound(f"VM {entry.name!r} was deleted")
    steps = TrackSteps(vm, gset, owner, add=add)
    await Slicer(ONE_SHOT_GFNS).run(steps.check, lambda: not steps.checking)
    if add:
        engine.check_tracked(tenant, steps.size)
        engine.check_tracking_memory(entry, gset.gfns, owner)
    with entry.quota.prechecked():
        await Slicer(ONE_SHOT_GFNS).run(steps.apply, lambda: steps.finished)
    if add and owner != TENANT_OWNER and lease_id:
        # The lease may have ended between two slices: its references go with it.
        try:
            engine.lease_owner(tenant, lease_id)
        except NotFound:
            vm.release_owner(owner)
    return steps.transitions


def _distinct(gfns: I64) -> int:
    """How many distinct gfns ``gfns`` names (no sort when they ascend already)."""
    if gfns.size < 2 or bool((gfns[1:] > gfns[:-1]).all()):
        return int(gfns.size)
    return int(distinct(gfns).size)


async def replay_into(locks: VmLocks, entry: VmEntry, path: Path) -> ReplayResult:
    """Replay the recording at ``path`` into the fresh VM of ``entry``, a few records
    at a time (about :data:`SLICE_S` each), the VM's lock held throughout; a cancelled
    call stops between two slices."""
    async with locks.hold(entry.tenant, entry.name):
        return await run_steps(replay_steps(path, vm=entry.vm), finish=False)


async def run_steps(steps: Generator[object, None, T], *, finish: bool = True) -> T:
    """Run an operation given as steps (a plugin shadowing a table tree, a table a
    step; a replay, a record a step), letting the event loop serve others every
    :data:`SLICE_S`. The caller holds the VM's lock. With ``finish``, a cancelled call
    still runs the operation to its end, a slice at a time, before it ends: a tree half
    shadowed is no state to leave behind."""
    cancelled = False
    while True:
        end = time.perf_counter() + SLICE_S
        try:
            while time.perf_counter() < end:
                next(steps)
        except StopIteration as done:
            if cancelled:
                raise asyncio.CancelledError from None
            result: T = done.value
            return result
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if not finish:
                raise
            cancelled = True
