"""A guest process's address space: x86-64 page tables built, changed and torn down
with guest writes through the guest kernel (:mod:`.guest_kernel`)."""

from __future__ import annotations

from dataclasses import dataclass

from pagetrackd.domain import (
    PAGE_SHIFT,
    InvalidArgument,
)
from pagetrackd.plugins.x86_paging import (
    ENTRY_BYTES,
    PTE_RW,
    ROOT_LEVEL,
    index,
    is_leaf,
    level_shift,
    make_leaf_entry,
    make_table_entry,
    table_gfn,
)
from pagetrackd.workloads.guest_kernel import KERNEL_PGD_BOUNDARY, GuestOs, Leaf


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



@dataclass(slots=True)
class Process:
    """A guest process: its address space and what it has done."""

    pid: int
    mm: AddressSpace
    writes_left: int = 0

