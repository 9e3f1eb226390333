"""Ids, constants, enums and value objects of the page-track core."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NewType

from pagetrackd.domain.errors import InvalidArgument
from pagetrackd.limits import (
    DEFAULT_GFN_BITS,
    DEFAULT_MEMSLOTS,
    MAX_GFN_BITS,
    MAX_MEMSLOTS,
    MAX_WRITE_BYTES,
    MIN_GFN_BITS,
)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1

TenantId = NewType("TenantId", str)
Gfn = NewType("Gfn", int)

#: The vCPU id carried by events that no vCPU made (DMA).
NO_VCPU = 0xFFFF_FFFF

#: The owner of tracking references added by a tenant directly (no lease, no plugin).
TENANT_OWNER = "tenant"


class SlotFlags(enum.IntFlag):
    """Memslot flags, with KVM's bit values (``include/uapi/linux/kvm.h``)."""

    NONE = 0
    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1


class SlotChange(enum.Enum):
    """What a ``set_memslot`` call did, as KVM's ``enum kvm_mr_change``."""

    CREATE = "create"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"
    DELETE = "delete"
    NONE = "none"  #: same base and flags: nothing to do (KVM returns 0)


class WritePath(enum.IntEnum):
    """How one page-sized piece of a guest write was handled."""

    MMIO_EXIT = 0  #: no memslot, or a READONLY one: exit to user space, not applied
    FAST = 1  #: untracked RAM: applied natively (dirty-logged)
    EMULATED = 2  #: write-tracked: trapped, applied, then every notifier is told


class Source(enum.IntEnum):
    """Who made a write."""

    GUEST = 0  #: a vCPU
    DMA = 1  #: a device model writing guest memory


class DmaPolicy(enum.Enum):
    """What a DMA write into a write-tracked gfn does (per VM)."""

    BYPASS = "bypass"  #: applied, nobody is told (KVM's behaviour)
    NOTIFY = "notify"  #: applied, then notified like a guest write with source DMA
    REJECT = "reject"  #: refused, nothing written (GVT-g: "DMA to PPGTT is not supported")


class Semantics(enum.Enum):
    """Which kernel's memslot-vs-tracking rules a VM follows."""

    V2016 = "2016"  #: MOVE keeps counters and notifies; the seed series' behaviour
    LINUX_6_6 = "linux-6.6"  #: MOVE refused with external notifiers, else counters zeroed


@dataclass(frozen=True, slots=True)
class VmLimits:
    """Per-VM limits, checked on every request.

    ``max_slots`` defaults to KVM's ``KVM_USER_MEM_SLOTS`` on x86 (509 in the
    2016 era); ``gfn_bits`` to 40, i.e. a 52-bit guest physical address space
    (x86-64 MAXPHYADDR).
    """

    max_slots: int = DEFAULT_MEMSLOTS
    gfn_bits: int = DEFAULT_GFN_BITS
    max_write_bytes: int = MAX_WRITE_BYTES

    def __post_init__(self) -> None:
        # The ranges CreateVm allows; a restored or replayed VM is held to them too.
        for name, lo, hi in (
            ("max_slots", 1, MAX_MEMSLOTS), ("gfn_bits", MIN_GFN_BITS, MAX_GFN_BITS),
            ("max_write_bytes", 1, MAX_WRITE_BYTES),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise InvalidArgument(f"limits.{name} {value!r} must be {lo}..{hi}")

    @property
    def gfn_limit(self) -> int:
        """One past the largest valid gfn."""
        return 1 << self.gfn_bits


@dataclass(frozen=True, slots=True)
class Memslot:
    """A memslot: ``npages`` guest frames from ``base_gfn``, with flags."""

    slot_id: int
    base_gfn: int
    npages: int
    flags: SlotFlags = SlotFlags.NONE

    @property
    def end_gfn(self) -> int:
        """One past the last gfn of the slot."""
        return self.base_gfn + self.npages

    def contains(self, gfn: int) -> bool:
        """Whether ``gfn`` lies in this slot."""
        return self.base_gfn <= gfn < self.base_gfn + self.npages


@dataclass(frozen=True, slots=True)
class RegionChange:
    """Which memslot change is removing a region, for notifiers that want to say so."""

    slot_id: int
    change: SlotChange  #: DELETE or MOVE
    new_base_gfn: int = 0  #: MOVE only: where the slot went


@dataclass(frozen=True, slots=True)
class WritePiece:
    """The outcome of one page-sized piece of a write."""

    gpa: int
    length: int
    path: WritePath
    seq: int | None = None  #: the event's seq when the piece was emulated (or DMA-notified)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of one guest write, piece by piece in address order."""

    pieces: tuple[WritePiece, ...]

    @property
    def applied(self) -> bool:
        """Whether every piece reached guest memory."""
        return all(p.path is not WritePath.MMIO_EXIT for p in self.pieces)


@dataclass(frozen=True, slots=True)
class CmpxchgResult:
    """The outcome of an emulated guest LOCK CMPXCHG (:meth:`Vm.cmpxchg`)."""

    #: whether memory now holds the desired bytes (always, when done as a write)
    exchanged: bool
    #: what memory held before: the expected bytes when exchanged, else the value the
    #: guest gets back in RAX; empty when the exchange was done as a plain write
    current: bytes
    #: KVM emulated the exchange as a plain write (size, page-crossing or non-RAM target)
    as_write: bool
    write: WriteResult


@dataclass(frozen=True, slots=True)
class TrackInfo:
    """Everything the track pool knows of one gfn."""

    gfn: int
    count: int  #: the track counter
    owners: dict[str, int] = field(default_factory=dict)  #: owner -> references held
    write_protected: bool = False
    lpage_disallowed_2m: bool = False
    lpage_disallowed_1g: bool = False

    @property
    def tracked(self) -> bool:
        """KVM's ``kvm_gfn_is_write_tracked``: counter != 0."""
        return self.count > 0
