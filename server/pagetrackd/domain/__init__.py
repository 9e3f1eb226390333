"""The pure page-track core: no gRPC, no protobuf, no asyncio.

Everything the daemon does to a simulated VM goes through :class:`Registry` and
:class:`Vm`. Words used throughout, as in KVM:

* **gfn** -- guest frame number, ``gpa >> 12``.
* **memslot** -- a range of guest frames backed by memory (``KVM_SET_USER_MEMORY_REGION``).
* **track counter** -- per gfn, a ``uint16``; the gfn is write-tracked while it is > 0.
* **seq** -- per VM, gap-free, increasing number given to every notified write.
"""

from pagetrackd.domain.cost import CostModel
from pagetrackd.domain.errors import (
    AlreadyExists,
    Compacted,
    CounterOverflow,
    DmaRejected,
    FailedPrecondition,
    GfnNotInSlot,
    InvalidArgument,
    LeaseNotFound,
    MoveRefused,
    NotFound,
    NotifierNotFound,
    NotTracked,
    OutOfRange,
    PageTrackError,
    PermissionDenied,
    PluginAlreadyAttached,
    PluginNotFound,
    QuotaExceeded,
    ResourceExhausted,
    SlotNotFound,
    SlotOverlap,
    Unauthenticated,
    Unavailable,
    VmAlreadyExists,
    VmNotFound,
    WorkloadNotFound,
)
from pagetrackd.domain.events import EventBatch, WriteEvent
from pagetrackd.domain.notifiers import Notifier
from pagetrackd.domain.registry import Registry
from pagetrackd.domain.types import (
    PAGE_SHIFT,
    PAGE_SIZE,
    CmpxchgResult,
    DmaPolicy,
    Gfn,
    Memslot,
    Semantics,
    SlotChange,
    SlotFlags,
    Source,
    TenantId,
    TrackInfo,
    VmLimits,
    WritePath,
    WritePiece,
    WriteResult,
)
from pagetrackd.domain.vm import Vm, VmStats

__all__ = [
    "AlreadyExists",
    "CmpxchgResult",
    "Compacted",
    "CostModel",
    "CounterOverflow",
    "DmaPolicy",
    "DmaRejected",
    "EventBatch",
    "FailedPrecondition",
    "Gfn",
    "GfnNotInSlot",
    "InvalidArgument",
    "LeaseNotFound",
    "Memslot",
    "MoveRefused",
    "NotFound",
    "NotTracked",
    "Notifier",
    "NotifierNotFound",
    "OutOfRange",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PageTrackError",
    "PermissionDenied",
    "PluginAlreadyAttached",
    "PluginNotFound",
    "QuotaExceeded",
    "Registry",
    "ResourceExhausted",
    "Semantics",
    "SlotChange",
    "SlotFlags",
    "SlotNotFound",
    "SlotOverlap",
    "Source",
    "TenantId",
    "TrackInfo",
    "Unauthenticated",
    "Unavailable",
    "Vm",
    "VmAlreadyExists",
    "VmLimits",
    "VmNotFound",
    "VmStats",
    "WorkloadNotFound",
    "WriteEvent",
    "WritePath",
    "WritePiece",
    "WriteResult",
]
