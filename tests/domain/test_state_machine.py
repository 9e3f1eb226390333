"""One Vm driven by hypothesis against a reference model made of dicts and ints.

The reference knows nothing of numpy, chunks or owner tables: it keeps the slots in a
dict, one counter per (slot id, page), each owner's share of it, the written pages keyed
by (slot id, page) so that a MOVE carries memory with the slot, the seq, the dirty sets,
the stats and the exact list of notifier calls it expects. After every step the VM must
agree with it on everything observable; a step that fails must raise the error class the
reference names and change nothing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import structlog
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pagetrackd.domain import (
    CostModel,
    CounterOverflow,
    DmaPolicy,
    DmaRejected,
    EventBatch,
    FailedPrecondition,
    GfnNotInSlot,
    InvalidArgument,
    MoveRefused,
    NotTracked,
    PageTrackError,
    Semantics,
    SlotChange,
    SlotFlags,
    SlotNotFound,
    SlotOverlap,
    TrackInfo,
    Vm,
    VmLimits,
    WriteEvent,
    WritePath,
)
from pagetrackd.domain.notifiers import NotifierNode
from pagetrackd.domain.types import NO_VCPU
from pagetrackd.domain.vm import gfns_from

PAGE = 4096
GFN_LIMIT = 1 << 16
LIMITS = VmLimits(max_slots=4, gfn_bits=16, max_write_bytes=3 * PAGE)
COST = CostModel(mmio_exit_cycles=5000, emulate_cycles=1500, fast_cycles=7, dma_cycles=3)
VCPUS = 3
MMIO, FAST, EMUL = WritePath.MMIO_EXIT, WritePath.FAST, WritePath.EMULATED
OWNERS = ("tenant", "lease:1", "plugin:x")
OWNER_RE = re.compile(r"^[a-z][a-z0-9_.:/-]{0,127}$")
#: where slots may start: 504 and 1020 straddle 2 MiB regions (gfn >> 9), the last two
#: end at the gfn limit
BASES = [0, 4, 8, 16, 24, 32, 40, 48, 504, 1020, GFN_LIMIT - 8, GFN_LIMIT - 4]
#: every gfn a slot can hold, and a few just outside
QUERY_GFNS = sorted({g for b in BASES for g in range(max(b - 1, 0), min(b + 17, GFN_LIMIT + 1))})

Entry = tuple[Any, ...]


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Failing notifiers are logged by the core; capture instead of rendering them."""
    with structlog.testing.capture_logs():
        yield


def mkdata(n: int, seed: int) -> bytes:
    """``n`` bytes that differ from one write to the next."""
    return ((np.arange(n, dtype=np.int64) * 7 + seed) & 0xFF).astype(np.uint8).tobytes()


def pieces_of(gpa: int, data: bytes) -> list[tuple[int, bytes]]:
    """Split a write at page boundaries, the plain way."""
    out = []
    off = 0
    while off < len(data):
        g = gpa + off
        n = min(PAGE - g % PAGE, len(data) - off)
        out.append((g, data[off : off + n]))
        off += n
    return out


# ---------------------------------------------------------------- notifiers


class Recorder:
    """A per-event notifier: appends every call to a log shared by all notifiers."""

    def __init__(self, name: str, external: bool, fail: bool, log: list[Entry]) -> None:
        self.name = name
        self.external = external
        self.fail = fail
        self.log = log

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        self.log.append(
            (
                "write", self.name, event.seq, event.vcpu, event.gpa, event.data,
                int(event.source), event.untracked,
            )
        )
        if self.fail:
            raise RuntimeError(f"{self.name} fails on purpose")

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        listed = any(m.base_gfn == base_gfn and m.npages == npages for m in vm.memslots())
        self.log.append(("region", self.name, base_gfn, npages, listed))
        if self.fail:
            raise RuntimeError(f"{self.name} fails on purpose")


class BatchRecorder(Recorder):
    """A batch-capable notifier: single writes come one by one, batches at once."""

    def track_write_batch(self, vm: Vm, batch: EventBatch) -> None:
        events = tuple(
            (e.seq, e.vcpu, e.gpa, e.data, int(e.source), e.untracked) for e in batch.events()
        )
        self.log.append(("batch", self.name, events))
        if self.fail:
            raise RuntimeError(f"{self.name} fails on purpose")


# ---------------------------------------------------------------- reference model

Key = tuple[int, int]  # (slot id, page index in the slot)
Piece = tuple[int, int, WritePath, int | None]  # gpa, length, path, seq


class Reference:
    """What the VM should hold, as plainly as possible."""

    def __init__(self, semantics: Semantics) -> None:
        self.semantics = semantics
        self.dma_policy = DmaPolicy.BYPASS
        self.slots: dict[int, tuple[int, int, int]] = {}  # id -> (base, npages, flags)
        self.counters: dict[Key, int] = {}  # only counters > 0
        self.owners: dict[Key, dict[str, int]] = {}  # owner -> references, > 0 only
        self.memory: dict[Key, bytearray] = {}  # pages ever written
        self.dirty: dict[int, set[int]] = {}  # slots with LOG_DIRTY_PAGES
        self.seq = 0
        self.log: list[Entry] = []
        self.nodes: list[Recorder] = []  # newest first
        self.node_errors: dict[str, int] = {}
        self.node_calls: dict[str, int] = {}
        self.stats: dict[str, Any] = {
            "writes": 0,
            "pieces": [0, 0, 0],
            "bytes_written": 0,
            "dma_writes": 0,
            "dma_notified": 0,
            "dma_rejected": 0,
            "notifications": 0,
            "notifier_errors": 0,
            "cycles": [0, 0, 0],
            "dma_cycles": 0,
            "vcpu_cycles": {},
        }

    # -- lookups

    def find(self, gfn: int) -> Key | None:
        for sid, (base, npages, _) in self.slots.items():
            if base <= gfn < base + npages:
                return sid, gfn - base
        return None

    def count(self, gfn: int) -> int:
        key = self.find(gfn)
        return 0 if key is None else self.counters.get(key, 0)

    def infos(self, gfns: Sequence[int]) -> list[TrackInfo]:
        """TrackInfo per gfn. Large pages are disallowed over a 2 MiB (1 GiB) region of
        a slot while any gfn of that slot inside the region is tracked, and always over
        a region the slot covers only in part (R3.5)."""

        def edge(sid: int, gfn: int, shift: int) -> bool:
            base, npages, _ = self.slots[sid]
            size = 1 << shift
            first = gfn >> shift == base >> shift and base % size != 0
            last = gfn >> shift == (base + npages - 1) >> shift and (base + npages) % size != 0
            return first or last

        regions_2m = {(sid, (self.slots[sid][0] + page) >> 9) for sid, page in self.counters}
        regions_1g = {(sid, (self.slots[sid][0] + page) >> 18) for sid, page in self.counters}
        out = []
        for gfn in gfns:
            key = self.find(gfn)
            if key is None:
                out.append(TrackInfo(gfn, 0))
                continue
            n = self.counters.get(key, 0)
            out.append(
                TrackInfo(
                    gfn,
                    n,
                    dict(self.owners[key]) if n else {},
                    write_protected=n > 0,
                    lpage_disallowed_2m=(key[0], gfn >> 9) in regions_2m or edge(key[0], gfn, 9),
                    lpage_disallowed_1g=(key[0], gfn >> 18) in regions_1g
                    or edge(key[0], gfn, 18),
                )
            )
        return out

    def tracked(self, owner: str | None = None) -> list[int]:
        out = []
        for sid, page in self.counters:
            if owner is None or self.owners[(sid, page)].get(owner, 0):
                out.append(self.slots[sid][0] + page)
        return sorted(out)

    # -- notifier bookkeeping

    def told_order(self) -> list[Recorder]:
        """Who is told of one event, in order: batch-capable nodes (streams) first,
        then the per-event ones, external before internal (the shadow MMU's place,
        R4.8), each newest first (domain/notifiers.py)."""
        nodes = list(self.nodes)
        sync = [n for n in nodes if not isinstance(n, BatchRecorder)]
        return [n for n in nodes if isinstance(n, BatchRecorder)] + [
            n for n in sync if n.external
        ] + [n for n in sync if not n.external]

    def notify(self, node: Recorder, entry: Entry, deliveries: int = 1) -> None:
        self.log.append(entry)
        self.stats["notifications"] += deliveries
        self.node_calls[node.name] += deliveries
        if node.fail:
            self.stats["notifier_errors"] += 1
            self.node_errors[node.name] += 1

    def remove_region(self, base: int, npages: int, listed: bool, internal_only: bool) -> None:
        for node in list(self.nodes):
            if internal_only and node.external:
                continue
            self.log.append(("region", node.name, base, npages, listed))
            if node.fail:
                self.stats["notifier_errors"] += 1
                self.node_errors[node.name] += 1

    # -- memslots

    def drop_tracking(self, sid: int) -> None:
        for key in [k for k in self.counters if k[0] == sid]:
            del self.counters[key]
            del self.owners[key]

    def drop_plugin_tracking(self, sid: int) -> None:
        """2016 MOVE: plugins' references in the slot go (KVMGT's flush_slot removed them)."""
        for key in [k for k in self.counters if k[0] == sid]:
            held = self.owners[key]
            for owner in [o for o in held if o.startswith("plugin:")]:
                self.counters[key] -= held.pop(owner)
            if not self.counters[key]:
                del self.counters[key]
                del self.owners[key]

    def set_dirty(self, sid: int, flags: int) -> None:
        if flags & SlotFlags.LOG_DIRTY_PAGES:
            self.dirty.setdefault(sid, set())
        else:
            self.dirty.pop(sid, None)

    def set_memslot(self, sid: int, base: int, npages: int, flags: int) -> SlotChange:
        if not 0 <= sid < LIMITS.max_slots:
            raise InvalidArgument
        if flags & ~3:
            raise InvalidArgument
        old = self.slots.get(sid)
        if npages == 0:
            if old is None:
                raise SlotNotFound
            v2016 = self.semantics is Semantics.V2016
            # 2016: flush_slot runs while the slot is still listed; 6.6: once it is gone.
            self.remove_region(old[0], old[1], listed=v2016, internal_only=False)
            del self.slots[sid]
            self.drop_tracking(sid)
            for key in [k for k in self.memory if k[0] == sid]:
                del self.memory[key]
            self.dirty.pop(sid, None)
            return SlotChange.DELETE
        if base < 0 or base + npages > GFN_LIMIT:
            raise InvalidArgument
        if old is not None:
            if npages != old[1]:
                raise InvalidArgument
            if (flags ^ old[2]) & SlotFlags.READONLY:
                raise InvalidArgument
        for other, (b, n, _) in self.slots.items():
            if other != sid and b < base + npages and base < b + n:
                raise SlotOverlap
        if old is None:
            self.slots[sid] = (base, npages, flags)
            self.set_dirty(sid, flags)
            return SlotChange.CREATE
        if base != old[0]:
            if self.semantics is Semantics.LINUX_6_6:
                if any(node.external for node in self.nodes):
                    raise MoveRefused
                self.remove_region(old[0], old[1], listed=True, internal_only=True)
                self.drop_tracking(sid)
            else:
                self.remove_region(old[0], old[1], listed=True, internal_only=False)
                self.drop_plugin_tracking(sid)
            self.slots[sid] = (base, npages, flags)
            self.set_dirty(sid, flags)
            return SlotChange.MOVE
        if flags == old[2]:
            return SlotChange.NONE
        self.slots[sid] = (base, npages, flags)
        self.set_dirty(sid, flags)
        return SlotChange.FLAGS_ONLY

    def dirty_log(self, sid: int) -> bytes:
        if sid not in self.slots:
            raise SlotNotFound
        if sid not in self.dirty:
            raise FailedPrecondition
        words = (self.slots[sid][1] + 63) // 64
        out = bytearray(words * 8)
        for page in self.dirty[sid]:
            out[page // 8] |= 1 << (page % 8)
        self.dirty[sid] = set()
        return bytes(out)

    # -- tracking

    def occurrences(self, gfns: Sequence[int], owner: str) -> Counter[Key]:
        if not OWNER_RE.match(owner):
            raise InvalidArgument
        if any(g < 0 for g in gfns):
            raise InvalidArgument
        out: Counter[Key] = Counter()
        for gfn, n in Counter(gfns).items():
            key = self.find(gfn)
            if key is None:
                raise GfnNotInSlot
            out[key] += n
        return out

    def track_add(self, gfns: Sequence[int], owner: str) -> int:
        occ = self.occurrences(gfns, owner)
        if any(self.counters.get(k, 0) + n > 0xFFFF for k, n in occ.items()):
            raise CounterOverflow
        started = 0
        for key, n in occ.items():
            if self.counters.get(key, 0) == 0:
                started += 1
                self.owners[key] = {}
            self.counters[key] = self.counters.get(key, 0) + n
            self.owners[key][owner] = self.owners[key].get(owner, 0) + n
        return started

    def track_remove(self, gfns: Sequence[int], owner: str) -> int:
        occ = self.occurrences(gfns, owner)
        if any(self.owners.get(k, {}).get(owner, 0) < n for k, n in occ.items()):
            raise NotTracked
        stopped = 0
        for key, n in occ.items():
            self.take(key, owner, n)
            if key not in self.counters:
                stopped += 1
        return stopped

    def take(self, key: Key, owner: str, n: int) -> None:
        self.counters[key] -= n
        self.owners[key][owner] -= n
        if self.owners[key][owner] == 0:
            del self.owners[key][owner]
        if self.counters[key] == 0:
            del self.counters[key]
            del self.owners[key]

    def release_owner(self, owner: str) -> int:
        if owner == "tenant":
            raise InvalidArgument
        stopped = 0
        for key in list(self.owners):
            n = self.owners[key].get(owner, 0)
            if n:
                self.take(key, owner, n)
                if key not in self.counters:
                    stopped += 1
        return stopped

    # -- writes

    def charge(self, vcpu: int, path: WritePath, cycles: int) -> None:
        self.stats["pieces"][path] += 1
        self.stats["cycles"][path] += cycles
        if cycles:
            vc = self.stats["vcpu_cycles"]
            vc[vcpu] = vc.get(vcpu, 0) + cycles

    def store(self, key: Key, gpa: int, data: bytes) -> None:
        page = self.memory.setdefault(key, bytearray(PAGE))
        page[gpa % PAGE : gpa % PAGE + len(data)] = data
        if key[0] in self.dirty:
            self.dirty[key[0]].add(key[1])

    def check_access(self, gpa: int, n: int) -> None:
        if n <= 0 or n > LIMITS.max_write_bytes or gpa < 0 or gpa + n > GFN_LIMIT * PAGE:
            raise InvalidArgument

    def traps(self, gpa: int, data: bytes) -> bool:
        """Whether a guest write faults on any of its pages: tracked RAM, or not
        writable RAM. Then the whole write is emulated (R4.3, x86.c)."""
        for g, _ in pieces_of(gpa, data):
            key = self.find(g // PAGE)
            if key is None or self.slots[key[0]][2] & SlotFlags.READONLY:
                return True
            if self.counters.get(key, 0):
                return True
        return False

    def guest_piece(
        self, vcpu: int, gpa: int, data: bytes, batched: list[Entry] | None,
        trapped: bool = False,
    ) -> Piece:
        key = self.find(gpa // PAGE)
        if key is None or self.slots[key[0]][2] & SlotFlags.READONLY:
            self.charge(vcpu, MMIO, COST.mmio_exit_cycles)
            return gpa, len(data), MMIO, None
        self.store(key, gpa, data)
        self.stats["bytes_written"] += len(data)
        untracked = self.counters.get(key, 0) == 0
        if untracked and not trapped:
            self.charge(vcpu, FAST, COST.fast_cycles)
            return gpa, len(data), FAST, None
        self.charge(vcpu, EMUL, COST.emulate_cycles)
        self.seq += 1
        event = (self.seq, vcpu, gpa, data, 0, untracked)
        for node in self.told_order():
            if batched is not None and isinstance(node, BatchRecorder):
                continue  # told once, after the whole batch
            self.notify(node, ("write", node.name, *event))
        if batched is not None:
            batched.append(event)
        return gpa, len(data), EMUL, self.seq

    def write(self, vcpu: int, gpa: int, data: bytes) -> list[Piece]:
        if not 0 <= vcpu < VCPUS:
            raise InvalidArgument
        self.check_access(gpa, len(data))
        self.stats["writes"] += 1
        trapped = self.traps(gpa, data)
        return [self.guest_piece(vcpu, g, d, None, trapped) for g, d in pieces_of(gpa, data)]

    def cmpxchg(
        self, vcpu: int, gpa: int, expected: bytes, desired: bytes
    ) -> tuple[bool, bytes, bool, list[Piece]]:
        """x86.c emulator_cmpxchg_emulated, as plainly as it reads."""
        if len(expected) != len(desired):
            raise InvalidArgument
        if not 0 <= vcpu < VCPUS:
            raise InvalidArgument
        n = len(desired)
        self.check_access(gpa, n)
        key = self.find(gpa // PAGE)
        if (
            n not in (1, 2, 4, 8) or gpa % PAGE + n > PAGE or key is None
            or self.slots[key[0]][2] & SlotFlags.READONLY
        ):
            return True, b"", True, self.write(vcpu, gpa, desired)
        self.stats["writes"] += 1
        page = self.memory.get(key, bytearray(PAGE))
        current = bytes(page[gpa % PAGE : gpa % PAGE + n])
        if key[0] in self.dirty:
            self.dirty[key[0]].add(key[1])
        if current != expected:
            path = EMUL if self.counters.get(key, 0) else FAST
            self.charge(vcpu, path, COST.emulate_cycles if path is EMUL else COST.fast_cycles)
            return False, current, False, [(gpa, n, path, None)]
        piece = self.guest_piece(vcpu, gpa, desired, None)
        return True, current, False, [piece]

    def write_batch(self, writes: Sequence[tuple[int, int, bytes]]) -> list[tuple[int, Piece]]:
        for _, gpa, data in writes:
            self.check_access(gpa, len(data))
        if any(not 0 <= vcpu < VCPUS for vcpu, _, _ in writes):
            raise InvalidArgument
        self.stats["writes"] += len(writes)
        batched: list[Entry] = []
        out = []
        for i, (vcpu, gpa, data) in enumerate(writes):
            trapped = self.traps(gpa, data)
            for g, d in pieces_of(gpa, data):
                out.append((i, self.guest_piece(vcpu, g, d, batched, trapped)))
        if batched:
            for node in list(self.nodes):
                if isinstance(node, BatchRecorder):
                    self.notify(node, ("batch", node.name, tuple(batched)), len(batched))
        return out

    def dma_write(self, gpa: int, data: bytes) -> list[Piece]:
        self.check_access(gpa, len(data))
        plan = []
        for g, d in pieces_of(gpa, data):
            key = self.find(g // PAGE)
            if key is None or self.slots[key[0]][2] & SlotFlags.READONLY:
                raise FailedPrecondition
            plan.append((key, g, d))
        if self.dma_policy is DmaPolicy.REJECT:
            if any(self.counters.get(key, 0) for key, _, _ in plan):
                self.stats["dma_rejected"] += 1
                raise DmaRejected
        self.stats["dma_writes"] += 1
        out: list[Piece] = []
        for key, g, d in plan:
            self.store(key, g, d)
            self.stats["dma_cycles"] += COST.dma_cycles
            if self.dma_policy is DmaPolicy.NOTIFY and self.counters.get(key, 0):
                self.seq += 1
                self.stats["dma_notified"] += 1
                for node in self.told_order():
                    self.notify(node, ("write", node.name, self.seq, NO_VCPU, g, d, 1, False))
                out.append((g, len(d), EMUL, self.seq))
            else:
                out.append((g, len(d), FAST, None))
        return out


# ---------------------------------------------------------------- strategies

slot_ids = st.sampled_from([0, 0, 1, 1, 2, 2, 3, -1, 4])
bases = st.sampled_from(BASES)
sizes = st.sampled_from([1, 2, 4, 8, 16])
all_flags = st.sampled_from([0, 0, 0, 1, 2, 3, 4])
gfn_st = st.one_of(
    st.integers(0, 72),
    st.sampled_from([GFN_LIMIT - 9, GFN_LIMIT - 5, GFN_LIMIT - 1, GFN_LIMIT, -1]),
)
owner_st = st.sampled_from([*OWNERS, *OWNERS, *OWNERS, "Bad owner"])
offsets = st.one_of(st.sampled_from([0, 1, 8, 4088, 4092, 4095]), st.integers(0, PAGE - 1))
lengths = st.one_of(
    st.integers(1, 24), st.sampled_from([0, 4, 8, PAGE + 1, 2 * PAGE + 3, 3 * PAGE + 1])
)
batch_gfns = st.one_of(st.integers(0, 72), st.sampled_from([GFN_LIMIT - 5, GFN_LIMIT - 1]))


def gpa_of(gfn: int, offset: int) -> int:
    return gfn * PAGE + offset


class VmMachine(RuleBasedStateMachine):
    """Drives one Vm and its reference step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[Entry] = []
        self.vm: Vm
        self.ref: Reference
        self.nodes: dict[str, NotifierNode] = {}
        self.gone: list[NotifierNode] = []
        self.next_name = 0
        self.next_seed = 1
        self.touched: set[int] = set()

    # -- helpers

    def both(self, want: Callable[[], Any], got: Callable[[], Any]) -> tuple[Any, Any] | None:
        """Run the reference then the VM; if the reference raised, the VM must raise
        exactly that class. Returns both results, or None after a matching failure."""
        try:
            expected = want()
        except PageTrackError as e:
            with pytest.raises(PageTrackError) as caught:
                got()
            assert type(caught.value) is type(e), (caught.value, type(e))
            event(f"refused: {type(e).__name__}")
            return None
        result = got()
        if isinstance(result, SlotChange):
            event(f"slot change: {result.value}")
        return expected, result

    def gfns(self) -> st.SearchStrategy[int]:
        """Mostly gfns of live slots, sometimes any gfn (outside slots, past the limit)."""
        inside = sorted(g for b, n, _ in self.ref.slots.values() for g in range(b, b + n))
        if not inside:
            return gfn_st
        edges = [g for b, n, _ in self.ref.slots.values() for g in (b - 1, b + n)]
        tracked = self.ref.tracked()
        return st.sampled_from(
            inside * 3 + tracked * 4 + edges + [GFN_LIMIT - 1, GFN_LIMIT, -1]
        )

    def seed(self) -> int:
        self.next_seed += 1
        return self.next_seed

    def touch(self, gpa: int, n: int) -> None:
        for g in range(max(gpa, 0) // PAGE, (max(gpa, 0) + max(n, 1) - 1) // PAGE + 1):
            self.touched.add(g)

    def add_node(self, kind: str, external: bool, fail: bool) -> None:
        name = f"n{self.next_name}"
        self.next_name += 1
        cls = BatchRecorder if kind == "batch" else Recorder
        rec = cls(name, external, fail, self.log)
        self.nodes[name] = self.vm.register_notifier(rec)
        self.ref.nodes.insert(0, rec)
        self.ref.node_errors[name] = 0
        self.ref.node_calls[name] = 0

    # -- setup

    @initialize(
        semantics=st.sampled_from(Semantics),
        first=st.tuples(
            st.sampled_from([0, 8, 16, 24]), st.sampled_from([8, 16]), st.integers(0, 1)
        ),
        more=st.lists(st.tuples(bases, sizes, st.sampled_from([0, 0, 1, 2, 3])), max_size=2),
        tracked=st.lists(st.tuples(st.integers(0, 7), st.sampled_from(OWNERS)), max_size=4),
        notifiers=st.lists(
            st.tuples(st.sampled_from(["event", "batch"]), st.booleans(), st.booleans()),
            max_size=3,
        ),
    )
    def setup(
        self,
        semantics: Semantics,
        first: tuple[int, int, int],
        more: list[tuple[int, int, int]],
        tracked: list[tuple[int, str]],
        notifiers: list[tuple[str, bool, bool]],
    ) -> None:
        """A VM with one writable slot (so most runs reach tracked writes), maybe more."""
        self.vm = Vm("sm", vcpus=VCPUS, semantics=semantics, cost=COST, limits=LIMITS)
        self.ref = Reference(semantics)
        for sid, (base, npages, flags) in enumerate([first, *more]):
            self.set_memslot(sid, base, npages, flags)
        for page, owner in tracked:
            gfn = first[0] + page
            assert self.vm.track_add([gfn], owner) == self.ref.track_add([gfn], owner)
        for kind, external, fail in notifiers:
            self.add_node(kind, external, fail)

    # -- memslots

    @rule(sid=slot_ids, base=bases, npages=st.sampled_from([0, 1, 2, 4, 8, 16]), flags=all_flags)
    def set_memslot(self, sid: int, base: int, npages: int, flags: int) -> None:
        r = self.both(
            lambda: self.ref.set_memslot(sid, base, npages, flags),
            lambda: self.vm.set_memslot(sid, base, npages, SlotFlags(flags)),
        )
        if r is not None:
            assert r[0] is r[1]

    @precondition(lambda self: self.ref.slots)
    @rule(data=st.data(), base=bases, flags=st.sampled_from([None, 0, 1]))
    def move_slot(self, data: st.DataObject, base: int, flags: int | None) -> None:
        sid = data.draw(st.sampled_from(sorted(self.ref.slots)))
        old_base, npages, old_flags = self.ref.slots[sid]
        new_flags = old_flags if flags is None else (old_flags & 2) | flags
        r = self.both(
            lambda: self.ref.set_memslot(sid, base, npages, new_flags),
            lambda: self.vm.set_memslot(sid, base, npages, SlotFlags(new_flags)),
        )
        if r is not None:
            assert r[0] is r[1]

    @precondition(lambda self: self.ref.slots)
    @rule(data=st.data(), flags=st.sampled_from([0, 1, 2, 3]), resize=st.booleans())
    def change_flags_or_size(self, data: st.DataObject, flags: int, resize: bool) -> None:
        sid = data.draw(st.sampled_from(sorted(self.ref.slots)))
        base, npages, _ = self.ref.slots[sid]
        npages = npages * 2 if resize else npages
        r = self.both(
            lambda: self.ref.set_memslot(sid, base, npages, flags),
            lambda: self.vm.set_memslot(sid, base, npages, SlotFlags(flags)),
        )
        if r is not None:
            assert r[0] is r[1]

    @precondition(lambda self: self.ref.slots)
    @rule(data=st.data())
    def delete_slot(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.ref.slots)))
        r = self.both(
            lambda: self.ref.set_memslot(sid, 0, 0, 0),
            lambda: self.vm.set_memslot(sid, 0, 0),
        )
        assert r is not None and r[1] is SlotChange.DELETE

    @rule(data=st.data())
    def dirty_log(self, data: st.DataObject) -> None:
        live = sorted(self.ref.slots)
        sid = data.draw(st.one_of(st.sampled_from(live), slot_ids) if live else slot_ids)
        r = self.both(lambda: self.ref.dirty_log(sid), lambda: self.vm.get_dirty_log(sid))
        if r is not None:
            assert r[0] == r[1]

    # -- tracking

    @rule(data=st.data(), owner=owner_st, add=st.booleans())
    def track_list(self, data: st.DataObject, owner: str, add: bool) -> None:
        gfns = data.draw(st.lists(self.gfns(), max_size=5), "gfns")
        if add:
            r = self.both(
                lambda: self.ref.track_add(gfns, owner), lambda: self.vm.track_add(gfns, owner)
            )
        else:
            r = self.both(
                lambda: self.ref.track_remove(gfns, owner),
                lambda: self.vm.track_remove(gfns, owner),
            )
        if r is not None:
            assert r[0] == r[1]

    @rule(
        data=st.data(),
        count=st.sampled_from([0, 1, 2, 2, 3, 3, 4, 8]),
        owner=owner_st,
        add=st.booleans(),
    )
    def track_range(self, data: st.DataObject, count: int, owner: str, add: bool) -> None:
        start = data.draw(self.gfns(), "start")
        extra = data.draw(st.lists(self.gfns(), max_size=1), "extra")
        gfns = list(range(start, start + count)) + extra

        def want() -> int:
            if start < 0 or count <= 0:
                raise InvalidArgument  # gfns_from refuses the range itself
            return self.ref.track_add(gfns, owner) if add else self.ref.track_remove(gfns, owner)

        def got() -> int:
            arr = gfns_from([(start, count)], extra)
            return self.vm.track_add(arr, owner) if add else self.vm.track_remove(arr, owner)

        r = self.both(want, got)
        if r is not None:
            assert r[0] == r[1]

    @rule(
        data=st.data(),
        times=st.sampled_from([1, 1, 2, 3, 30000, 40000, 65534, 65535, 65536]),
        owner=st.sampled_from(OWNERS),
        add=st.booleans(),
    )
    def track_repeated(self, data: st.DataObject, times: int, owner: str, add: bool) -> None:
        """The same gfn many times in one list: reaches the 65535 bound quickly."""
        gfn = data.draw(self.gfns(), "gfn")
        gfns = [gfn] * times
        arr = np.full(times, gfn, dtype=np.int64)
        if add:
            r = self.both(
                lambda: self.ref.track_add(gfns, owner), lambda: self.vm.track_add(arr, owner)
            )
        else:
            r = self.both(
                lambda: self.ref.track_remove(gfns, owner),
                lambda: self.vm.track_remove(arr, owner),
            )
        if r is not None:
            assert r[0] == r[1]

    @rule(owner=st.sampled_from(OWNERS))
    def release_owner(self, owner: str) -> None:
        r = self.both(
            lambda: self.ref.release_owner(owner), lambda: self.vm.release_owner(owner)
        )
        if r is not None:
            assert r[0] == r[1]

    # -- notifiers

    @precondition(lambda self: len(self.ref.nodes) < 4)
    @rule(kind=st.sampled_from(["event", "batch"]), external=st.booleans(), fail=st.booleans())
    def register(self, kind: str, external: bool, fail: bool) -> None:
        self.add_node(kind, external, fail)

    @precondition(lambda self: self.ref.nodes)
    @rule(data=st.data())
    def unregister(self, data: st.DataObject) -> None:
        rec = data.draw(st.sampled_from(self.ref.nodes))
        node = self.nodes.pop(rec.name)
        assert self.vm.unregister_notifier(node) is True
        assert self.vm.unregister_notifier(node) is False
        self.ref.nodes.remove(rec)
        self.gone.append(node)

    # -- writes

    @rule(
        data=st.data(),
        vcpu=st.integers(0, VCPUS - 1),
        off=offsets,
        n=lengths,
        bad_vcpu=st.sampled_from([False] * 7 + [True]),
    )
    def write(self, data: st.DataObject, vcpu: int, off: int, n: int, bad_vcpu: bool) -> None:
        gfn = data.draw(self.gfns(), "gfn")
        vcpu = VCPUS if bad_vcpu else vcpu
        gpa = gpa_of(gfn, off)
        buf = mkdata(n, self.seed())
        self.touch(gpa, n)
        r = self.both(
            lambda: self.ref.write(vcpu, gpa, buf), lambda: self.vm.write(vcpu, gpa, buf)
        )
        if r is not None:
            want, got = r
            assert [(p.gpa, p.length, p.path, p.seq) for p in got.pieces] == want
            for p in want:
                event(f"write piece: {p[2].name}")
            assert got.applied == all(p[2] is not MMIO for p in want)

    @rule(
        data=st.data(),
        vcpu=st.integers(0, VCPUS - 1),
        off=offsets,
        n=st.sampled_from([1, 2, 4, 8, 8, 8, 3, 16]),
        hit=st.booleans(),
        bad=st.sampled_from([False] * 9 + [True]),
    )
    def cmpxchg(
        self, data: st.DataObject, vcpu: int, off: int, n: int, hit: bool, bad: bool
    ) -> None:
        """An emulated LOCK CMPXCHG that finds the expected value (hit) or not."""
        gfn = data.draw(self.gfns(), "gfn")
        gpa = gpa_of(gfn, off)
        key = self.ref.find(gfn)
        held = bytes(self.ref.memory.get(key, bytearray(PAGE))) if key else bytes(PAGE)
        at = gpa % PAGE
        current = (held[at : at + n] + bytes(n))[:n]
        expected = current if hit else bytes(b ^ 0xA5 for b in current)
        desired = mkdata(n + 1 if bad else n, self.seed())
        self.touch(gpa, n)
        r = self.both(
            lambda: self.ref.cmpxchg(vcpu, gpa, expected, desired),
            lambda: self.vm.cmpxchg(vcpu, gpa, expected, desired),
        )
        if r is not None:
            (exchanged, was, as_write, pieces), got = r
            assert (got.exchanged, got.current, got.as_write) == (exchanged, was, as_write)
            assert [(p.gpa, p.length, p.path, p.seq) for p in got.write.pieces] == pieces
            event(f"cmpxchg: {'as write' if as_write else exchanged}")

    @rule(data=st.data(), bad_vcpu=st.sampled_from([False] * 7 + [True]))
    def write_batch(self, data: st.DataObject, bad_vcpu: bool) -> None:
        inside = self.gfns()
        one = st.tuples(
            st.integers(0, VCPUS - 1),
            st.one_of(inside, inside, batch_gfns),
            offsets,
            st.integers(1, 24) | st.just(PAGE + 1),
        )
        writes = data.draw(st.lists(one, max_size=8), "writes")
        batch = []
        for vcpu, gfn, off, n in writes:
            gpa = gpa_of(gfn, off)
            self.touch(gpa, n)
            batch.append((vcpu, gpa, mkdata(n, self.seed())))
        if bad_vcpu and batch:
            batch[-1] = (VCPUS, *batch[-1][1:])
        r = self.both(
            lambda: self.ref.write_batch(batch),
            lambda: self.vm.write_batch(
                [g for _, g, _ in batch],
                [v for v, _, _ in batch],
                [len(d) for _, _, d in batch],
                b"".join(d for _, _, d in batch),
            ),
        )
        if r is not None:
            want, got = r
            pieces = list(
                zip(
                    got.write_index.tolist(),
                    got.gpa.tolist(),
                    got.length.tolist(),
                    got.path.tolist(),
                    got.seq.tolist(),
                    strict=True,
                )
            )
            assert pieces == [(i, g, n, int(p), s or 0) for i, (g, n, p, s) in want]
            for _, p in want:
                event(f"batch piece: {p[2].name}")

    @rule(policy=st.sampled_from(DmaPolicy))
    def set_dma_policy(self, policy: DmaPolicy) -> None:
        self.vm.set_policy(dma_policy=policy)
        self.ref.dma_policy = policy

    @rule(data=st.data(), off=offsets, n=lengths)
    def dma_write(self, data: st.DataObject, off: int, n: int) -> None:
        gpa = gpa_of(data.draw(self.gfns(), "gfn"), off)
        buf = mkdata(n, self.seed())
        self.touch(gpa, n)
        r = self.both(lambda: self.ref.dma_write(gpa, buf), lambda: self.vm.dma_write(gpa, buf))
        if r is not None:
            want, got = r
            assert [(p.gpa, p.length, p.path, p.seq) for p in got.pieces] == want
            for p in want:
                event(f"dma {self.ref.dma_policy.value}: {p[2].name}")

    # -- checks after every step

    @invariant()
    def dirty_logs_match(self) -> None:
        """Read (and so clear) every slot's dirty log: the bits the last step set."""
        for sid in sorted(self.ref.slots):
            r = self.both(
                lambda sid=sid: self.ref.dirty_log(sid),  # type: ignore[misc]
                lambda sid=sid: self.vm.get_dirty_log(sid),  # type: ignore[misc]
            )
            if r is not None:
                assert r[0] == r[1], sid

    @invariant()
    def slots_match(self) -> None:
        want = sorted((b, sid, n, f) for sid, (b, n, f) in self.ref.slots.items())
        got = [(m.base_gfn, m.slot_id, m.npages, int(m.flags)) for m in self.vm.memslots()]
        assert got == want

    @invariant()
    def tracking_matches(self) -> None:
        ref, vm = self.ref, self.vm
        assert vm.track_query(QUERY_GFNS) == ref.infos(QUERY_GFNS)
        assert [vm.is_tracked(g) for g in QUERY_GFNS] == [ref.count(g) > 0 for g in QUERY_GFNS]
        assert vm.tracked_count == len(ref.counters)
        assert vm.tracked_gfns().tolist() == ref.tracked()
        for owner in OWNERS:
            assert vm.tracked_gfns(owner).tolist() == ref.tracked(owner), owner

    @invariant()
    def memory_matches(self) -> None:
        ref, vm = self.ref, self.vm
        for (sid, page), buf in ref.memory.items():
            assert vm.read((ref.slots[sid][0] + page) * PAGE, PAGE) == bytes(buf)
        for gfn in self.touched:
            key = ref.find(gfn)
            if key is not None and key not in ref.memory:
                assert vm.read(gfn * PAGE, PAGE) == bytes(PAGE)
        self.touched.clear()
        # Sparse: at least a byte and at most a page per written page.
        assert len(ref.memory) <= vm.memory_bytes <= PAGE * len(ref.memory)

    @invariant()
    def notifications_match(self) -> None:
        ref, vm = self.ref, self.vm
        assert vm.seq == ref.seq
        assert self.log == ref.log
        self.log.clear()
        ref.log.clear()
        assert [n.notifier.name for n in vm.notifiers.nodes()] == [n.name for n in ref.nodes]
        for rec in ref.nodes:
            node = self.nodes[rec.name]
            want = (ref.node_errors[rec.name], ref.node_calls[rec.name])
            assert (node.errors, node.calls) == want, rec.name

    @invariant()
    def stats_match(self) -> None:
        s = self.vm.stats
        got = {k: getattr(s, k) for k in self.ref.stats}
        assert got == self.ref.stats
        assert s.mmio_exits == s.pieces[MMIO]
        assert s.fast_writes == s.pieces[FAST]
        assert s.emulations == s.pieces[EMUL]
        assert sum(s.vcpu_cycles.values()) == sum(s.cycles)


VmMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# 200 runs of 40 steps are CPU-bound: on a loaded 2-core machine they can take several
# minutes, so the suite's 120 s hang bound is raised for this one test.
TestVmMachine = pytest.mark.timeout(900)(VmMachine.TestCase)
