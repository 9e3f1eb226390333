"""Export and import of one VM's state as plain values and numpy arrays (no I/O).

What is captured: options, limits, memslots (flags, dirty log), the track pool as sparse
``(page, references)`` pairs per owner, the seq, the statistics and, optionally, the
written extents of guest memory. Plugins, streams and leases live outside the domain;
the daemon's ``state`` module adds them around this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.arrays import distinct
from pagetrackd.domain.cost import CostModel
from pagetrackd.domain.errors import InvalidArgument
from pagetrackd.domain.memory import SlotMemory
from pagetrackd.domain.track import COUNTER_MAX
from pagetrackd.domain.types import (
    PAGE_SIZE,
    TENANT_OWNER,
    DmaPolicy,
    Semantics,
    SlotFlags,
    VmLimits,
)
from pagetrackd.domain.vm import Vm, VmStats

I64 = npt.NDArray[np.int64]

__all__ = ["SlotState", "VmState", "export_vm", "import_vm", "slot_memories", "vm_options"]


def _empty() -> I64:
    return np.zeros(0, dtype=np.int64)


@dataclass(slots=True)
class SlotState:
    """One memslot: its place, flags, references per owner, dirty log and memory."""

    slot_id: int
    base_gfn: int
    npages: int
    flags: int
    #: owner -> (page indexes ascending, references on each); "tenant" included
    owners: dict[str, tuple[I64, I64]] = field(default_factory=dict)
    dirty: I64 | None = None  #: page indexes dirty since the last read; None = not logging
    mem_index: I64 = field(default_factory=_empty)  #: written pages
    mem_lo: I64 = field(default_factory=_empty)  #: first byte of each page's extent
    mem_len: I64 = field(default_factory=_empty)  #: bytes of each extent
    mem_data: bytes = b""  #: the extents, concatenated in mem_index order

    def counters(self) -> tuple[I64, I64]:
        """(pages, track counter) for every page with a counter above 0."""
        if not self.owners:
            return _empty(), _empty()
        pages = np.concatenate([p for p, _ in self.owners.values()])
        refs = np.concatenate([c for _, c in self.owners.values()])
        uniq, inv = np.unique(pages, return_inverse=True)
        total = np.bincount(inv, weights=refs, minlength=uniq.size).astype(np.int64)
        return uniq, total


@dataclass(slots=True)
class VmState:
    """Everything the domain knows of one VM."""

    name: str
    vcpus: int
    dma_policy: str
    semantics: str
    cost: dict[str, Any]
    limits: dict[str, int]
    seq: int
    stats: dict[str, Any]
    memory_included: bool
    slots: list[SlotState] = field(default_factory=list)


def vm_options(state: VmState) -> dict[str, Any]:
    """Keyword arguments that create an empty VM with the state's options.

    Raises InvalidArgument when a value is out of range or unknown.
    """
    try:
        dma = DmaPolicy(state.dma_policy)
        sem = Semantics(state.semantics)
    except ValueError as exc:
        raise InvalidArgument(f"snapshot: {exc}") from None
    try:
        cost = CostModel(**state.cost)
        limits = VmLimits(**state.limits)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"snapshot: bad cost model or limits: {exc}") from None
    if not isinstance(state.vcpus, int) or isinstance(state.vcpus, bool):
        raise InvalidArgument(f"snapshot: vcpus {state.vcpus!r} is not an integer")
    return {
        "vcpus": state.vcpus,
        "dma_policy": dma,
        "semantics": sem,
        "cost": cost,
        "limits": limits,
    }


def export_vm(
    vm: Vm,
    *,
    include_memory: bool = True,
    keep_owner: Callable[[str], bool] = lambda owner: True,
) -> VmState:
    """Capture ``vm``. References of owners ``keep_owner`` rejects are left out, as if
    released (the daemon leaves out stream leases: they end with their streams)."""
    slots = []
    for slot in vm.slots.slots():
        t = slot.tracking
        owners: dict[str, tuple[I64, I64]] = {}
        nz = t.counters.nonzero_indices()
        if nz.size:
            tenant = t.held(nz, TENANT_OWNER)
            has = tenant > 0
            if has.any() and keep_owner(TENANT_OWNER):
                owners[TENANT_OWNER] = (nz[has].copy(), tenant[has])
        for owner in sorted(t.owners):
            if not keep_owner(owner):
                continue
            pages, counts = t.owner_arrays(owner)
            if pages.size:
                owners[owner] = (pages, counts)
        st = SlotState(
            slot.info.slot_id,
            slot.info.base_gfn,
            slot.info.npages,
            int(slot.info.flags),
            owners,
            None if slot.dirty is None else np.array(sorted(slot.dirty), dtype=np.int64),
        )
        if include_memory:
            # The sparse extents as they are held (see domain.memory): a page that holds
            # a few PTEs costs those bytes in the snapshot too.
            extents = list(slot.memory.extents())
            st.mem_index = np.array([page for page, _, _ in extents], dtype=np.int64)
            st.mem_lo = np.array([lo for _, lo, _ in extents], dtype=np.int64)
            st.mem_len = np.array([len(data) for _, _, data in extents], dtype=np.int64)
            st.mem_data = b"".join(data for _, _, data in extents)
        slots.append(st)
    stats = dataclasses.asdict(vm.stats)
    stats["vcpu_cycles"] = {str(k): v for k, v in vm.stats.vcpu_cycles.items()}
    return VmState(
        name=vm.name,
        vcpus=vm.vcpus,
        dma_policy=vm.dma_policy.value,
        semantics=vm.semantics.value,
        cost=dataclasses.asdict(vm.cost),
        limits=dataclasses.asdict(vm.limits),
        seq=vm.seq,
        stats=stats,
        memory_included=include_memory,
        slots=slots,
    )


#: the highest seq a restored VM may have: far beyond any real VM's, and it leaves 2^62
#: seqs of room, so a restored VM can never run its seqs past what the event arrays hold
MAX_RESTORED_SEQ = 1 << 62
_MAX_STAT = (1 << 63) - 1


def _check_stats(stats: dict[str, Any]) -> None:
    for name, value in stats.items():
        values = (
            list(value.values()) + [int(k) for k in value if str(k).isdigit()]
            if isinstance(value, dict) else value if isinstance(value, list) else [value]
        )
        if isinstance(value, dict) and not all(str(k).isdigit() for k in value):
            raise InvalidArgument(f"snapshot: stats.{name} has a key that is not a vCPU id")
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _MAX_STAT:
                raise InvalidArgument(
                    f"snapshot: stats.{name} holds {v!r}; counters are integers 0..2^63-1"
                )


def check_state(state: VmState) -> None:
    """Raise InvalidArgument naming the first inconsistency in ``state``."""
    if not isinstance(state.seq, int) or not 0 <= state.seq <= MAX_RESTORED_SEQ:
        raise InvalidArgument(
            f"snapshot: seq {state.seq!r} must be an integer 0..2^62 ({MAX_RESTORED_SEQ})"
        )
    _check_stats(state.stats)
    ids = [s.slot_id for s in state.slots]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("snapshot: a memslot id is listed twice")
    for s in state.slots:
        where = f"snapshot: slot {s.slot_id}"
        if s.npages <= 0 or s.base_gfn < 0:
            raise InvalidArgument(f"{where}: base_gfn {s.base_gfn} / npages {s.npages} invalid")
        for owner, (pages, counts) in s.owners.items():
            if pages.shape != counts.shape or pages.ndim != 1:
                raise InvalidArgument(f"{where}: owner {owner!r} has mismatched arrays")
            if pages.size and (int(pages.min()) < 0 or int(pages.max()) >= s.npages):
                raise InvalidArgument(f"{where}: owner {owner!r} names pages outside the slot")
            if pages.size and distinct(pages).size != pages.size:
                raise InvalidArgument(f"{where}: owner {owner!r} lists a page twice")
            if counts.size and (int(counts.min()) <= 0 or int(counts.max()) > COUNTER_MAX):
                raise InvalidArgument(
                    f"{where}: owner {owner!r} has reference counts outside 1..{COUNTER_MAX}"
                )
        _, total = s.counters()
        if total.size and int(total.max()) > COUNTER_MAX:
            raise InvalidArgument(f"{where}: a track counter would pass {COUNTER_MAX}")
        if s.dirty is not None and s.dirty.size and (
            int(s.dirty.min()) < 0 or int(s.dirty.max()) >= s.npages
        ):
            raise InvalidArgument(f"{where}: the dirty log names pages outside the slot")
        n = s.mem_index.size
        if s.mem_lo.size != n or s.mem_len.size != n:
            raise InvalidArgument(f"{where}: memory arrays have different lengths")
        if n:
            if int(s.mem_index.min()) < 0 or int(s.mem_index.max()) >= s.npages:
                raise InvalidArgument(f"{where}: memory names pages outside the slot")
            if distinct(s.mem_index).size != n:
                raise InvalidArgument(f"{where}: memory lists a page twice")
            if (
                int(s.mem_lo.min()) < 0
                or int(s.mem_len.min()) <= 0
                or int((s.mem_lo + s.mem_len).max()) > PAGE_SIZE
            ):
                raise InvalidArgument(f"{where}: a memory extent does not fit in its page")
        if int(s.mem_len.sum()) != len(s.mem_data):
            raise InvalidArgument(
                f"{where}: memory extents add up to {int(s.mem_len.sum())} bytes but"
                f" {len(s.mem_data)} are stored"
            )


def import_vm(
    state: VmState,
    vm: Vm,
    *,
    keep_owner: Callable[[str], bool] = lambda owner: True,
) -> None:
    """Load ``state`` into ``vm``, a VM just created with :func:`vm_options` (no
    memslots yet). References of owners ``keep_owner`` rejects are not restored.

    Raises InvalidArgument (the state is checked first; memslot and tracking calls
    check the rest) and leaves ``vm`` partly loaded then: discard it.
    """
    check_state(state)
    if len(vm.slots):
        raise InvalidArgument(f"VM {vm.name!r} already has memslots; restore into a new VM")
    for s in state.slots:
        flags = SlotFlags(s.flags)
        vm.set_memslot(s.slot_id, s.base_gfn, s.npages, flags)
        slot = vm.slots.by_id[s.slot_id]
        if s.mem_index.size:
            off = 0
            data = s.mem_data
            for i, lo, n in zip(
                s.mem_index.tolist(), s.mem_lo.tolist(), s.mem_len.tolist(), strict=True
            ):
                slot.memory.write(i, lo, data[off : off + n])
                off += n
        for owner, (pages, counts) in s.owners.items():
            if not keep_owner(owner):
                continue
            vm.track_add(np.repeat(pages + s.base_gfn, counts), owner)
        if slot.dirty is not None and s.dirty is not None:
            slot.dirty = set(s.dirty.tolist())
    vm.seq = state.seq
    _load_stats(vm.stats, state.stats)
    # The write path copies the notifier list's error count into the stats; carry it on.
    vm.notifiers.errors = vm.stats.notifier_errors


def _load_stats(stats: VmStats, saved: dict[str, Any]) -> None:
    for f in dataclasses.fields(stats):
        if f.name not in saved:
            continue
        value = saved[f.name]
        if f.name == "vcpu_cycles" and isinstance(value, dict):
            stats.vcpu_cycles = {int(k): int(v) for k, v in value.items()}
        elif isinstance(value, list) and isinstance(getattr(stats, f.name), list):
            setattr(stats, f.name, [int(v) for v in value])
        elif isinstance(value, int) and isinstance(getattr(stats, f.name), int):
            setattr(stats, f.name, value)


def slot_memories(vm: Vm) -> dict[int, SlotMemory]:
    """Each memslot's guest memory by slot id: what an incremental save cuts in chunks
    (see :meth:`SlotMemory.begin_save`)."""
    return {slot.info.slot_id: slot.memory for slot in vm.slots.slots()}
