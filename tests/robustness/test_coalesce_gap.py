"""A COALESCED gap names the exact seqs it folded away (the pure core, no daemon)."""

from __future__ import annotations

import numpy as np

from pagetrackd.domain import Vm
from pagetrackd.domain.hub import Gap, GapReason, History, SlowPolicy, Stamped, Subscriber, VmHub

PAGE = 4096
A, B = 1, 2  # gfns


def _write(vm: Vm, gfns: list[int]) -> None:
    n = len(gfns)
    vm.write_batch(np.array([g * PAGE for g in gfns]), np.zeros(n, dtype=np.int64),
                   np.full(n, 8, dtype=np.int64), bytes(8 * n))


def _stream(queue_limit: int) -> tuple[Vm, Subscriber]:
    vm = Vm("vm", vcpus=1)
    vm.set_memslot(0, 0, 16)
    vm.track_add(np.arange(16))
    hub = VmHub(History())
    vm.register_notifier(hub.history)
    sub = Subscriber(name="s", queue_limit=queue_limit, policy=SlowPolicy.COALESCE)
    hub.subscribe(vm, sub)
    return vm, sub


def _drain(sub: Subscriber) -> list[object]:
    out: list[object] = []
    while sub.pending:
        out.extend(sub.take(1 << 20))
    return out


def test_batch_a3_b4_a5_supersedes_exactly_seq_3() -> None:
    vm, sub = _stream(queue_limit=2)
    _write(vm, [5, 6])  # seqs 1, 2 fill the queue
    _write(vm, [A, B, A])  # seqs 3, 4, 5: coalesced; only A@3 is superseded
    items = _drain(sub)
    gaps = [i for i in items if isinstance(i, Gap)]
    assert gaps == [Gap(3, 3, 1, GapReason.COALESCED)]
    seqs = [int(s) for i in items if isinstance(i, Stamped) for s in i.batch.seq]
    assert seqs == [1, 2, 4, 5]


def test_superseded_across_calls_is_the_min_and_max_of_what_was_folded() -> None:
    vm, sub = _stream(queue_limit=2)
    _write(vm, [5, 6])  # seqs 1, 2 fill the queue
    _write(vm, [A])  # 3: kept
    _write(vm, [B, B])  # 4 folded into 5
    _write(vm, [A])  # 6 supersedes 3
    items = _drain(sub)
    gaps = [i for i in items if isinstance(i, Gap)]
    assert gaps == [Gap(3, 4, 2, GapReason.COALESCED)]
    seqs = [int(s) for i in items if isinstance(i, Stamped) for s in i.batch.seq]
    assert seqs == [1, 2, 5, 6]
