"""Typed results of the pagetrack client: frozen dataclasses, and the string enums of
``pagetrack.constants`` (members are strings, ``DmaPolicy.NOTIFY == "notify"``, so methods
accept either).

Event batches keep their columns as numpy arrays; ``EventBatch.events()`` turns them into
``Event`` objects when convenient. numpy is imported where arrays are made, not here: the
enums and dataclasses load without it (the ``pagetrack`` command's start-up).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

from pagetrack.constants import (
    DEFAULT_TARGET,
    DMA_VCPU,
    PAGE_SHIFT,
    PAGE_SIZE,
    CloseReason,
    DmaPath,
    DmaPolicy,
    EventSource,
    GapReason,
    LeaseKind,
    MemslotChange,
    NotifierKind,
    OwnerKind,
    PluginKind,
    Semantics,
    SlowConsumerPolicy,
    WorkloadKind,
    WorkloadState,
    WritePath,
)

U64Array: TypeAlias = "npt.NDArray[np.uint64]"
U32Array: TypeAlias = "npt.NDArray[np.uint32]"


# --------------------------------------------------------------------------- small records


@dataclass(frozen=True, slots=True)
class GfnRange:
    """Consecutive gfns ``[start, start + count)``."""

    start: int
    count: int

    @property
    def last(self) -> int:
        """The last gfn in the range (inclusive)."""
        return self.start + self.count - 1


@dataclass(frozen=True, slots=True)
class WritePathCounts:
    """Write pieces by path."""

    mmio_exit: int = 0
    fast: int = 0
    emulated: int = 0


@dataclass(frozen=True, slots=True)
class CycleCounts:
    """Simulated CPU cycles by path."""

    mmio_exit: int = 0
    fast: int = 0
    emulated: int = 0
    dma: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True)
class DmaCounts:
    """DMA pieces by outcome (rejected: refused calls)."""

    applied: int = 0
    bypassed: int = 0
    notified: int = 0
    rejected: int = 0


# --------------------------------------------------------------------------- VMs


@dataclass(frozen=True, slots=True)
class CostModel:
    """Simulated cycles per page-sized piece on each path, and the host clock."""

    mmio_exit_cycles: int
    emulate_cycles: int
    fast_cycles: int
    dma_cycles: int
    host_hz: int


@dataclass(frozen=True, slots=True)
class VmLimits:
    """A VM's fixed limits (0 = not reported)."""

    max_memslots: int
    gfn_bits: int
    max_vcpus: int
    history_events: int
    history_bytes: int


@dataclass(frozen=True, slots=True)
class VmOptions:
    """A VM's effective policy and configuration."""

    dma_policy: DmaPolicy
    semantics: Semantics
    cost: CostModel
    limits: VmLimits


@dataclass(frozen=True, slots=True)
class Vm:
    """A VM as the daemon sees it."""

    name: str
    tenant: str
    options: VmOptions
    created_at_ns: int
    memslot_count: int
    tracked_gfns: int
    resident_pages: int
    head_seq: int
    oldest_seq: int
    notifier_count: int
    plugins: tuple[PluginKind, ...]
    running_workloads: int


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True, slots=True)
class Memslot:
    """One memslot (KVM_SET_USER_MEMORY_REGION)."""

    slot: int
    base_gfn: int
    npages: int
    readonly: bool
    log_dirty_pages: bool
    tracked_gfns: int
    dirty_pages: int

    @property
    def base_gpa(self) -> int:
        """First guest-physical address covered."""
        return self.base_gfn << PAGE_SHIFT

    @property
    def size_bytes(self) -> int:
        """Bytes covered."""
        return self.npages << PAGE_SHIFT


@dataclass(frozen=True, slots=True)
class RegionChange:
    """What a set_memory_region call did."""

    change: MemslotChange
    region: Memslot
    old_base_gfn: int
    at_seq: int


@dataclass(frozen=True, slots=True)
class DirtyLog:
    """One slot's dirty bitmap (KVM layout), read and cleared."""

    slot: int
    base_gfn: int
    npages: int
    bitmap: bytes
    dirty_count: int

    def dirty_gfns(self) -> U64Array:
        """The dirty gfns, ascending."""
        import numpy as np

        bits = np.unpackbits(np.frombuffer(self.bitmap, dtype=np.uint8), bitorder="little")
        idx = np.flatnonzero(bits[: self.npages]).astype(np.uint64)
        return idx + np.uint64(self.base_gfn)


@dataclass(frozen=True, slots=True)
class WritePiece:
    """One page-sized piece of a guest write; ``seq`` is set when it was emulated."""

    gpa: int
    length: int
    path: WritePath
    seq: int | None


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The pieces of one guest write and the cycles it cost."""

    pieces: tuple[WritePiece, ...]
    cycles: int

    @property
    def seqs(self) -> tuple[int, ...]:
        """Seqs of the events this write produced."""
        return tuple(p.seq for p in self.pieces if p.seq is not None)


@dataclass(frozen=True, slots=True)
class CmpxchgResult:
    """The outcome of a guest compare-exchange (``AsyncClient.cmpxchg``)."""

    #: memory now holds the desired bytes (always, when done as a write)
    exchanged: bool
    #: what memory held before: the expected bytes when exchanged, else the value the
    #: guest gets back; empty when done as a write
    current: bytes
    #: KVM emulated the exchange as a plain write (size, page-crossing or non-RAM target)
    as_write: bool
    pieces: tuple[WritePiece, ...]
    cycles: int

    @property
    def seqs(self) -> tuple[int, ...]:
        """Seqs of the events it produced (none unless it exchanged on a tracked page)."""
        return tuple(p.seq for p in self.pieces if p.seq is not None)


@dataclass(frozen=True, slots=True, eq=False)
class BatchWriteResult:
    """Counts from a write_batch call; the piece columns only with ``want_pieces``."""

    writes: int
    pieces: WritePathCounts
    first_seq: int | None
    last_seq: int | None
    cycles: int
    #: WritePath proto number (1 mmio_exit, 2 fast, 3 emulated) of each piece
    piece_path: npt.NDArray[np.uint8] | None = None
    #: index of the write each piece belongs to
    piece_write: U32Array | None = None


@dataclass(frozen=True, slots=True)
class DmaPiece:
    """One page-sized piece of a DMA write; ``seq`` is set when it was notified."""

    gpa: int
    length: int
    path: DmaPath
    seq: int | None


@dataclass(frozen=True, slots=True)
class DmaResult:
    """The pieces of one DMA write and the cycles it cost."""

    pieces: tuple[DmaPiece, ...]
    cycles: int


# --------------------------------------------------------------------------- tracking, leases


@dataclass(frozen=True, slots=True)
class TrackingChange:
    """Result of add_tracking / remove_tracking."""

    references: int
    transitions: int
    tracked_gfns: int


@dataclass(frozen=True, slots=True)
class OwnerCount:
    """One holder of references on a gfn."""

    kind: OwnerKind
    id: str
    count: int


@dataclass(frozen=True, slots=True)
class GfnTrackState:
    """Tracking state of one gfn."""

    gfn: int
    in_memslot: bool
    slot: int
    counter: int
    owners: tuple[OwnerCount, ...]
    write_protected: bool
    lpage_2m_disallowed: bool
    lpage_1g_disallowed: bool

    @property
    def tracked(self) -> bool:
        """Whether the gfn's write-track counter is above 0."""
        return self.counter > 0


@dataclass(frozen=True, slots=True)
class Lease:
    """A holder of tracking references that ends on its own."""

    id: str
    kind: LeaseKind
    ttl_ms: int
    expires_at_ns: int
    references: int
    label: str


@dataclass(frozen=True, slots=True)
class LeaseRevoked:
    """What revoking a lease released."""

    released_references: int
    untracked_gfns: int


# --------------------------------------------------------------------------- plugins


@dataclass(frozen=True, slots=True)
class PluginStatus:
    """A plugin's state on one VM."""

    kind: PluginKind | None  #: None for a third-party plugin (see ``name``)
    attached_at_ns: int
    tracked_gfns: int
    counters: Mapping[str, int] = field(default_factory=dict)
    info: Mapping[str, str] = field(default_factory=dict)
    #: the plugin's name ("shadow-mmu", "vgpu" or a third-party plugin's)
    name: str = ""
    #: hooks that raised (third-party plugins)
    failures: int = 0
    #: findings published
    findings: int = 0


@dataclass(frozen=True, slots=True)
class AuditMismatch:
    """A shadow entry that disagrees with a fresh walk of guest memory."""

    table: str
    table_gfn: int
    level: int
    index: int
    guest_entry: int
    expected: int
    actual: int
    reason: str


@dataclass(frozen=True, slots=True)
class AuditReport:
    """Result of audit_plugin."""

    checked_entries: int
    mismatch_count: int
    mismatches: tuple[AuditMismatch, ...]


@dataclass(frozen=True, slots=True)
class ShadowRoot:
    """Result of set_shadow_root."""

    root_gfn: int
    shadow_pages: int


@dataclass(frozen=True, slots=True)
class Translation:
    """Result of translate: a walk through the shadow page tables."""

    present: bool
    gpa: int
    page_bytes: int
    writable: bool
    fault: str
    shadow_pages_created: int


@dataclass(frozen=True, slots=True)
class Ppgtt:
    """A shadowed PPGTT (build_ppgtt)."""

    ppgtt_id: int
    shadow_tables: int
    scratch_entries: int
    violations: int


@dataclass(frozen=True, slots=True)
class VgpuSubmission:
    """Result of submit_vgpu: where each GPU address landed."""

    flushed_entries: int
    gpa: tuple[int, ...]
    scratch: tuple[bool, ...]


# --------------------------------------------------------------------------- workloads, stats


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """A workload, its settings and its progress."""

    id: str
    vm: str
    kind: WorkloadKind
    state: WorkloadState
    error: str
    started_at_ns: int
    elapsed_ms: int
    writes: int
    achieved_rate: float
    writes_by_path: WritePathCounts
    cycles: CycleCounts
    rate: float
    count: int
    duration_ms: int
    seed: int
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VcpuStats:
    """One vCPU's counters."""

    vcpu: int
    writes: WritePathCounts
    cycles: CycleCounts


@dataclass(frozen=True, slots=True)
class VmStats:
    """A VM's counters since creation."""

    vm: str
    guest_writes: int
    writes: WritePathCounts
    bytes_written: int
    mmio_exits: int
    emulations: int
    dma: DmaCounts
    notifications: int
    notifier_errors: int
    events_dropped: int
    events_coalesced: int
    tracked_gfns: int
    write_protected_gfns: int
    memory_bytes: int
    track_pool_bytes: int
    cycles: CycleCounts
    simulated_seconds: float
    vcpus: tuple[VcpuStats, ...]
    head_seq: int
    oldest_seq: int
    notifiers: int
    uptime_ms: int


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What ``snapshot_vm_to`` wrote: one VM's snapshot, checked against the daemon's sha256."""

    vm: str
    size_bytes: int
    sha256: str
    format_version: int
    head_seq: int
    include_memory: bool


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Server-wide caps on requests and streams."""

    max_message_bytes: int
    max_write_bytes: int
    max_batch_writes: int
    max_batch_bytes: int
    max_gfns_per_request: int
    max_filter_ranges: int
    max_watch_batch_events: int
    default_watch_batch_events: int
    max_watch_batch_bytes: int
    default_watch_batch_bytes: int
    max_watch_batch_delay_ms: int
    default_watch_batch_delay_ms: int
    max_queue_limit: int
    default_queue_limit: int
    max_block_timeout_ms: int
    default_block_timeout_ms: int
    min_heartbeat_interval_ms: int
    max_heartbeat_interval_ms: int
    default_heartbeat_interval_ms: int
    min_lease_ttl_ms: int
    max_lease_ttl_ms: int
    max_audit_mismatches: int


@dataclass(frozen=True, slots=True)
class TenantQuotas:
    """The caller's quotas (0 = unlimited)."""

    vms: int
    guest_pages: int
    tracked_gfns: int
    watchers: int
    workloads: int
    write_rate: int


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What the daemon process holds right now (admin callers; zeros otherwise)."""

    rss_bytes: int
    tasks: int
    notifiers: int
    watchers: int
    leases: int
    vms: int


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Who the daemon is and who it thinks the caller is."""

    version: str
    tenant: str
    role: str
    limits: ServerLimits
    quotas: TenantQuotas
    started_at_ns: int
    process: ProcessInfo


@dataclass(frozen=True, slots=True)
class Notifier:
    """One registered notifier of a VM (a plugin or a Watch stream)."""

    notifier_id: int
    kind: NotifierKind
    name: str
    registered_at_ns: int
    policy: SlowConsumerPolicy | None
    queue_depth: int
    queue_limit: int
    lag: int
    sent_total: int
    dropped_total: int
    coalesced_total: int
    lease_id: str


# --------------------------------------------------------------------------- watch messages

FLAG_SOURCE_DMA = 1
FLAG_COALESCED = 2
FLAG_DATA_OMITTED = 4
#: the event's page was not write-tracked (a piece of a write that crossed pages)
FLAG_UNTRACKED = 8
FLAG_MODE_MASK = 0xFF00


@dataclass(frozen=True, slots=True)
class Registered:
    """First message of each (re)connection: the stream is registered.

    ``reconnects`` counts the reconnections made before this one (0 on the first).
    """

    vm: str
    notifier_id: int
    head_seq: int
    oldest_seq: int
    start_seq: int
    lease_id: str
    max_batch_events: int
    max_batch_bytes: int
    max_batch_delay_ms: int
    queue_limit: int
    policy: SlowConsumerPolicy
    block_timeout_ms: int
    heartbeat_interval_ms: int
    reconnects: int = 0
    #: this run of the daemon; it changes when the daemon restarts
    incarnation: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """One tracked write: where, by whom, and the new bytes."""

    vm: str
    seq: int
    gpa: int
    length: int
    vcpu: int | None
    source: EventSource
    data: bytes
    timestamp_ns: int
    coalesced: bool = False
    data_omitted: bool = False
    mode: int = 1
    #: the written page was not write-tracked: a piece of an emulated write that crossed
    #: from a tracked (or MMIO) page into an untracked one; KVM notifies it all the same
    untracked: bool = False

    @property
    def gfn(self) -> int:
        """The written page."""
        return self.gpa >> PAGE_SHIFT


@dataclass(frozen=True, slots=True, eq=False)
class EventBatch:
    """A batch of events as numpy columns; event i's bytes are ``data[offsets[i]:offsets[i+1]]``."""

    vm: str
    seq: U64Array
    gpa: U64Array
    length: U32Array
    vcpu: U32Array
    flags: U32Array
    timestamp_ns: U64Array
    data: bytes
    head_seq: int

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def first_seq(self) -> int:
        """Seq of the first event."""
        return int(self.seq[0])

    @property
    def last_seq(self) -> int:
        """Seq of the last event."""
        return int(self.seq[-1])

    @property
    def gfn(self) -> U64Array:
        """Gfn of every event."""
        import numpy as np

        return self.gpa >> np.uint64(PAGE_SHIFT)

    @property
    def is_dma(self) -> npt.NDArray[np.bool_]:
        """Whether each event came from DMA."""
        import numpy as np

        out: npt.NDArray[np.bool_] = (self.flags & np.uint32(FLAG_SOURCE_DMA)) != 0
        return out

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        """Start of each event's bytes in ``data`` (plus the end, so len + 1 entries)."""
        import numpy as np

        lengths = np.where(
            (self.flags & np.uint32(FLAG_DATA_OMITTED)) != 0, 0, self.length
        ).astype(np.int64)
        out = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out[1:])
        return out

    def events(self) -> Iterator[Event]:
        """The batch as Event objects, in seq order."""
        offs = self.offsets.tolist()
        data = self.data
        for i, (seq, gpa, length, vcpu, flags, ts) in enumerate(
            zip(
                self.seq.tolist(), self.gpa.tolist(), self.length.tolist(),
                self.vcpu.tolist(), self.flags.tolist(), self.timestamp_ns.tolist(),
                strict=True,
            )
        ):
            dma = bool(flags & FLAG_SOURCE_DMA)
            yield Event(
                vm=self.vm,
                seq=seq,
                gpa=gpa,
                length=length,
                vcpu=None if dma or vcpu == DMA_VCPU else vcpu,
                source=EventSource.DMA if dma else EventSource.GUEST,
                data=data[offs[i] : offs[i + 1]],
                timestamp_ns=ts,
                coalesced=bool(flags & FLAG_COALESCED),
                data_omitted=bool(flags & FLAG_DATA_OMITTED),
                mode=(flags & FLAG_MODE_MASK) >> 8 or 1,
                untracked=bool(flags & FLAG_UNTRACKED),
            )


@dataclass(frozen=True, slots=True)
class Gap:
    """Events this stream did not get: ``count`` of them in ``[first_seq, last_seq]``."""

    first_seq: int
    last_seq: int
    count: int
    reason: GapReason


@dataclass(frozen=True, slots=True)
class RegionRemoved:
    """A memslot delete or move removed a gfn range (events after ``at_seq`` follow it)."""

    slot: int
    base_gfn: int
    npages: int
    change: MemslotChange
    new_base_gfn: int
    at_seq: int


@dataclass(frozen=True, slots=True)
class Finding:
    """What a plugin reported: ``kind`` of thing over the gfns
    ``[first_gfn, first_gfn + npages)`` (``npages`` 0: no gfn in particular), with its
    own ``seq`` in the VM's stream (resumable like events)."""

    seq: int
    plugin: str
    kind: str
    first_gfn: int
    npages: int
    message: str
    details: Mapping[str, str] = field(default_factory=dict)
    timestamp_ns: int = 0


@dataclass(frozen=True, slots=True)
class Progress:
    """Heartbeat: the VM's head seq, this stream's lag, queue depth and totals."""

    head_seq: int
    sent_seq: int
    lag: int
    queue_depth: int
    sent_total: int
    dropped_total: int
    coalesced_total: int
    timestamp_ns: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The stream ended normally (unwatched, or the VM was deleted)."""

    reason: CloseReason
    last_seq: int


WatchMessage: TypeAlias = (
    Registered | EventBatch | Gap | RegionRemoved | Finding | Progress | Closed
)

__all__ = [
    "DEFAULT_TARGET",
    "DMA_VCPU",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "AuditMismatch",
    "AuditReport",
    "BatchWriteResult",
    "CmpxchgResult",
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
    "Gap",
    "GapReason",
    "GfnRange",
    "GfnTrackState",
    "Lease",
    "LeaseKind",
    "LeaseRevoked",
    "Memslot",
    "MemslotChange",
    "Notifier",
    "NotifierKind",
    "OwnerCount",
    "OwnerKind",
    "PluginKind",
    "PluginStatus",
    "Ppgtt",
    "ProcessInfo",
    "Progress",
    "RegionChange",
    "RegionRemoved",
    "Finding",
    "Registered",
    "Semantics",
    "ServerInfo",
    "ServerLimits",
    "ShadowRoot",
    "SlowConsumerPolicy",
    "SnapshotInfo",
    "TenantQuotas",
    "TrackingChange",
    "Translation",
    "VcpuStats",
    "VgpuSubmission",
    "Vm",
    "VmLimits",
    "VmOptions",
    "VmStats",
    "WatchMessage",
    "WorkloadKind",
    "WorkloadState",
    "WorkloadStatus",
    "WritePath",
    "WritePathCounts",
    "WritePiece",
    "WriteResult",
]
