"""x86-64 4-level paging as the guest sees it: entry bits, indexes and the guest walker.

Shared by the shadow MMU plugin (which walks guest tables the way KVM's
``FNAME(walk_addr_generic)`` in ``arch/x86/kvm/mmu/paging_tmpl.h`` does) and by the
guest OS model in the workloads (which builds tables with guest writes).

Levels are numbered as in KVM: 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT. An entry at level
``L`` maps ``1 << level_shift(L)`` bytes: 512 GiB, 1 GiB, 2 MiB or 4 KiB. Guest large
pages are PS entries at level 3 (1 GiB) and level 2 (2 MiB); PS at level 4 is reserved.

Not modelled: accessed/dirty bit updates by the walker (KVM writes them back with a
cmpxchg that is a host write and never notifies), PAT/PKU/SMEP/SMAP, 5-level paging.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagetrackd.domain import PAGE_SHIFT, FailedPrecondition, InvalidArgument, Vm

PTE_P = 1 << 0  #: present
PTE_RW = 1 << 1  #: writable
PTE_US = 1 << 2  #: user accessible
PTE_A = 1 << 5  #: accessed
PTE_D = 1 << 6  #: dirty (leaf)
PTE_PS = 1 << 7  #: page size: a 2 MiB (level 2) or 1 GiB (level 3) leaf
PTE_NX = 1 << 63  #: no execute
#: physical address bits 12..51
ADDR_MASK = 0x000F_FFFF_FFFF_F000

#: KVM's ACC_* access bits (``arch/x86/kvm/mmu/mmu_internal.h`` / spte.h)
ACC_EXEC = 1
ACC_WRITE = 2
ACC_USER = 4
ACC_ALL = ACC_EXEC | ACC_WRITE | ACC_USER

ENTRIES = 512
ENTRY_BYTES = 8
ROOT_LEVEL = 4

_CANON_LOW_END = 1 << 47
_CANON_HIGH_START = 0xFFFF_8000_0000_0000
GVA_LIMIT = 1 << 64


def level_shift(level: int) -> int:
    """log2 of the bytes one entry at ``level`` maps: 12, 21, 30 or 39."""
    return PAGE_SHIFT + 9 * (level - 1)


def pages_per(level: int) -> int:
    """4 KiB frames one entry at ``level`` maps: 1, 512 or 262144 (and 2**27)."""
    return 1 << (9 * (level - 1))


def index(gva: int, level: int) -> int:
    """Index of the entry for ``gva`` in its table at ``level``."""
    return (gva >> level_shift(level)) & (ENTRIES - 1)


def is_canonical(gva: int) -> bool:
    """Whether ``gva`` is a canonical 48-bit address."""
    return 0 <= gva < _CANON_LOW_END or _CANON_HIGH_START <= gva < GVA_LIMIT


def canonical(gva: int) -> int:
    """Sign-extend bit 47 of a 48-bit address."""
    gva &= (1 << 48) - 1
    if gva & (1 << 47):
        gva |= _CANON_HIGH_START
    return gva


def check_gva(gva: object) -> int:
    """``gva`` as an int, or InvalidArgument naming what is wrong with it."""
    if isinstance(gva, bool) or not isinstance(gva, int):
        raise InvalidArgument(f"gva must be an integer, got {gva!r}")
    if not is_canonical(gva):
        raise InvalidArgument(
            f"gva {gva:#x} is not canonical: bits 48..63 must copy bit 47"
        )
    return gva


def gpte_access(gpte: int) -> int:
    """The ACC_* bits one guest entry grants (``FNAME(gpte_access)``)."""
    acc = 0
    if gpte & PTE_RW:
        acc |= ACC_WRITE
    if gpte & PTE_US:
        acc |= ACC_USER
    if not gpte & PTE_NX:
        acc |= ACC_EXEC
    return acc


def is_leaf(gpte: int, level: int) -> bool:
    """Whether a present guest entry at ``level`` maps a page (rather than a table)."""
    return level == 1 or (level in (2, 3) and bool(gpte & PTE_PS))


def leaf_base_gfn(gpte: int, level: int) -> int:
    """First gfn mapped by a leaf entry at ``level`` (bit 12 of a large entry is PAT)."""
    mask = ADDR_MASK & ~((1 << level_shift(level)) - 1)
    return (gpte & mask) >> PAGE_SHIFT


def table_gfn(gpte: int) -> int:
    """Gfn of the table a non-leaf entry points at."""
    return (gpte & ADDR_MASK) >> PAGE_SHIFT


def make_table_entry(gfn: int, *, writable: bool = True, user: bool = True) -> int:
    """A present non-leaf entry pointing at the table in ``gfn``."""
    return (gfn << PAGE_SHIFT) | PTE_P | (PTE_RW if writable else 0) | (PTE_US if user else 0)


def make_leaf_entry(
    gfn: int, level: int = 1, *, writable: bool = True, user: bool = True, nx: bool = False
) -> int:
    """A present leaf entry mapping ``gfn`` (aligned for a large page) at ``level``."""
    if gfn & (pages_per(level) - 1):
        raise InvalidArgument(
            f"gfn {gfn:#x} is not aligned for a level-{level} page ({pages_per(level)} frames)"
        )
    value = (gfn << PAGE_SHIFT) | PTE_P | PTE_A | PTE_D
    if writable:
        value |= PTE_RW
    if user:
        value |= PTE_US
    if nx:
        value |= PTE_NX
    if level > 1:
        value |= PTE_PS
    return value


def read_gpte(vm: Vm, gpa: int) -> int | None:
    """The 8-byte entry at ``gpa`` in guest memory, or None if it is not RAM."""
    try:
        return int.from_bytes(vm.read(gpa, ENTRY_BYTES), "little")
    except FailedPrecondition:
        return None


@dataclass(frozen=True, slots=True)
class GuestWalk:
    """The outcome of walking the guest's tables for one gva (``struct guest_walker``).

    ``table_gfns[i]`` and ``gptes[i]`` are the table read and the entry found at level
    ``4 - i``; the walk stops at the leaf (``level``) or at the level that faulted.
    """

    ok: bool
    level: int  #: level of the leaf entry, or of the failing entry
    gfn: int  #: the 4 KiB frame ``gva`` maps to (valid when ok)
    access: int  #: ACC_* granted by every level down to the leaf
    table_gfns: tuple[int, ...]
    gptes: tuple[int, ...]
    fault: str = ""

    @property
    def gpa_base(self) -> int:
        """First gpa of the 4 KiB frame."""
        return self.gfn << PAGE_SHIFT

    def access_at(self, level: int) -> int:
        """ACC_* granted by the entries at levels ``4 .. level`` (KVM's pt_access)."""
        acc = ACC_ALL
        for i in range(ROOT_LEVEL - level + 1):
            acc &= gpte_access(self.gptes[i])
        return acc


def walk_guest(
    vm: Vm, cr3_gfn: int, gva: int, *, write: bool = False, user: bool = False
) -> GuestWalk:
    """Walk the guest's 4-level tables from ``cr3_gfn`` for ``gva``, reading guest
    memory afresh, and check the access. Never raises for guest data: a bad walk is
    a GuestWalk with ``ok=False`` and a ``fault`` saying why (the #PF KVM injects)."""
    tables: list[int] = []
    gptes: list[int] = []
    table = cr3_gfn
    access = ACC_ALL
    level = ROOT_LEVEL
    while True:
        tables.append(table)
        gpte = read_gpte(vm, (table << PAGE_SHIFT) + index(gva, level) * ENTRY_BYTES)
        if gpte is None:
            return GuestWalk(
                False, level, 0, access, tuple(tables), tuple(gptes),
                f"table gfn {table:#x} at level {level} is not in any memslot",
            )
        gptes.append(gpte)
        if not gpte & PTE_P:
            return GuestWalk(
                False, level, 0, access, tuple(tables), tuple(gptes),
                f"not present at level {level}",
            )
        if level == ROOT_LEVEL and gpte & PTE_PS:
            return GuestWalk(
                False, level, 0, access, tuple(tables), tuple(gptes),
                f"reserved bit (PS) set at level {level}",
            )
        access &= gpte_access(gpte)
        if is_leaf(gpte, level):
            break
        table = table_gfn(gpte)
        level -= 1
    offset = (gva >> PAGE_SHIFT) & (pages_per(level) - 1)
    gfn = leaf_base_gfn(gpte, level) + offset
    if write and not access & ACC_WRITE:
        return GuestWalk(
            False, level, gfn, access, tuple(tables), tuple(gptes),
            f"write to a read-only page (level {level})",
        )
    if user and not access & ACC_USER:
        return GuestWalk(
            False, level, gfn, access, tuple(tables), tuple(gptes),
            f"user access to a supervisor page (level {level})",
        )
    return GuestWalk(True, level, gfn, access, tuple(tables), tuple(gptes))
