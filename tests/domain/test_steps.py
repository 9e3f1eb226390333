"""Big operations in slices (domain/steps.py) must equal their one-shot forms.

A batched write written a slice at a time leaves the same pieces, seqs, memory, dirty
logs, tracking, stats and notifier views as ``write_batch`` in one call (which itself
equals writing one by one, test_batch_equivalence.py), also when a per-event notifier
changes tracking, memslots or registrations mid-batch. A tracking change checked and
applied in slices returns the same transitions, refuses exactly what the one-shot call
refuses (changing nothing), and leaves the same counters, owners and huge-page state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.domain import DmaPolicy, PageTrackError, SlotFlags, Vm
from pagetrackd.domain.steps import BatchSteps, TrackSteps, gfn_set
from tests.domain.test_batch_equivalence import (
    PAGE,
    BatchSnooper,
    Meddler,
    Snooper,
    case_st,
    make_vm,
    state_of,
)


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    with structlog.testing.capture_logs():
        yield


def _pieces(res: Any) -> list[tuple[int, ...]]:
    return list(
        zip(
            res.write_index.tolist(), res.gpa.tolist(), res.length.tolist(),
            res.path.tolist(), res.seq.tolist(), strict=True,
        )
    )


@settings(max_examples=150, deadline=None)
@given(
    case=case_st(),
    flags=st.sampled_from([0, 1, 2, 3]),
    tracked=st.lists(st.sampled_from([*range(16), *range(32, 40)]), max_size=10),
    with_batch=st.booleans(),
    dma_policy=st.sampled_from([DmaPolicy.BYPASS, DmaPolicy.NOTIFY]),
    slices=st.lists(st.integers(1, 6), min_size=1, max_size=8),
)
def test_batch_in_slices_equals_one_shot(
    case: tuple[list[tuple[int, int, int, int]], dict[int, list[tuple[str, int]]] | None],
    flags: int,
    tracked: list[int],
    with_batch: bool,
    dma_policy: DmaPolicy,
    slices: list[int],
) -> None:
    """Pieces, summary, seqs, memory, tracking, stats and every notifier's view agree."""
    writes, plan = case
    runs = []
    for stepped in (False, True):
        vm = make_vm(flags, tracked)
        vm.set_policy(dma_policy=dma_policy)
        snooper, batch_snooper = Snooper(), BatchSnooper()
        meddler = Meddler(plan or {}, batch_snooper=batch_snooper)
        if with_batch:
            meddler.batch_node = vm.register_notifier(batch_snooper)
        vm.register_notifier(snooper)
        if plan is not None:
            vm.register_notifier(meddler)
        datas = [bytes([(i * 7 + k) & 0xFF for k in range(n)]) for i, (*_, n) in enumerate(writes)]
        gpa = [gfn * PAGE + off for _, gfn, off, _ in writes]
        vcpu = [v for v, *_ in writes]
        length = [len(d) for d in datas]
        if stepped:
            steps = BatchSteps(vm, gpa, vcpu, length, b"".join(datas))
            k = 0
            while not steps.finished:
                steps.step(slices[k % len(slices)])
                k += 1
            res = steps.result()
        else:
            res = vm.write_batch(gpa, vcpu, length, b"".join(datas))
        runs.append(
            (
                _pieces(res), res.counts, res.first_seq, res.last_seq, state_of(vm),
                snooper.seen, snooper.regions, batch_snooper.seen, sorted(meddler.held),
            )
        )
    assert runs[1] == runs[0]


def test_batch_steps_check_the_whole_batch_first() -> None:
    """A batch whose last write is bad is refused before its first slice lands."""
    vm = make_vm(0, [1])
    seen = Snooper()
    vm.register_notifier(seen)
    with pytest.raises(PageTrackError):
        BatchSteps(vm, [PAGE, 2 * PAGE, 1 << 60], [0, 0, 0], [8, 8, 8], bytes(24))
    assert vm.seq == 0 and vm.stats.writes == 0 and not seen.seen


OWNERS = ["tenant", "lease:a", "plugin:p"]


def _track_state(vm: Vm) -> dict[str, Any]:
    return {
        "tracked": vm.tracked_gfns().tolist(),
        "by_owner": {o: vm.tracked_gfns(o).tolist() for o in OWNERS},
        "query": vm.track_query(range(64)),
        "count": vm.tracked_count,
    }


def _tracking_vm(before: list[tuple[str, list[int]]]) -> tuple[Vm, list[int]]:
    vm = Vm("t", vcpus=1)
    vm.set_memslot(0, 0, 16, SlotFlags.NONE)
    vm.set_memslot(1, 32, 8, SlotFlags.NONE)
    for owner, gfns in before:
        vm.track_add(gfns, owner)
    started: list[int] = []
    vm.track_start_hooks.append(started.extend)
    return vm, started


#: a few gfns, so that requests and earlier references meet often; now and then one
#: outside the memslots
FEW = [1, 2, 3, 4, 33, 34]
gfn_st = st.one_of(st.sampled_from(FEW), st.sampled_from(FEW), st.integers(0, 45))


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(
        st.tuples(st.sampled_from(OWNERS), st.lists(st.sampled_from(FEW), max_size=12)),
        max_size=4,
    ),
    gfns=st.lists(gfn_st, min_size=1, max_size=30),
    owner=st.sampled_from(OWNERS),
    add=st.booleans(),
    slices=st.lists(st.integers(1, 5), min_size=1, max_size=6),
)
def test_tracking_in_slices_equals_one_shot(
    before: list[tuple[str, list[int]]],
    gfns: list[int],
    owner: str,
    add: bool,
    slices: list[int],
) -> None:
    """Same transitions, same refusal (nothing changed), same counters and owners, and
    the MMU hears of the same 0 -> 1 transitions in the same order."""
    runs = []
    for stepped in (False, True):
        vm, started = _tracking_vm(before)
        outcome: Any
        try:
            if stepped:
                steps = TrackSteps(vm, gfn_set(np.array(gfns)), owner, add=add)
                k = 0
                while steps.checking:
                    steps.check(slices[k % len(slices)])
                    k += 1
                if add:
                    outcome_new = steps.newly_tracked
                while not steps.finished:
                    steps.apply(slices[k % len(slices)])
                    k += 1
                outcome = steps.transitions
            else:
                if add:
                    outcome_new = len(set(gfns) - set(vm.tracked_gfns().tolist()))
                outcome = (vm.track_add if add else vm.track_remove)(gfns, owner)
        except PageTrackError as exc:
            outcome = type(exc)
            outcome_new = None
        runs.append((outcome, outcome_new if add else None, _track_state(vm), started))
    assert runs[1] == runs[0]


def test_track_steps_apply_only_once_checked() -> None:
    """Applying before the whole request was checked is a programming error."""
    vm, _ = _tracking_vm([])
    steps = TrackSteps(vm, gfn_set(np.arange(10)), add=True)
    steps.check(4)
    with pytest.raises(RuntimeError):
        steps.apply(4)
    assert vm.tracked_count == 0
