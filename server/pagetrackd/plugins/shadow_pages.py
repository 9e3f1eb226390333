"""The shadow MMU's data: shadow pages, per-vCPU roots, SPTE encoding, and the
translation results the API reports (``struct kvm_mmu_page`` and friends,
``arch/x86/kvm/mmu/mmu.c``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagetrackd.domain import PAGE_SHIFT, InvalidArgument
from pagetrackd.plugins.x86_paging import (
    ACC_EXEC,
    ACC_USER,
    ENTRY_BYTES,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    canonical,
    level_shift,
)

NAME = "shadow_mmu"
#: the owner id of the plugin's references, as the API names it (OwnerCount.id)
OWNER = "plugin:shadow-mmu"
#: detect_write_flooding: zapped at the 3rd write without an intervening use
FLOOD_THRESHOLD = 3
#: KVM_MMU_NUM_PREV_ROOTS: roots a vCPU keeps for a fast CR3 switch
NUM_PREV_ROOTS = 3
#: KVM_MIN_FREE_MMU_PAGES and KVM_REFILL_PAGES (``make_mmu_pages_available``)
MIN_FREE_PAGES = 5
REFILL_PAGES = 25
#: default ``n_max_mmu_pages``; KVM derives it from guest memory (20 per mille)
DEFAULT_MAX_SHADOW_PAGES = 4096
#: KVM_MIN_ALLOC_MMU_PAGES
MIN_SHADOW_PAGES = 64
#: a software-available SPTE bit marking a gfn that is not RAM (KVM's MMIO SPTE)
SPTE_MMIO = 1 << 58

ZAP_REASONS = ("flooded", "misaligned", "unprotected", "region_removed", "evicted", "zap_all")


@dataclass(eq=False, slots=True)
class ShadowPage:
    """A shadow page (``struct kvm_mmu_page``): 512 SPTEs shadowing one guest table.

    ``gfn`` is the guest table's gfn, or for a *direct* page (part of a split guest
    large page) the first gfn it maps. ``access`` is the role's ACC_* bits granted by
    the levels above. Only present SPTEs are stored; a link to a child page is in
    both ``sptes`` and ``children``.
    """

    sp_id: int
    gfn: int
    level: int
    access: int
    direct: bool
    gva_base: int  #: gva bits above this page's span, from the walk that created it
    sptes: dict[int, int] = field(default_factory=dict)
    children: dict[int, ShadowPage] = field(default_factory=dict)
    #: (parent page, index) pairs whose SPTE links here (``parent_ptes``)
    parents: set[tuple[ShadowPage, int]] = field(default_factory=set)
    flood: int = 0  #: write_flooding_count
    root_count: int = 0
    accounted: bool = False  #: holds a track reference on ``gfn``
    valid: bool = True

    @property
    def key(self) -> tuple[int, int, int, bool]:
        """The lookup key: gfn and role (level, access, direct)."""
        return (self.gfn, self.level, self.access, self.direct)

    def gva_of(self, idx: int) -> int:
        """The first gva that entry ``idx`` translates (via the creating walk)."""
        return canonical(self.gva_base | (idx << level_shift(self.level)))


@dataclass(slots=True)
class VcpuMmu:
    """One vCPU's MMU context: its CR3, current root and cached previous roots."""

    cr3_gfn: int | None = None
    root: ShadowPage | None = None
    prev: list[ShadowPage] = field(default_factory=list)
    last_retry: tuple[int, int] | None = None  #: (rip, addr) of the last unprotect-retry


def link_spte(child: ShadowPage) -> int:
    """A non-leaf SPTE: full access (the leaf enforces the role's access), pointing at
    the child; ``gfn`` stands in for the child's host address so audits can read it."""
    return (child.gfn << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US


def leaf_spte(gfn: int, level: int, access: int, writable: bool, mmio: bool) -> int:
    spte = (gfn << PAGE_SHIFT) | PTE_P
    if writable:
        spte |= PTE_RW
    if access & ACC_USER:
        spte |= PTE_US
    if not access & ACC_EXEC:
        spte |= PTE_NX
    if level > 1:
        spte |= PTE_PS
    if mmio:
        spte |= SPTE_MMIO
    return spte


def detect_write_misaligned(gpa: int, nbytes: int, pte_size: int = ENTRY_BYTES) -> bool:
    """``detect_write_misaligned`` (mmu.c, R7.3): a single byte at a pte-aligned offset
    is fine (the clear_bit ``andb`` idiom); otherwise a write that crosses a pte
    boundary or is shorter than 4 bytes is misaligned."""
    offset = gpa & 0xFFF
    if not offset & (pte_size - 1) and nbytes == 1:
        return False
    return bool((offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)) or nbytes < 4


def parse_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise InvalidArgument(f"option {name!r} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"option {name!r} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidArgument(f"option {name!r} must be between {lo} and {hi}, got {value}")
    return value


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidArgument(f"option {name!r} must be true or false, got {value!r}")


def spte_gfn(spte: int) -> int:
    """The gfn an SPTE maps or (for a link) the gfn its child shadows."""
    return (spte & 0x000F_FFFF_FFFF_F000) >> PAGE_SHIFT


def translation(
    *,
    present: bool,
    gva: int = 0,
    spte: int = 0,
    spte_level: int = 1,
    guest_level: int = 1,
    fault: str = "",
    faulted: bool = True,
    emulated: bool = False,
    created: int = 0,
) -> dict[str, Any]:
    """A translation result, in TranslateShadowResponse's words."""
    if not present:
        return {
            "present": False,
            "gpa": 0,
            "page_bytes": 0,
            "shadow_page_bytes": 0,
            "writable": False,
            "fault": fault,
            "faulted": faulted,
            "emulated": False,
            "shadow_pages_created": created,
        }
    shift = level_shift(spte_level)
    gpa = (spte_gfn(spte) << PAGE_SHIFT) | (gva & ((1 << shift) - 1))
    return {
        "present": True,
        "gpa": gpa,
        "page_bytes": 1 << level_shift(guest_level),
        "shadow_page_bytes": 1 << shift,
        "writable": bool(spte & PTE_RW),
        "fault": "",
        "faulted": faulted,
        "emulated": emulated,
        "shadow_pages_created": created,
    }


__all__ = [
    "DEFAULT_MAX_SHADOW_PAGES",
    "FLOOD_THRESHOLD",
    "MIN_FREE_PAGES",
    "MIN_SHADOW_PAGES",
    "NAME",
    "NUM_PREV_ROOTS",
    "OWNER",
    "REFILL_PAGES",
    "SPTE_MMIO",
    "ShadowPage",
    "VcpuMmu",
    "ZAP_REASONS",
    "detect_write_misaligned",
    "leaf_spte",
    "link_spte",
    "parse_bool",
    "parse_int",
    "spte_gfn",
    "translation",
]
