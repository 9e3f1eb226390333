"""The vGPU's data: PPGTT layout, shadow page tables (spts), the GVT page-track
entries, PPGTT mms, counters, and the argument checks of its operations
(``drivers/gpu/drm/i915/gvt/gtt.h`` and ``page_track.h``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagetrackd.domain import PAGE_SHIFT, PAGE_SIZE, InvalidArgument, Source

OWNER = "plugin:vgpu"
LEVELS = 4
ENTRIES = 512
ENTRY_SIZE = 8
PTE_PRESENT = 1 << 0  #: GEN8_PAGE_PRESENT
PTE_RW = 1 << 1  #: GEN8_PAGE_RW
ADDR_MASK = ((1 << 46) - 1) & ~(PAGE_SIZE - 1)  #: GENMASK_ULL(45, 12), gen8 ADDR_4K_MASK
FLAGS_MASK = ~ADDR_MASK & ((1 << 64) - 1)
VA_BITS = 48
#: first simulated host frame; spts, scratch pages and DMA-mapped pages are numbered from here
FIRST_FRAME = 0x100000
#: when a partial (4-byte) write is resolved: only at flush (gtt.c), or once both halves
#: are seen; the first is the default
PARTIAL_MODES = ("flush", "halves")
#: what shadowing a child table outside every memslot does: fail (gtt.c), or map scratch
MISSING_TABLE_MODES = ("fail", "scratch")


class ShadowFailed(Exception):
    """Shadowing a guest entry failed: a child table's gfn is in no memslot (gtt.c
    returns an error up the call chain; the caller keeps or frees what it had)."""


class ShadowNoMemory(ShadowFailed):
    """Shadowing a guest entry failed for want of memory: the tenant's
    plugin_state_bytes quota is reached (gtt.c's -ENOMEM from ``alloc_spt`` or a DMA
    map, handled as any other failure). ``args``: (gfn, the QuotaExceeded)."""
DMA = Source.DMA  # an Enum member as a module constant: the class lookup costs ~70 ns


def level_shift(level: int) -> int:
    """Bit position of the va bits that index a level-``level`` table."""
    return PAGE_SHIFT + 9 * (level - 1)


def va_index(va: int, level: int) -> int:
    """Index of the entry for ``va`` in a level-``level`` table."""
    return (va >> level_shift(level)) & (ENTRIES - 1)


@dataclass(slots=True, eq=False)
class Spt:
    """A shadow page table (``struct intel_vgpu_ppgtt_spt``) for one guest table page."""

    gfn: int  #: the guest table page
    level: int  #: 4 = PML4 ... 1 = PT
    mfn: int  #: its simulated host frame
    entries: list[int]  #: shadow entries
    refcount: int = 1  #: entries (and PPGTT roots) pointing at it
    #: post-shadow bitmap: pending index -> halves written (bit 0 low dword, bit 1 high)
    post: dict[int, int] = field(default_factory=dict)
    live: bool = True


@dataclass(slots=True, eq=False)
class PageTrack:
    """``struct intel_vgpu_page_track`` (``gvt/page_track.c``): gfn -> handler."""

    handler: Callable[[Spt, int, int], None]
    priv: Spt
    tracked: bool = False


@dataclass(slots=True, eq=False)
class Mm:
    """A shadowed PPGTT (``struct intel_vgpu_mm``, L4 root): its guest root and spt."""

    ppgtt: int
    root_gfn: int
    root: Spt | None  #: None when the root gfn held another level's table (a conflict)
    refs: int = 1


@dataclass(slots=True)
class VgpuStats:
    """Counters since attach."""

    writes: int = 0  #: track_write calls for gfns in the protect table
    foreign_writes: int = 0  #: events for gfns this vGPU does not protect (R4.6)
    full_writes: int = 0  #: 8-byte writes, re-shadowed at once (R8.6)
    partial_writes: int = 0  #: 4-byte writes (R8.7)
    completed_partials: int = 0  #: entries re-shadowed because both halves were written
    ignored_writes: int = 0  #: writes of other sizes, dropped (R8.5)
    misaligned_writes: int = 0  #: 4/8-byte writes not aligned to their size (handled as GVT does)
    dma_events: int = 0  #: DMA events followed (dma_policy=notify)
    flushed_entries: int = 0  #: pending entries re-shadowed by flush (intel_vgpu_flush_post_shadow)
    violations: int = 0  #: entries naming gfns outside every memslot (R8.9)
    type_conflicts: int = 0  #: entries naming a table already shadowed at another level
    handler_errors: int = 0  #: -ENXIO and failed tracking calls, logged and swallowed (R8.4)
    submissions: int = 0
    scratch_batches: int = 0  #: submissions whose batch va translated to the scratch page
    spts_created: int = 0
    spts_freed: int = 0
    regions_removed: int = 0
    quota_refusals: int = 0  #: tables or mappings not shadowed: plugin_state_bytes reached


def only_args(op: str, args: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(args) - allowed
    if unknown:
        raise InvalidArgument(
            f"vgpu {op}: unknown arguments {sorted(unknown)}; allowed: {sorted(allowed)}"
        )


def int_arg(args: dict[str, Any], key: str) -> int:
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{key} must be a non-negative integer, got {value!r}")
    return value


def va_arg(args: dict[str, Any], key: str) -> int:
    va = int_arg(args, key)
    if va >= 1 << VA_BITS:
        raise InvalidArgument(f"{key} {va:#x} is outside the {VA_BITS}-bit GPU address space")
    return va


def root_gfn_arg(args: dict[str, Any]) -> int:
    gpa = int_arg(args, "root_gpa")
    if gpa & (PAGE_SIZE - 1):
        raise InvalidArgument(f"root_gpa {gpa:#x} must be page aligned (a PML4 page)")
    return gpa >> PAGE_SHIFT


__all__ = [
    "ADDR_MASK",
    "DMA",
    "ENTRIES",
    "ENTRY_SIZE",
    "FIRST_FRAME",
    "FLAGS_MASK",
    "LEVELS",
    "MISSING_TABLE_MODES",
    "OWNER",
    "PARTIAL_MODES",
    "PTE_PRESENT",
    "PTE_RW",
    "VA_BITS",
    "Mm",
    "PageTrack",
    "ShadowFailed",
    "ShadowNoMemory",
    "Spt",
    "VgpuStats",
    "int_arg",
    "level_shift",
    "only_args",
    "root_gfn_arg",
    "va_arg",
    "va_index",
]
