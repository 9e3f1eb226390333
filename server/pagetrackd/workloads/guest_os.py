"""A guest OS model: frames, x86-64 page tables built with guest writes, processes.

Everything here happens *inside the guest*: page tables are created, changed and torn
down by guest writes (``vm.write``), so when the shadow MMU write-tracks a table the
write is trapped, emulated and reaches the plugin exactly as in KVM. The kernel
reaches physical memory through its direct map (2 MiB / 1 GiB pages over all RAM, as
Linux's ``__PAGE_OFFSET`` map), which is what makes the shadow MMU split large pages
over frames that hold page tables.

Two ways to use it:

* tests call :class:`GuestOs` / :class:`AddressSpace` with the default *immediate*
  emitter: every write is made at once;
* workloads (:class:`GuestOsWorkload`) plan operations into a queue of actions and
  run them in ``step``, so the sequence of writes and events depends only on the
  seed, never on how the runner slices the steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from pagetrackd.domain import (
    PAGE_SHIFT,
    PAGE_SIZE,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Vm,
)
from pagetrackd.plugins.shadow_mmu import ShadowMmu
from pagetrackd.plugins.x86_paging import (
    ENTRY_BYTES,
    PTE_RW,
    ROOT_LEVEL,
    index,
    is_leaf,
    level_shift,
    make_leaf_entry,
    make_table_entry,
    pages_per,
    table_gfn,
)

#: Linux x86-64 ``__PAGE_OFFSET`` without KASLR: the kernel's direct map of RAM
DIRECT_MAP: Final = 0xFFFF_8880_0000_0000
#: First PML4 index of the kernel half (``KERNEL_PGD_BOUNDARY``)
KERNEL_PGD_BOUNDARY: Final = 256

#: User regions of every process: (first gva, pages). Bases are 2 MiB aligned.
USER_REGIONS: Final = (
    (0x0000_0000_0040_0000, 512),  # text
    (0x0000_5555_5540_0000, 2048),  # heap
    (0x0000_7F00_0000_0000, 4096),  # mmap (transparent huge pages land here)
    (0x0000_7FFF_FF00_0000, 256),  # stack
)
THP_REGION: Final = 2


class FrameAllocator:
    """Guest frames of one memslot range, handed out deterministically.

    4 KiB frames come from the bottom (lowest never used first, then the most
    recently freed: the guest reuses hot frames, so a freed page table soon becomes
    data or another table); 2 MiB runs come from the top.
    """

    def __init__(self, base_gfn: int, npages: int) -> None:
        self.base_gfn = base_gfn
        self.end_gfn = base_gfn + npages
        self._next = base_gfn
        self._top = self.end_gfn & ~(pages_per(2) - 1)
        self._free: list[int] = []
        self._free_large: list[int] = []
        self.in_use = 0

    def alloc(self) -> int:
        """One frame; ResourceExhausted when the guest is out of memory."""
        if self._free:
            gfn = self._free.pop()
        elif self._next < min(self._top, self.end_gfn):
            gfn = self._next
            self._next += 1
        else:
            raise ResourceExhausted(
                f"guest out of memory: all {self.end_gfn - self.base_gfn} frames in use"
            )
        self.in_use += 1
        return gfn

    def free(self, gfn: int) -> None:
        """Give a frame back."""
        self._free.append(gfn)
        self.in_use -= 1

    def alloc_large(self) -> int | None:
        """A 2 MiB-aligned run of 512 frames, or None if none is left."""
        if self._free_large:
            gfn = self._free_large.pop()
        elif self._top - pages_per(2) >= max(self._next, self.base_gfn):
            self._top -= pages_per(2)
            gfn = self._top
        else:
            return None
        self.in_use += pages_per(2)
        return gfn

    def free_large(self, gfn: int) -> None:
        """Give a 2 MiB run back."""
        self._free_large.append(gfn)
        self.in_use -= pages_per(2)


#: (gpa, data, tag) -> None: make one guest write
WriteFn = Callable[[int, bytes, str], None]
#: (gva, write) -> None: the guest touches a gva (a translation through the MMU)
TouchFn = Callable[[int, bool], None]


def _no_touch(gva: int, write: bool) -> None:
    return None


@dataclass(slots=True)
class Leaf:
    """A user mapping as the guest kernel knows it."""

    gfn: int
    level: int
    entry: int
    cow: bool = False  #: read-only because it is shared after fork()


class GuestOs:
    """Guest memory management: frames, the kernel direct map, table writes.

    ``write(gpa, data, tag)`` makes a guest write (tags: "table", "data", "kernel",
    "stray"); ``touch(gva, write)`` is called before the kernel writes through the
    direct map (so a shadow MMU sees the access). Both default to acting at once.
    """

    def __init__(
        self,
        vm: Vm,
        base_gfn: int,
        npages: int,
        *,
        vcpu: int = 0,
        write: WriteFn | None = None,
        touch: TouchFn | None = None,
        direct_map: bool = True,
    ) -> None:
        self.vm = vm
        self.vcpu = vcpu
        self.alloc = FrameAllocator(base_gfn, npages)
        self.write: WriteFn = write or self._write_now
        self.touch: TouchFn = touch or _no_touch
        #: data frame (or 2 MiB run) -> mappings sharing it
        self.refs: dict[int, int] = {}
        #: called with a 4 KiB data frame's gfn when its last mapping goes
        self.on_free: Callable[[int], None] | None = None
        #: PML4 entries of the kernel half, copied into every new address space
        self.kernel_entries: dict[int, int] = {}
        self.kernel_tables: list[int] = []
        # Boot: no address space is loaded yet, so these writes touch nothing.
        touch, self.touch = self.touch, _no_touch
        try:
            if direct_map:
                self._build_direct_map(base_gfn, npages)
            #: ``swapper_pg_dir``: the kernel-only PML4 a vCPU runs on when idle
            self.swapper = self.new_table()
            self.write(
                (self.swapper << PAGE_SHIFT) + KERNEL_PGD_BOUNDARY * ENTRY_BYTES,
                self.kernel_half(),
                "table",
            )
        finally:
            self.touch = touch

    @property
    def swapper_cr3(self) -> int:
        """CR3 of the kernel-only address space."""
        return self.swapper << PAGE_SHIFT

    def kernel_half(self) -> bytes:
        """Entries 256..511 of a PML4, as ``clone_pgd_range`` copies them."""
        return b"".join(
            self.kernel_entries.get(i, 0).to_bytes(8, "little")
            for i in range(KERNEL_PGD_BOUNDARY, 512)
        )

    def _write_now(self, gpa: int, data: bytes, tag: str) -> None:
        self.vm.write(self.vcpu, gpa, data)

    # -------------------------------------------------------------- kernel side

    def kwrite(self, gpa: int, data: bytes, tag: str = "kernel") -> None:
        """The kernel writes physical memory through its direct map."""
        self.touch(DIRECT_MAP + gpa, True)
        self.write(gpa, data, tag)

    def new_table(self) -> int:
        """A zeroed frame for a page table (``pte_alloc_one`` -> ``clear_page``: a
        whole-page write, misaligned for a shadow MMU still shadowing the frame)."""
        gfn = self.alloc.alloc()
        self.kwrite(gfn << PAGE_SHIFT, bytes(PAGE_SIZE), "table")
        return gfn

    def set_entry(self, table: int, idx: int, value: int) -> None:
        """Write one 8-byte entry (``set_pte`` / ``set_pmd``...)."""
        self.kwrite((table << PAGE_SHIFT) + idx * ENTRY_BYTES, value.to_bytes(8, "little"), "table")

    def _build_direct_map(self, base_gfn: int, npages: int) -> None:
        """Map RAM at DIRECT_MAP + gpa with 1 GiB pages where a whole aligned GiB is in
        the range, else 2 MiB, else 4 KiB."""
        tables: dict[tuple[int, int], int] = {}  # (level, gva >> span) -> table gfn
        end = base_gfn + npages
        gfn = base_gfn
        while gfn < end:
            level = 1
            for lvl in (3, 2):
                span = pages_per(lvl)
                if gfn % span == 0 and gfn + span <= end:
                    level = lvl
                    break
            gva = DIRECT_MAP + (gfn << PAGE_SHIFT)
            table = self._kernel_table(gva, level, tables)
            self.set_entry(table, index(gva, level), make_leaf_entry(gfn, level, user=False))
            gfn += pages_per(level)

    def _kernel_table(self, gva: int, level: int, tables: dict[tuple[int, int], int]) -> int:
        """The kernel table at ``level`` (3 = PDPT .. 1 = PT) holding ``gva``'s entry,
        made on need; PDPTs hang off the kernel half of the PML4 template."""
        parent: int | None = None
        for lvl in range(3, level - 1, -1):
            key = (lvl, gva >> level_shift(lvl + 1))
            table = tables.get(key)
            if table is None:
                table = self.new_table()
                self.kernel_tables.append(table)
                tables[key] = table
                entry = make_table_entry(table, user=False)
                if parent is None:
                    self.kernel_entries[index(gva, ROOT_LEVEL)] = entry
                else:
                    self.set_entry(parent, index(gva, lvl + 1), entry)
            parent = table
        assert parent is not None
        return parent

    # -------------------------------------------------------------- data frames

    def get_frame(self, level: int = 1) -> int | None:
        """A data frame (level 1) or a 2 MiB run (level 2) with one reference."""
        gfn = self.alloc.alloc() if level == 1 else self.alloc.alloc_large()
        if gfn is not None:
            self.refs[gfn] = 1
        return gfn

    def share_frame(self, gfn: int) -> None:
        """One more mapping of a data frame (fork)."""
        self.refs[gfn] += 1

    def put_frame(self, gfn: int, level: int = 1) -> None:
        """Drop one mapping of a data frame; freed when none is left."""
        n = self.refs[gfn] - 1
        if n:
            self.refs[gfn] = n
            return
        del self.refs[gfn]
        if level == 1:
            if self.on_free is not None:
                self.on_free(gfn)
            self.alloc.free(gfn)
        else:
            self.alloc.free_large(gfn)


class AddressSpace:
    """One process's page tables, built, changed and destroyed with guest writes.

    The builder keeps a mirror of the entries it wrote (the guest kernel's own
    knowledge); stray writes may make guest memory differ from it, which is fine:
    the shadow MMU must follow guest memory, not the builder.
    """

    def __init__(self, os: GuestOs) -> None:
        self.os = os
        self.pml4 = os.new_table()
        self.tables: dict[int, int] = {self.pml4: ROOT_LEVEL}  #: table gfn -> level
        self.entries: dict[int, dict[int, int]] = {self.pml4: {}}
        self.parent: dict[int, tuple[int, int]] = {}  #: table gfn -> (parent gfn, index)
        self.leaves: dict[int, Leaf] = {}  #: user gva (page aligned) -> mapping
        if os.kernel_entries:
            # pgd_ctor: clone_pgd_range copies the kernel half in one memcpy.
            gpa = (self.pml4 << PAGE_SHIFT) + KERNEL_PGD_BOUNDARY * ENTRY_BYTES
            os.kwrite(gpa, os.kernel_half(), "table")
            self.entries[self.pml4].update(os.kernel_entries)
        self.destroyed = False

    @property
    def cr3(self) -> int:
        """The CR3 value (gpa of the PML4)."""
        return self.pml4 << PAGE_SHIFT

    def _set(self, table: int, idx: int, value: int) -> None:
        self.os.set_entry(table, idx, value)
        if value:
            self.entries[table][idx] = value
        else:
            self.entries[table].pop(idx, None)

    def _table_for(self, gva: int, level: int, create: bool) -> int | None:
        table = self.pml4
        for lvl in range(ROOT_LEVEL, level, -1):
            idx = index(gva, lvl)
            entry = self.entries[table].get(idx)
            if entry is None:
                if not create:
                    return None
                child = self.os.new_table()
                self.tables[child] = lvl - 1
                self.entries[child] = {}
                self.parent[child] = (table, idx)
                self._set(table, idx, make_table_entry(child))
                table = child
                continue
            if is_leaf(entry, lvl):
                if not create:
                    return None
                raise InvalidArgument(f"gva {gva:#x} is inside a level-{lvl} large page")
            table = table_gfn(entry)
        return table

    def map(
        self,
        gva: int,
        gfn: int,
        level: int = 1,
        *,
        writable: bool = True,
        user: bool = True,
        nx: bool = False,
        cow: bool = False,
    ) -> None:
        """Map ``gva`` to ``gfn`` with a level-``level`` leaf (1 = 4 KiB, 2 = 2 MiB,
        3 = 1 GiB), creating the tables on the way."""
        gva &= ~((1 << level_shift(level)) - 1)
        if gva in self.leaves:
            raise InvalidArgument(f"gva {gva:#x} is already mapped")
        table = self._table_for(gva, level, create=True)
        assert table is not None
        idx = index(gva, level)
        if idx in self.entries[table]:
            raise InvalidArgument(f"gva {gva:#x} overlaps a mapping of another size")
        entry = make_leaf_entry(gfn, level, writable=writable, user=user, nx=nx)
        self._set(table, idx, entry)
        self.leaves[gva] = Leaf(gfn, level, entry, cow)

    def can_map(self, gva: int, level: int) -> bool:
        """Whether a level-``level`` page can be mapped at ``gva``: no mapping or table
        there yet and no large page above."""
        table = self.pml4
        for lvl in range(ROOT_LEVEL, level, -1):
            entry = self.entries[table].get(index(gva, lvl))
            if entry is None:
                return True
            if is_leaf(entry, lvl):
                return False
            table = table_gfn(entry)
        return index(gva, level) not in self.entries[table]

    def find(self, gva: int) -> tuple[int, Leaf] | None:
        """The mapping covering ``gva``: (its aligned gva, leaf), or None."""
        for level in (1, 2, 3):
            base = gva & ~((1 << level_shift(level)) - 1)
            leaf = self.leaves.get(base)
            if leaf is not None and leaf.level == level:
                return base, leaf
        return None

    def entry_gpa(self, gva: int, level: int) -> int:
        """Gpa of the leaf entry for a mapped ``gva``."""
        table = self._table_for(gva, level, create=False)
        if table is None:
            raise InvalidArgument(f"gva {gva:#x} is not mapped")
        return (table << PAGE_SHIFT) + index(gva, level) * ENTRY_BYTES

    def unmap(self, gva: int) -> Leaf:
        """Clear the mapping of a mapped ``gva`` (``ptep_get_and_clear``: 8 bytes)."""
        leaf = self.leaves.pop(gva)
        table = self._table_for(gva, leaf.level, create=False)
        assert table is not None
        self._set(table, index(gva, leaf.level), 0)
        return leaf

    def set_writable(self, gva: int, writable: bool) -> None:
        """Flip the RW bit of a mapping the way Linux does (``clear_bit`` / ``set_bit``
        on ``_PAGE_BIT_RW``): a locked ``andb``/``orb`` of the entry's low byte, a
        one-byte write at a pte-aligned offset (not misaligned for KVM, R7.3)."""
        leaf = self.leaves[gva]
        entry = (leaf.entry | PTE_RW) if writable else (leaf.entry & ~PTE_RW)
        gpa = self.entry_gpa(gva, leaf.level)
        table = gpa >> PAGE_SHIFT
        self.os.kwrite(gpa, bytes([entry & 0xFF]), "table")
        self.entries[table][index(gva, leaf.level)] = entry
        leaf.entry = entry

    def remap_halves(self, gva: int, gfn: int) -> None:
        """Point a 4 KiB mapping at another frame with two 4-byte writes, low half then
        high half (a 32-bit ``set_pte``); KVM widens each to the whole gpte (R7.2a)."""
        leaf = self.leaves[gva]
        entry = make_leaf_entry(gfn, 1, writable=bool(leaf.entry & PTE_RW))
        gpa = self.entry_gpa(gva, 1)
        raw = entry.to_bytes(8, "little")
        self.os.kwrite(gpa, raw[:4], "table")
        self.os.kwrite(gpa + 4, raw[4:], "table")
        self.entries[gpa >> PAGE_SHIFT][index(gva, 1)] = entry
        leaf.gfn = gfn
        leaf.entry = entry

    def fork(self) -> AddressSpace:
        """``dup_mmap``: a child with the same 4 KiB user mappings; writable private
        pages become copy-on-write, write-protected in the parent (one-byte clear_bit)
        and mapped read-only in the child. Huge pages are not inherited."""
        child = AddressSpace(self.os)
        for gva, leaf in list(self.leaves.items()):
            if leaf.level != 1:
                continue  # huge pages are not inherited (as with MADV_DONTFORK)
            if leaf.entry & PTE_RW:
                self.set_writable(gva, False)
                leaf.cow = True
            self.os.share_frame(leaf.gfn)
            child.map(gva, leaf.gfn, leaf.level, writable=False, cow=leaf.cow)
        return child

    def destroy(self) -> None:
        """``exit_mmap``: clear every user mapping (``zap_pte_range``), then clear the
        upper entries and free the tables bottom-up (``free_pgtables``), then the PML4.
        The kernel half is shared and left alone."""
        for gva in list(self.leaves):
            leaf = self.unmap(gva)
            self.os.put_frame(leaf.gfn, leaf.level)
        for level in (1, 2, 3):
            for table in [t for t, lvl in self.tables.items() if lvl == level]:
                parent, idx = self.parent.pop(table)
                self._set(parent, idx, 0)
                del self.tables[table]
                del self.entries[table]
                self.os.alloc.free(table)
        self.os.alloc.free(self.pml4)
        self.tables.clear()
        self.entries.clear()
        self.destroyed = True


# ====================================================================== workloads

_WRITE, _TOUCH, _ROOT, _UNPROTECT, _AUDIT, _TRACK, _UNTRACK = range(7)


@dataclass(slots=True)
class Process:
    """A guest process: its address space and what it has done."""

    pid: int
    mm: AddressSpace
    writes_left: int = 0


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One workload option: its kind ("int", "float", "bool"), default and bounds."""

    kind: str
    default: int | float | bool
    lo: float = 0
    hi: float = 1 << 62


def parse_options(
    kind: str, specs: Mapping[str, OptionSpec], options: Mapping[str, Any]
) -> dict[str, Any]:
    """Options as typed values (strings from the API are parsed); unknown keys, bad
    values and out-of-range numbers raise InvalidArgument naming the option."""
    unknown = sorted(set(options) - set(specs))
    if unknown:
        raise InvalidArgument(
            f"{kind}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(specs))}"
        )
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        raw = options.get(name, spec.default)
        value: int | float | bool
        try:
            if spec.kind == "bool":
                if isinstance(raw, str):
                    if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    value = raw.lower() in ("true", "1", "yes", "on")
                elif isinstance(raw, bool | int):
                    value = bool(raw)
                else:
                    raise ValueError(raw)
            elif spec.kind == "int":
                if isinstance(raw, bool):
                    raise ValueError(raw)
                value = int(raw, 0) if isinstance(raw, str) else int(raw)
                if isinstance(raw, float) and raw != value:
                    raise ValueError(raw)
            else:
                if isinstance(raw, bool):
                    raise ValueError(raw)
                value = float(raw)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"{kind}: option {name!r} must be {spec.kind}, got {raw!r}"
            ) from None
        if spec.kind != "bool" and not spec.lo <= value <= spec.hi:
            raise InvalidArgument(
                f"{kind}: option {name!r} must be between {spec.lo:g} and {spec.hi:g},"
                f" got {value}"
            )
        out[name] = value
    return out


#: options every guest-OS workload takes
COMMON_OPTIONS: Final[dict[str, OptionSpec]] = {
    "writes": OptionSpec("int", 0, 0, 1 << 62),  # stop after this many writes; 0 = never
    "vcpus": OptionSpec("int", 2, 0, 4096),  # 0 = 1
    "slot": OptionSpec("int", 0, 0, 508),
    "base_gfn": OptionSpec("int", 0x40000, 0, 1 << 39),
    "pages": OptionSpec("int", 1 << 16, 1024, 1 << 24),
    "flood_threshold": OptionSpec("int", 3, 1, 1000),
    "audit_every": OptionSpec("int", 0, 0, 1 << 30),  # ops between audits; 0 = never
}


class GuestOsWorkload:
    """Base of the guest-OS workloads: options, setup, the action queue and step.

    Subclasses plan one operation at a time in :meth:`plan_op`, using only the
    seeded generator and the guest's own bookkeeping; nothing planned depends on
    what the shadow MMU does, so the same seed gives the same writes with or
    without it.
    """

    kind = "guest-os"
    OPTIONS: dict[str, OptionSpec] = COMMON_OPTIONS

    def __init__(self, seed: int, options: Mapping[str, Any]) -> None:
        self.seed = seed
        self.opts = parse_options(self.kind, self.OPTIONS, options)
        self.rng = np.random.default_rng(seed)
        self.vcpus = max(1, int(self.opts["vcpus"]))
        self.limit = int(self.opts["writes"])
        self._queue: deque[tuple[int, int, Any, Any]] = deque()
        self._vm: Vm | None = None
        self.mmu: ShadowMmu | None = None
        self.mmu_attached_here = False
        self.os: GuestOs | None = None
        self.processes: list[Process] = []
        self._next_pid = 1
        self._running: dict[int, AddressSpace | None] = {}  # vcpu -> mm, at plan time
        self._plan_vcpu = 0
        self._ops = 0
        self._planned = 0  #: writes planned so far
        self._kdata: int | None = None
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "writes", "table_writes", "data_writes", "kernel_writes", "stray_writes",
                "touches", "guest_faults", "root_switches", "forks", "execs", "exits",
                "cow_breaks", "unprotects", "audits", "audit_mismatches", "ops",
            ),
            0,
        )
        self._base_stats: tuple[list[int], list[int]] = ([0, 0, 0], [0, 0, 0])
        self._base_mmu: dict[str, int | str] = {}

    # -------------------------------------------------------------- setup

    def want_mmu(self) -> bool:
        """Whether this run uses the shadow MMU (and so tracks guest tables)."""
        return True

    def setup(self, vm: Vm) -> None:
        """Create the memslot if missing, find or attach the shadow MMU, boot the
        guest kernel (direct map) and plan the first processes."""
        if self.vcpus > vm.vcpus:
            raise InvalidArgument(f"{self.kind}: {self.vcpus} vcpus asked, the VM has {vm.vcpus}")
        slot_id = int(self.opts["slot"])
        existing = next((s for s in vm.memslots() if s.slot_id == slot_id), None)
        if existing is None:
            vm.set_memslot(slot_id, int(self.opts["base_gfn"]), int(self.opts["pages"]))
            base, npages = int(self.opts["base_gfn"]), int(self.opts["pages"])
        else:
            base, npages = existing.base_gfn, existing.npages
        self._vm = vm
        if self.want_mmu():
            for node in vm.notifiers.nodes():
                if isinstance(node.notifier, ShadowMmu):
                    self.mmu = node.notifier
                    break
            else:
                self.mmu = ShadowMmu()
                self.mmu.attach(vm, flood_threshold=int(self.opts["flood_threshold"]))
                self.mmu_attached_here = True
            self._base_mmu = self.mmu.status()
        self._base_stats = (list(vm.stats.pieces), list(vm.stats.cycles))
        try:
            self.os = GuestOs(
                vm, base, npages, write=self._emit_write, touch=self._emit_touch,
                direct_map=True,
            )
            for vcpu in range(self.vcpus):
                self._queue.append((_ROOT, vcpu, self.os.swapper_cr3, None))
                self._running[vcpu] = None
            self.boot()
        except BaseException:
            # A refused start changes nothing: undo the MMU and the slot made above
            # (booting only plans writes, so guest memory is untouched).
            if self.mmu is not None and self.mmu_attached_here:
                self.mmu.detach()
                self.mmu, self.mmu_attached_here = None, False
            if existing is None:
                vm.set_memslot(slot_id, base, 0)
            raise

    def boot(self) -> None:
        """Plan what the guest does right after boot (subclasses start processes)."""

    # -------------------------------------------------------------- planning helpers

    def _emit_write(self, gpa: int, data: bytes, tag: str) -> None:
        self._planned += 1
        self._queue.append((_WRITE, self._plan_vcpu, gpa, (data, tag)))

    def _emit_touch(self, gva: int, write: bool) -> None:
        self._queue.append((_TOUCH, self._plan_vcpu, gva, write))

    def emit_audit(self) -> None:
        """Plan an audit of the shadow MMU at this point of the stream."""
        self._queue.append((_AUDIT, 0, 0, None))

    def emit_unprotect(self, gfn: int) -> None:
        """Plan an unprotect of ``gfn`` (emulation gave up; R4.10)."""
        self._queue.append((_UNPROTECT, self._plan_vcpu, gfn, None))

    def emit_track(self, gfn: int, on: bool) -> None:
        """Plan a tenant-style tracking reference add (or remove) on a data frame."""
        self._queue.append((_TRACK if on else _UNTRACK, 0, gfn, None))

    @property
    def guest(self) -> GuestOs:
        """The guest OS model (after setup)."""
        if self.os is None:
            raise FailedPrecondition(f"{self.kind}: setup() has not run")
        return self.os

    def run_on(self, vcpu: int, mm: AddressSpace | None) -> None:
        """Schedule ``mm`` (None: the kernel's own ``swapper_pg_dir``) on ``vcpu``: a
        CR3 load if it is not already running there."""
        self._plan_vcpu = vcpu
        if self._running.get(vcpu) is not mm:
            self._running[vcpu] = mm
            cr3 = self.guest.swapper_cr3 if mm is None else mm.cr3
            self._queue.append((_ROOT, vcpu, cr3, None))

    def forget_mm(self, mm: AddressSpace) -> None:
        """``mm`` is gone: vCPUs that ran it switch to the kernel's address space."""
        current = self._plan_vcpu
        for vcpu, running in list(self._running.items()):
            if running is mm:
                self.run_on(vcpu, None)
        self._plan_vcpu = current

    def new_process(self, mm: AddressSpace) -> Process:
        """Register a process for ``mm``."""
        proc = Process(self._next_pid, mm)
        self._next_pid += 1
        self.processes.append(proc)
        return proc

    def exit_process(self, proc: Process) -> None:
        """Tear the process's address space down (on the vCPU planning now)."""
        self.processes.remove(proc)
        self.run_on(self._plan_vcpu, proc.mm)  # exit_mmap runs in the dying task
        proc.mm.destroy()
        self.forget_mm(proc.mm)
        self.counts["exits"] += 1

    def demand_fault(self, mm: AddressSpace, gva: int, write: bool) -> bool:
        """The guest touches ``gva``: a user access through the MMU; if the guest has
        no mapping it takes the fault and maps a fresh zeroed frame (clear_page through
        the direct map, then set_pte), and the access is retried. A write to a COW
        page copies it first. False if the access cannot be satisfied."""
        os = self.guest
        found = mm.find(gva)
        self._emit_touch(gva, write)
        self.counts["touches"] += 1
        if found is None:
            self.counts["guest_faults"] += 1
            gfn = os.get_frame()
            if gfn is None:
                return False
            self.new_frame(gfn)
            os.kwrite(gfn << PAGE_SHIFT, bytes(PAGE_SIZE), "kernel")
            mm.map(gva & ~(PAGE_SIZE - 1), gfn, 1, writable=True)
            self._emit_touch(gva, write)
            return True
        base, leaf = found
        if write and not leaf.entry & PTE_RW:
            if not leaf.cow:
                return False  # SIGSEGV: mprotect'ed read-only
            self.counts["guest_faults"] += 1
            self.counts["cow_breaks"] += 1
            if os.refs.get(leaf.gfn, 1) == 1:
                mm.set_writable(base, True)  # last user: just make it writable again
                leaf.cow = False
            else:
                new = os.get_frame()
                if new is None:
                    return False
                os.kwrite(new << PAGE_SHIFT, self.rng.bytes(64) * (PAGE_SIZE // 64), "kernel")
                mm.unmap(base)
                os.put_frame(leaf.gfn, leaf.level)
                mm.map(base, new, 1, writable=True)
            self._emit_touch(gva, write)
        return True

    def new_frame(self, gfn: int) -> None:
        """Hook: a demand fault is about to map the fresh frame ``gfn``."""

    def data_write(self, mm: AddressSpace, gva: int, nbytes: int) -> None:
        """The process stores ``nbytes`` at ``gva`` (within its page), after the access."""
        found = mm.find(gva)
        if found is None:
            return
        base, leaf = found
        gpa = (leaf.gfn << PAGE_SHIFT) + (gva - base)
        nbytes = min(nbytes, PAGE_SIZE - (gpa & (PAGE_SIZE - 1)))
        self._emit_write(gpa, self.rng.bytes(nbytes), "data")

    def random_user_gva(self, region: int | None = None) -> int:
        """A page-aligned gva in one of the user regions."""
        r = int(self.rng.integers(len(USER_REGIONS))) if region is None else region
        base, pages = USER_REGIONS[r]
        return base + (int(self.rng.integers(pages)) << PAGE_SHIFT)

    def plan_op(self) -> None:
        """Plan one operation (subclasses)."""
        raise NotImplementedError

    def _kernel_scribble(self) -> None:
        """A kernel store to its own per-CPU data (a frame taken at boot)."""
        os = self.guest
        if self._kdata is None:
            self._kdata = os.get_frame()
            if self._kdata is None:
                raise ResourceExhausted(f"{self.kind}: guest out of memory")
        offset = (self._plan_vcpu * 64) % PAGE_SIZE
        os.kwrite((self._kdata << PAGE_SHIFT) + offset, self.rng.bytes(8), "kernel")

    # -------------------------------------------------------------- running

    def step(self, vm: Vm, max_writes: int) -> int:
        """Run planned actions until ``max_writes`` writes were made (planning more as
        the queue drains); 0 when the write limit is reached."""
        if self._vm is None:
            raise FailedPrecondition(f"{self.kind}: setup() has not run")
        done = 0
        queue = self._queue
        counts = self.counts
        mmu = self.mmu
        while True:
            if self.limit and counts["writes"] >= self.limit:
                return done
            if not queue:
                self._ops += 1
                counts["ops"] += 1
                planned = self._planned
                self.plan_op()
                if self._planned == planned:
                    # Nothing to write this time (a read, a refused access): the kernel
                    # updates its own bookkeeping, so every operation writes.
                    self._kernel_scribble()
                every = int(self.opts["audit_every"])
                if every and self._ops % every == 0:
                    self.emit_audit()
                continue
            action, vcpu, a, b = queue[0]
            if action == _WRITE:
                if done >= max_writes:
                    return done
                queue.popleft()
                data, tag = b
                vm.write(vcpu, a, data)
                done += 1
                counts["writes"] += 1
                counts[f"{tag}_writes"] += 1
                continue
            queue.popleft()
            if action == _TOUCH:
                if mmu is not None:
                    mmu.translate(a, write=b, vcpu=vcpu)
            elif action == _ROOT:
                counts["root_switches"] += 1
                if mmu is not None:
                    mmu.call("set_root", cr3=a, vcpu=vcpu)
            elif action == _TRACK:
                vm.track_add([a], owner=f"workload:{self.kind}")
            elif action == _UNTRACK:
                vm.track_remove([a], owner=f"workload:{self.kind}")
            elif mmu is None:
                continue
            elif action == _UNPROTECT:
                mmu.unprotect(a, vcpu=vcpu)
                counts["unprotects"] += 1
            elif action == _AUDIT:
                report = mmu.audit()
                counts["audits"] += 1
                counts["audit_mismatches"] += len(report.mismatches)

    def report(self) -> dict[str, int | float | str]:
        """Writes by kind and path, guest activity, shadow-MMU figures, cycles."""
        out: dict[str, int | float | str] = dict(self.counts)
        out["processes"] = len(self.processes)
        vm = self._vm
        if vm is None:
            return out
        p0, c0 = self._base_stats
        pieces = [a - b for a, b in zip(vm.stats.pieces, p0, strict=True)]
        cycles = [a - b for a, b in zip(vm.stats.cycles, c0, strict=True)]
        out["mmio_exits"], out["fast_writes"], out["emulations"] = pieces
        write_cycles = sum(cycles)
        out["write_cycles"] = write_cycles
        fault_cycles = 0
        if self.mmu is not None and self.mmu.status().get("attached"):
            now = self.mmu.status()
            for key in (
                "faults", "hits", "emulated_faults", "guest_faults", "shadow_pages_created",
                "zapped", "flooded", "misaligned", "unprotected", "evicted", "sptes_zapped",
            ):
                out[f"shadow_{key}"] = int(now[key]) - int(self._base_mmu.get(key, 0))
            out["shadow_pages"] = now["shadow_pages"]
            # A shadow fault that ends in emulation is already charged as the emulated
            # write; the others are exits of their own (in-kernel, like an emulation).
            exits = int(out["shadow_faults"]) - int(out["shadow_emulated_faults"])
            fault_cycles = exits * vm.cost.emulate_cycles
        out["fault_cycles"] = fault_cycles
        out["cycles"] = write_cycles + fault_cycles
        out["cpu_seconds"] = (write_cycles + fault_cycles) / vm.cost.host_hz
        out["tracking"] = "shadow_mmu" if self.mmu is not None else "none"
        return out
