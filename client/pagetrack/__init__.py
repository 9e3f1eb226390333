"""pagetrack: the client for pagetrackd, Linux KVM's x86 page-track as a gRPC service.

``AsyncClient`` (asyncio) and ``Client`` (blocking) return the dataclasses below and raise
the errors below; ``ShardedAsyncClient`` and ``ShardedClient`` do the same over several
daemons, placing each VM by its name; ``pagetrack.v1`` holds the generated gRPC code.

Each name is imported on first use, so that ``import pagetrack`` (and the ``pagetrack``
command's --help) does not load grpc and numpy until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagetrack.client import AsyncClient, Backoff, Client, SyncWatchStream, WatchStream
    from pagetrack.errors import (
        AlreadyExists,
        FailedPrecondition,
        FieldViolation,
        Internal,
        InvalidArgument,
        NotFound,
        OutOfRange,
        PageTrackError,
        PermissionDenied,
        QuotaViolation,
        ResourceExhausted,
        ResourceInfo,
        Unauthenticated,
        Unavailable,
        Unimplemented,
    )
    from pagetrack.placement import HashRing
    from pagetrack.sharded import Misplaced, ShardedAsyncClient, ShardedClient
    from pagetrack.types import (
        AuditMismatch,
        AuditReport,
        BatchWriteResult,
        Closed,
        CloseReason,
        CmpxchgResult,
        CostModel,
        CycleCounts,
        DirtyLog,
        DmaCounts,
        DmaPath,
        DmaPiece,
        DmaPolicy,
        DmaResult,
        Event,
        EventBatch,
        EventSource,
        Finding,
        Gap,
        GapReason,
        GfnRange,
        GfnTrackState,
        Lease,
        LeaseKind,
        LeaseRevoked,
        Memslot,
        MemslotChange,
        Notifier,
        NotifierKind,
        OwnerCount,
        OwnerKind,
        PluginKind,
        PluginStatus,
        Ppgtt,
        ProcessInfo,
        Progress,
        RegionChange,
        RegionRemoved,
        Registered,
        Semantics,
        ServerInfo,
        ServerLimits,
        ShadowRoot,
        SlowConsumerPolicy,
        SnapshotInfo,
        TenantQuotas,
        TrackingChange,
        Translation,
        VcpuStats,
        VgpuSubmission,
        Vm,
        VmLimits,
        VmOptions,
        VmStats,
        WatchMessage,
        WorkloadKind,
        WorkloadState,
        WorkloadStatus,
        WritePath,
        WritePathCounts,
        WritePiece,
        WriteResult,
    )

#: where the names below live, searched in this order on first use
_HOMES = (
    "pagetrack.types",
    "pagetrack.errors",
    "pagetrack.client",
    "pagetrack.sharded",
    "pagetrack.placement",
)


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("pagetrack")
    if name in __all__:
        for home in _HOMES:
            module = importlib.import_module(home)
            if hasattr(module, name):
                value = getattr(module, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module 'pagetrack' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AuditMismatch",
    "AuditReport",
    "Backoff",
    "BatchWriteResult",
    "CmpxchgResult",
    "Client",
    "CloseReason",
    "Closed",
    "CostModel",
    "CycleCounts",
    "DirtyLog",
    "DmaCounts",
    "DmaPath",
    "DmaPiece",
    "DmaPolicy",
    "DmaResult",
    "Event",
    "EventBatch",
    "EventSource",
    "FailedPrecondition",
    "FieldViolation",
    "Gap",
    "GapReason",
    "GfnRange",
    "GfnTrackState",
    "HashRing",
    "Internal",
    "InvalidArgument",
    "Lease",
    "LeaseKind",
    "LeaseRevoked",
    "Memslot",
    "MemslotChange",
    "Misplaced",
    "NotFound",
    "Notifier",
    "NotifierKind",
    "OutOfRange",
    "OwnerCount",
    "OwnerKind",
    "PageTrackError",
    "PermissionDenied",
    "PluginKind",
    "PluginStatus",
    "Ppgtt",
    "ProcessInfo",
    "Progress",
    "QuotaViolation",
    "RegionChange",
    "RegionRemoved",
    "Finding",
    "Registered",
    "ResourceExhausted",
    "ResourceInfo",
    "Semantics",
    "ServerInfo",
    "ServerLimits",
    "ShadowRoot",
    "ShardedAsyncClient",
    "ShardedClient",
    "SlowConsumerPolicy",
    "SnapshotInfo",
    "SyncWatchStream",
    "TenantQuotas",
    "TrackingChange",
    "Translation",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "VcpuStats",
    "VgpuSubmission",
    "Vm",
    "VmLimits",
    "VmOptions",
    "VmStats",
    "WatchMessage",
    "WatchStream",
    "WorkloadKind",
    "WorkloadState",
    "WorkloadStatus",
    "WritePath",
    "WritePathCounts",
    "WritePiece",
    "WriteResult",
]
