"""Per-event notifiers that take guest writes without an event object.

``write_batch`` calls ``track_guest_write(vm, seq, vcpu, gpa, data)`` instead of
``track_write(vm, event)`` when every per-event node offers it (plugins do). That is a
calling convention only: pieces, seqs, memory, tracking, stats, per-node call counts and
what each notifier sees must equal writing one by one (which always builds events),
also when such a node changes tracking or memslots, unregisters itself or registers
another node from inside its callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.domain import Vm, WriteEvent
from pagetrackd.domain.notifiers import NotifierNode
from tests.domain.test_batch_equivalence import (
    PAGE,
    Meddler,
    Snooper,
    case_st,
    make_vm,
    state_of,
)


class FastSnooper(Snooper):
    def track_guest_write(self, vm: Vm, seq: int, vcpu: int, gpa: int, data: bytes) -> None:
        self.track_write(vm, WriteEvent(seq, vcpu, gpa, data))


class FastMeddler(Meddler):
    def track_guest_write(self, vm: Vm, seq: int, vcpu: int, gpa: int, data: bytes) -> None:
        self.track_write(vm, WriteEvent(seq, vcpu, gpa, data))


@dataclass
class Quitter:
    """At seq ``leave_at`` unregisters itself; at seq ``add_at`` registers a new
    FastSnooper (kept in ``added``)."""

    leave_at: int
    add_at: int
    name: str = "quitter"
    external: bool = False
    node: NotifierNode | None = None
    seen: list[int] = field(default_factory=list)
    added: list[tuple[FastSnooper, NotifierNode]] = field(default_factory=list)

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        self.track_guest_write(vm, event.seq, event.vcpu, event.gpa, event.data)

    def track_guest_write(self, vm: Vm, seq: int, vcpu: int, gpa: int, data: bytes) -> None:
        self.seen.append(seq)
        if seq == self.add_at:
            snooper = FastSnooper(name="added")
            self.added.append((snooper, vm.register_notifier(snooper)))
        if seq == self.leave_at and self.node is not None:
            vm.unregister_notifier(self.node)

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        pass


@settings(max_examples=150, deadline=None)
@given(
    case=case_st(),
    flags=st.sampled_from([0, 1, 2, 3]),
    tracked=st.lists(st.sampled_from([*range(16), *range(32, 40)]), max_size=10),
    quit_at=st.integers(0, 12),
    add_at=st.integers(0, 12),
    with_quitter=st.booleans(),
    with_slow=st.booleans(),
)
def test_fast_nodes_in_a_batch_equal_writes_one_by_one(
    case: tuple[list[tuple[int, int, int, int]], dict[int, list[tuple[str, int]]] | None],
    flags: int,
    tracked: list[int],
    quit_at: int,
    add_at: int,
    with_quitter: bool,
    with_slow: bool,
) -> None:
    writes, plan = case
    runs: list[Any] = []
    for batched in (False, True):
        vm = make_vm(flags, tracked)
        snooper = FastSnooper()
        nodes = [vm.register_notifier(snooper)]
        slow = Snooper(name="slow")
        if with_slow:  # a node without track_guest_write: events for everyone
            nodes.append(vm.register_notifier(slow))
        meddler = FastMeddler(plan or {})
        if plan is not None:
            nodes.append(vm.register_notifier(meddler))
        # Alone (the snooper being the only other node, or none), the quitter is the
        # batch's single fast node until it adds a node or leaves.
        quitter = Quitter(quit_at, add_at)
        if with_quitter or plan is None:
            quitter.node = vm.register_notifier(quitter)
            nodes.append(quitter.node)
        if not with_quitter:
            vm.unregister_notifier(nodes[0])  # no snooper: the quitter may be alone
        datas = [
            ((np.arange(n) * 7 + i) & 0xFF).astype(np.uint8).tobytes()
            for i, (_, _, _, n) in enumerate(writes)
        ]
        gpas = [gfn * PAGE + off for _, gfn, off, _ in writes]
        if batched:
            res = vm.write_batch(
                gpas, [v for v, _, _, _ in writes], [len(d) for d in datas], b"".join(datas)
            )
            pieces = list(zip(res.path.tolist(), res.seq.tolist(), strict=True))
        else:
            pieces = []
            for (vcpu, _, _, _), gpa, data in zip(writes, gpas, datas, strict=True):
                pieces += [(int(p.path), p.seq or 0) for p in vm.write(vcpu, gpa, data).pieces]
        runs.append((
            pieces,
            state_of(vm),
            snooper.seen,
            slow.seen,
            meddler.held,
            quitter.seen,
            [s.seen for s, _ in quitter.added],
            [n.calls for n in nodes],
            [n.calls for _, n in quitter.added],
        ))
    assert runs[1] == runs[0]


def test_the_only_fast_node_is_called_per_piece_and_counted() -> None:
    vm = make_vm(0, [1, 2])
    snooper = FastSnooper()
    node = vm.register_notifier(snooper)
    res = vm.write_batch([PAGE, 3 * PAGE, 2 * PAGE + 8], [0, 1, 2], [8, 8, 4], bytes(20))
    assert res.seq.tolist() == [1, 0, 2]
    assert [(s, v, g, d) for s, v, g, d, _, _, _ in snooper.seen] == [
        (1, 0, PAGE, bytes(8)), (2, 2, 2 * PAGE + 8, bytes(4))
    ]
    assert node.calls == 2 and vm.stats.notifications == 2


def _run_alone(quitter: Quitter, batched: bool) -> tuple[Any, ...]:
    vm = make_vm(0, [1, 2, 3])
    quitter.node = vm.register_notifier(quitter)
    gpas = [PAGE, 2 * PAGE, 5 * PAGE, 3 * PAGE, PAGE, 2 * PAGE]
    if batched:
        vm.write_batch(gpas, [0] * 6, [8] * 6, bytes(48))
    else:
        for gpa in gpas:
            vm.write(0, gpa, bytes(8))
    return (
        quitter.node.calls, quitter.seen, [(s.seen, n.calls) for s, n in quitter.added],
        vm.stats.notifications,
    )


def test_a_lone_fast_node_that_adds_a_node_or_leaves_mid_batch() -> None:
    """The single-node path counts its calls on the right node when the list changes."""
    for leave_at, add_at in ((0, 2), (3, 0), (2, 2), (4, 1), (1, 4)):
        alone = _run_alone(Quitter(leave_at, add_at), batched=False)
        assert _run_alone(Quitter(leave_at, add_at), batched=True) == alone, (leave_at, add_at)


@dataclass
class Faulty:
    """A lone fast node that raises on the seqs in ``fail_at`` (after noting them)."""

    fail_at: set[int]
    name: str = "faulty"
    external: bool = True
    seen: list[int] = field(default_factory=list)

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        self.track_guest_write(vm, event.seq, event.vcpu, event.gpa, event.data)

    def track_guest_write(self, vm: Vm, seq: int, vcpu: int, gpa: int, data: bytes) -> None:
        self.seen.append(seq)
        if seq in self.fail_at:
            raise RuntimeError(f"fails at {seq}")

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        pass


def _run_faulty(fail_at: set[int], batched: bool) -> tuple[Any, ...]:
    vm = make_vm(0, [1, 2, 3])
    faulty = Faulty(fail_at)
    node = vm.register_notifier(faulty)
    gpas = [PAGE, 2 * PAGE, 5 * PAGE, 3 * PAGE + 8, PAGE, 2 * PAGE]
    if batched:
        vm.write_batch(gpas, [0] * 6, [8] * 6, bytes(range(48)))
    else:
        for k, gpa in enumerate(gpas):
            vm.write(0, gpa, bytes(range(8 * k, 8 * k + 8)))
    return (
        faulty.seen, node.calls, node.errors, vm.stats.notifications,
        vm.stats.notifier_errors, state_of(vm),
    )


def test_a_lone_fast_node_that_raises_is_counted_and_the_batch_goes_on() -> None:
    """notifiers.py's failure rule on the batch's single-node path: each raise is
    counted and logged on the node, and every later piece is still stored and told."""
    for fail_at in (set(), {1}, {5}, {1, 2, 3, 4, 5}, {2, 4}):
        alone = _run_faulty(fail_at, batched=False)
        assert alone[2] == len(fail_at)
        assert _run_faulty(fail_at, batched=True) == alone, fail_at
