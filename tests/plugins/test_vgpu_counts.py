"""The vGPU's status counts present shadow entries as they change, instead of scanning
every shadow table per call (a big PPGTT made each status call, and so each ListPlugins
and metrics scrape, hold the event loop for a second). Random guest writes, partial
writes, flushes, builds, destroys and region removals against a full scan."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pagetrackd.domain import PAGE_SHIFT
from pagetrackd.plugins.vgpu import ADDR_MASK, PTE_PRESENT, Vgpu
from tests.plugins.vgpu_helpers import (
    DATA_BASE,
    PD,
    PDP,
    PML4,
    PT,
    PT2,
    TABLE_BASE,
    attach,
    make_vm,
    pte,
    put,
    put_half,
)


def scanned(vgpu: Vgpu) -> tuple[int, int]:
    """(entries mapping something, entries on a scratch page) by a walk of every spt."""
    mapped = on_scratch = 0
    for spt in vgpu._spt_by_mfn.values():
        for i, se in enumerate(spt.entries):
            if se & PTE_PRESENT:
                if (se & ADDR_MASK) >> PAGE_SHIFT == vgpu.scratch[spt.level]:
                    on_scratch += 1
                else:
                    mapped += 1
            elif i in spt.post:
                on_scratch += 1
    return mapped, on_scratch


TABLES = [PML4, PDP, PD, PT, PT2]
#: what an entry may name: a table, a data page, a gfn in no memslot
TARGETS = [*TABLES, DATA_BASE, DATA_BASE + 1, DATA_BASE + 2, 0x50000]

ops = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(TABLES), st.integers(0, 3),
              st.sampled_from(TARGETS), st.booleans()),
    st.tuples(st.just("half"), st.sampled_from(TABLES), st.integers(0, 3),
              st.sampled_from(TARGETS), st.booleans()),
    st.tuples(st.just("flush")),
    st.tuples(st.just("build"), st.sampled_from(TABLES)),
    st.tuples(st.just("destroy")),
    st.tuples(st.just("remove_region")),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(ops, max_size=30), st.sampled_from(["flush", "halves"]))
def test_status_counts_match_a_scan_of_the_shadow(
    steps: list[tuple[Any, ...]], partial: str
) -> None:
    vm = make_vm()
    vgpu = attach(vm, partial=partial, missing_table="scratch")
    for step in steps:
        kind = step[0]
        if kind in ("write", "half"):
            _, table, index, target, present = step
            value = pte(target) if present else 0
            if kind == "write":
                put(vm, table, index, value)
            else:
                put_half(vm, table, index, value, high=index % 2 == 1)
        elif kind == "flush":
            vgpu.call("flush")
        elif kind == "build":
            vgpu.call("build_ppgtt", root_gpa=step[1] << PAGE_SHIFT)
        elif kind == "destroy":
            mms = vgpu.call("ppgtts")["ppgtts"]
            if mms:
                vgpu.call("destroy_ppgtt", ppgtt=mms[0]["ppgtt"])
        else:
            vm.set_memslot(0, TABLE_BASE, 0)  # the tables' slot goes
            vm.set_memslot(0, TABLE_BASE, 64)
        status = vgpu.status()
        assert (status["shadow_entries"], status["scratch_entries"]) == scanned(vgpu), step
