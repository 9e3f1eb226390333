"""Typed, read-only views of what the engine holds, for the adapters.

The servicers, metrics and the CLI's figures read these instead of a VM's stats,
memslot table, hub or track counters: what is counted and how is decided here once.
Each view is a snapshot taken when it is built; nothing in it changes afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagetrackd.domain import CostModel, DmaPolicy, Semantics, TenantId, WritePath
from pagetrackd.leases import Lease, LeaseKind

if TYPE_CHECKING:
    from pagetrackd.application.engine import Engine
    from pagetrackd.application.entries import VmEntry, WorkloadRun


@dataclass(frozen=True, slots=True)
class PathCounts:
    """A figure split by write path."""

    mmio_exit: int
    fast: int
    emulated: int

    @classmethod
    def of(cls, values: list[int]) -> PathCounts:
        """From a list indexed by :class:`WritePath`."""
        return cls(
            values[WritePath.MMIO_EXIT], values[WritePath.FAST], values[WritePath.EMULATED]
        )

    @property
    def total(self) -> int:
        """All paths summed."""
        return self.mmio_exit + self.fast + self.emulated


@dataclass(frozen=True, slots=True)
class StreamTotals:
    """Watch stream figures of one VM."""

    watchers: int  #: open streams
    live_dropped: int  #: events the open streams lost
    live_coalesced: int  #: events the open streams' COALESCE policy superseded
    sent: int  #: events taken off queues, ended streams included
    dropped: int  #: ended streams included
    coalesced: int  #: ended streams included
    queue_depth: int  #: events queued now, summed
    max_lag: int  #: largest head seq - sent seq of an open stream


@dataclass(frozen=True, slots=True)
class VmStatsView:
    """Everything counted for one VM (GetStats, metrics)."""

    tenant: TenantId
    name: str
    created_at_ns: int
    guest_writes: int
    pieces: PathCounts
    cycles: PathCounts
    dma_cycles: int
    bytes_written: int
    mmio_exits: int
    emulations: int
    dma_applied: int
    dma_bypassed: int
    dma_notified: int
    dma_rejected: int
    notifications: int
    notifier_errors: int
    streams: StreamTotals
    memslots: int
    tracked_gfns: int
    memory_bytes: int
    track_pool_bytes: int
    vcpu_cycles: tuple[tuple[int, int], ...]  #: (vcpu, cycles), by vcpu
    head_seq: int
    oldest_seq: int
    history_events: int
    notifiers: int  #: users' notifiers (the history is not counted)
    simulated_seconds: float

    @property
    def cycles_total(self) -> int:
        """Simulated cycles over every path, DMA included."""
        return self.cycles.total + self.dma_cycles


def _streams(entry: VmEntry) -> StreamTotals:
    subs = list(entry.hub.subscribers.values())
    done = entry.ended_streams
    seq = entry.vm.seq
    dropped = sum(x.counters.dropped for x in subs)
    coalesced = sum(x.counters.coalesced for x in subs)
    return StreamTotals(
        watchers=len(subs),
        live_dropped=dropped,
        live_coalesced=coalesced,
        sent=done.sent + sum(x.counters.sent for x in subs),
        dropped=done.dropped + dropped,
        coalesced=done.coalesced + coalesced,
        queue_depth=sum(x.depth for x in subs),
        max_lag=max((max(0, seq - x.last_seq) for x in subs), default=0),
    )


def vm_stats(entry: VmEntry) -> VmStatsView:
    """The figures of one VM, now."""
    vm = entry.vm
    s = vm.stats
    cycles = PathCounts.of(s.cycles)
    return VmStatsView(
        tenant=entry.tenant, name=vm.name, created_at_ns=entry.created_at_ns,
        guest_writes=s.writes, pieces=PathCounts.of(s.pieces), cycles=cycles,
        dma_cycles=s.dma_cycles, bytes_written=s.bytes_written, mmio_exits=s.mmio_exits,
        emulations=s.emulations, dma_applied=s.dma_applied, dma_bypassed=s.dma_bypassed,
        dma_notified=s.dma_notified, dma_rejected=s.dma_rejected,
        notifications=s.notifications, notifier_errors=s.notifier_errors,
        streams=_streams(entry), memslots=len(vm.slots), tracked_gfns=vm.tracked_count,
        memory_bytes=vm.memory_footprint, track_pool_bytes=vm.tracking_footprint,
        vcpu_cycles=tuple(sorted(s.vcpu_cycles.items())), head_seq=vm.seq,
        oldest_seq=max(entry.hub.history.oldest_seq, 1),
        history_events=entry.hub.history.events, notifiers=len(vm.notifiers) - 1,
        simulated_seconds=(cycles.total + s.dma_cycles) / vm.cost.host_hz,
    )


@dataclass(frozen=True, slots=True)
class VmView:
    """A VM's options and a few live figures (the API's Vm message)."""

    tenant: TenantId
    name: str
    dma_policy: DmaPolicy
    semantics: Semantics
    cost: CostModel
    record: bool
    max_slots: int
    gfn_bits: int
    vcpus: int
    history_events: int
    history_bytes: int
    created_at_ns: int
    memslot_count: int
    tracked_gfns: int
    resident_pages: int
    head_seq: int
    oldest_seq: int
    notifier_count: int
    plugins: tuple[str, ...]  #: attached plugins' canonical names
    running_workloads: int


def vm_view(engine: Engine, entry: VmEntry) -> VmView:
    """The VM as the API describes it, now."""
    vm = entry.vm
    running = sum(
        1 for r in engine.workloads.values() if r.entry is entry and r.state == "running"
    )
    return VmView(
        tenant=entry.tenant, name=vm.name, dma_policy=vm.dma_policy, semantics=vm.semantics,
        cost=vm.cost, record=entry.recorder is not None, max_slots=vm.limits.max_slots,
        gfn_bits=vm.limits.gfn_bits, vcpus=vm.vcpus,
        history_events=entry.hub.history.max_events,
        history_bytes=entry.hub.history.max_bytes, created_at_ns=entry.created_at_ns,
        memslot_count=len(vm.slots), tracked_gfns=vm.tracked_count,
        resident_pages=sum(s.memory.pages for s in vm.slots.slots()), head_seq=vm.seq,
        oldest_seq=max(entry.hub.history.oldest_seq, 1),
        notifier_count=len(vm.notifiers) - 1,  # the history is not a user's notifier
        plugins=tuple(entry.plugins), running_workloads=running,
    )


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A lease as the API describes it."""

    lease_id: str
    kind: LeaseKind
    ttl_ms: int
    expires_at_ns: int  #: wall clock; 0 for stream leases
    references: int  #: tracking references held under it, over the tenant's VMs
    label: str


def lease_view(engine: Engine, lease: Lease) -> LeaseView:
    """The lease now."""
    remaining = engine.leases.remaining_ms(lease)
    ttl = lease.kind is LeaseKind.TTL
    return LeaseView(
        lease_id=lease.lease_id, kind=lease.kind, ttl_ms=lease.ttl_ms,
        expires_at_ns=time.time_ns() + remaining * 1_000_000 if ttl else 0,
        references=engine.lease_references(lease), label=lease.label,
    )


@dataclass(frozen=True, slots=True)
class WorkloadView:
    """A workload run and what its VM did since it started."""

    run_id: str
    vm: str
    kind: str
    rate: float
    count: int
    duration_s: float
    seed: int
    options: dict[str, str]
    state: str
    error: str
    started_at_ns: int
    elapsed_s: float
    writes: int
    achieved_rate: float
    pieces: PathCounts
    cycles: PathCounts


def workload_view(run: WorkloadRun) -> WorkloadView:
    """The run now."""
    stats = run.entry.vm.stats
    pieces = [a - b for a, b in zip(stats.pieces, run.stats_before[0], strict=True)]
    cycles = [a - b for a, b in zip(stats.cycles, run.stats_before[1], strict=True)]
    return WorkloadView(
        run_id=run.run_id, vm=run.entry.name, kind=run.kind, rate=run.rate,
        count=run.count, duration_s=run.duration_s, seed=int(run.config.get("seed", 0)),
        options={k: str(v) for k, v in run.config.items() if k != "seed"},
        state=run.state, error=run.error, started_at_ns=run.started_ns,
        elapsed_s=run.elapsed_s, writes=run.writes, achieved_rate=run.achieved_rate,
        pieces=PathCounts.of(pieces), cycles=PathCounts.of(cycles),
    )


__all__ = [
    "LeaseView",
    "PathCounts",
    "StreamTotals",
    "VmStatsView",
    "VmView",
    "WorkloadView",
    "lease_view",
    "vm_stats",
    "vm_view",
    "workload_view",
]
