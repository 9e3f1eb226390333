"""The guest kernel model: RAM frames, the kernel's page tables and its direct map.

Page tables are made and changed by guest writes (``vm.write``), so a write-tracked
table traps and reaches the shadow MMU exactly as in KVM. See :mod:`.guest_os` for how
workloads drive it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pagetrackd.domain import (
    PAGE_SHIFT,
    PAGE_SIZE,
    ResourceExhausted,
    Vm,
)
from pagetrackd.plugins.x86_paging import (
    ENTRY_BYTES,
    ROOT_LEVEL,
    index,
    level_shift,
    make_leaf_entry,
    make_table_entry,
    pages_per,
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


