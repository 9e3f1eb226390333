"""The client's constants and string enums.

Enum members are strings (``DmaPolicy.NOTIFY == "notify"``), so methods accept either.
Nothing here needs numpy or grpc: the ``pagetrack`` command loads this module at start-up,
before it knows whether it will talk to a daemon. ``pagetrack.types`` re-exports it all.
"""

from __future__ import annotations

import enum

#: the daemon's address when none is given (``make run`` and ``pagetrackd`` listen here)
DEFAULT_TARGET = "127.0.0.1:50051"
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: ``Event.vcpu`` / ``EventBatch.vcpu`` value of a DMA event.
DMA_VCPU = 0xFFFFFFFF


# --------------------------------------------------------------------------- enums


class DmaPolicy(enum.StrEnum):
    """What a DMA write to a write-tracked gfn does."""

    BYPASS = "bypass"
    NOTIFY = "notify"
    REJECT = "reject"


class Semantics(enum.StrEnum):
    """Which kernel's memslot-vs-tracking rules a VM follows."""

    V2016 = "2016"
    LINUX_6_6 = "linux-6.6"


class WritePath(enum.StrEnum):
    """How one page-sized piece of a guest write was handled."""

    UNSPECIFIED = "unspecified"
    MMIO_EXIT = "mmio_exit"
    FAST = "fast"
    EMULATED = "emulated"


class DmaPath(enum.StrEnum):
    """How one page-sized piece of a DMA write was handled."""

    UNSPECIFIED = "unspecified"
    UNMAPPED = "unmapped"
    APPLIED = "applied"
    BYPASSED = "bypassed"
    NOTIFIED = "notified"


class EventSource(enum.StrEnum):
    """Where an event's write came from."""

    GUEST = "guest"
    DMA = "dma"


class SlowConsumerPolicy(enum.StrEnum):
    """What a Watch stream does when its queue is full."""

    DROP = "drop"
    COALESCE = "coalesce"
    DISCONNECT = "disconnect"
    BLOCK = "block"


class PluginKind(enum.StrEnum):
    """In-process plugin kinds."""

    SHADOW_MMU = "shadow-mmu"
    VGPU = "vgpu"


class WorkloadKind(enum.StrEnum):
    """Simulated write streams."""

    UNSPECIFIED = "unspecified"
    GPU_PPGTT = "gpu-ppgtt"
    GUEST_PAGETABLES = "guest-pagetables"
    RANDOM_WRITES = "random-writes"
    KERNEL_BUILD = "kernel-build"


class WorkloadState(enum.StrEnum):
    """Lifecycle state of a workload."""

    UNSPECIFIED = "unspecified"
    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


class MemslotChange(enum.StrEnum):
    """What a SetMemoryRegion call did (``none``: nothing changed)."""

    NONE = "none"
    CREATE = "create"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"
    DELETE = "delete"


class GapReason(enum.StrEnum):
    """Why a Watch stream did not get a range of events."""

    UNSPECIFIED = "unspecified"
    QUEUE_OVERFLOW = "queue_overflow"
    BLOCK_TIMEOUT = "block_timeout"
    COMPACTED = "compacted"
    COALESCED = "coalesced"
    #: the daemon crashed; these seqs were reserved by its previous run
    RESTART = "restart"


class CloseReason(enum.StrEnum):
    """Why a Watch stream ended normally."""

    UNSPECIFIED = "unspecified"
    UNWATCHED = "unwatched"
    VM_DELETED = "vm_deleted"


class OwnerKind(enum.StrEnum):
    """Kind of holder of a tracking reference."""

    UNSPECIFIED = "unspecified"
    TENANT = "tenant"
    LEASE = "lease"
    PLUGIN = "plugin"


class LeaseKind(enum.StrEnum):
    """Kind of lease."""

    UNSPECIFIED = "unspecified"
    TTL = "ttl"
    STREAM = "stream"


class NotifierKind(enum.StrEnum):
    """Kind of registered notifier."""

    UNSPECIFIED = "unspecified"
    PLUGIN = "plugin"
    WATCH = "watch"


__all__ = [
    "CloseReason",
    "DEFAULT_TARGET",
    "DMA_VCPU",
    "DmaPath",
    "DmaPolicy",
    "EventSource",
    "GapReason",
    "LeaseKind",
    "MemslotChange",
    "NotifierKind",
    "OwnerKind",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PluginKind",
    "Semantics",
    "SlowConsumerPolicy",
    "WorkloadKind",
    "WorkloadState",
    "WritePath",
]
