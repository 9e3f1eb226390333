"""The application's typed views and results as API messages."""

from __future__ import annotations

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.application.access import MemslotView
from pagetrackd.application.admin import ProcessView
from pagetrackd.application.plugin_ops import PluginView
from pagetrackd.application.views import (
    LeaseView,
    PathCounts,
    VmStatsView,
    VmView,
    WorkloadView,
)
from pagetrackd.leases import LeaseKind
from pagetrackd.transport import convert as cv


def vm_pb(v: VmView) -> pb.Vm:
    """The Vm message."""
    return pb.Vm(
        name=v.name,
        tenant=v.tenant,
        options=pb.VmOptions(
            dma_policy=cv.DMA_POLICY_PB[v.dma_policy],
            semantics=cv.SEMANTICS_PB[v.semantics],
            cost=cv.cost_model_pb(v.cost),
            record=v.record,
            limits=pb.VmLimits(
                max_memslots=v.max_slots,
                gfn_bits=v.gfn_bits,
                max_vcpus=v.vcpus,
                history_events=v.history_events,
                history_bytes=v.history_bytes,
            ),
        ),
        created_at_ns=v.created_at_ns,
        memslot_count=v.memslot_count,
        tracked_gfns=v.tracked_gfns,
        resident_pages=v.resident_pages,
        head_seq=v.head_seq,
        oldest_seq=v.oldest_seq,
        notifier_count=v.notifier_count,
        plugins=[cv.PLUGIN_KIND_PB[k] for k in v.plugins if k in cv.PLUGIN_KIND_PB],
        running_workloads=v.running_workloads,
    )


def path_counts_pb(c: PathCounts) -> pb.WritePathCounts:
    """Counts by write path."""
    return pb.WritePathCounts(mmio_exit=c.mmio_exit, fast=c.fast, emulated=c.emulated)


def vm_stats_pb(s: VmStatsView, now_ns: int) -> pb.VmStats:
    """Everything counted for one VM."""
    return pb.VmStats(
        vm=s.name,
        guest_writes=s.guest_writes,
        writes=path_counts_pb(s.pieces),
        bytes_written=s.bytes_written,
        mmio_exits=s.mmio_exits,
        emulations=s.emulations,
        dma=pb.DmaCounts(
            applied=s.dma_applied, bypassed=s.dma_bypassed,
            notified=s.dma_notified, rejected=s.dma_rejected,
        ),
        notifications=s.notifications,
        notifier_errors=s.notifier_errors,
        events_dropped=s.streams.live_dropped,
        events_coalesced=s.streams.live_coalesced,
        tracked_gfns=s.tracked_gfns,
        write_protected_gfns=s.tracked_gfns,
        memory_bytes=s.memory_bytes,
        track_pool_bytes=s.track_pool_bytes,
        cycles=pb.CycleCounts(
            mmio_exit=s.cycles.mmio_exit, fast=s.cycles.fast, emulated=s.cycles.emulated,
            dma=s.dma_cycles, total=s.cycles_total,
        ),
        simulated_seconds=s.simulated_seconds,
        vcpus=[pb.VcpuStats(vcpu=v, cycles=pb.CycleCounts(total=c)) for v, c in s.vcpu_cycles],
        head_seq=s.head_seq,
        oldest_seq=s.oldest_seq,
        notifiers=s.notifiers,
        uptime_ms=(now_ns - s.created_at_ns) // 1_000_000,
    )


def memslot_view_pb(m: MemslotView) -> pb.Memslot:
    """A memslot with its tracked and dirty counts."""
    return cv.memslot_pb(m.info, m.tracked, m.dirty)


def lease_pb(v: LeaseView) -> pb.Lease:
    """The Lease message."""
    return pb.Lease(
        id=v.lease_id,
        kind=pb.LEASE_KIND_TTL if v.kind is LeaseKind.TTL else pb.LEASE_KIND_STREAM,
        ttl_ms=v.ttl_ms,
        expires_at_ns=v.expires_at_ns,
        references=v.references,
        label=v.label,
    )


def plugin_status_pb(v: PluginView) -> pb.PluginStatus:
    """The PluginStatus message."""
    return pb.PluginStatus(
        kind=cv.PLUGIN_KIND_PB.get(v.name, pb.PLUGIN_KIND_UNSPECIFIED),
        tracked_gfns=v.tracked_gfns,
        counters=v.counters,
        info=v.info,
        name=cv.plugin_api_name(v.name),
        failures=v.failures,
        findings=v.findings,
    )


def workload_pb(w: WorkloadView) -> pb.WorkloadStatus:
    """The WorkloadStatus message."""
    cfg = pb.StartWorkloadRequest(
        vm=w.vm,
        kind=cv.WORKLOAD_KIND_PB.get(w.kind, pb.WORKLOAD_KIND_UNSPECIFIED),
        rate=w.rate,
        count=w.count,
        duration_ms=int(w.duration_s * 1000),
        seed=w.seed,
        options=w.options,
    )
    return pb.WorkloadStatus(
        id=w.run_id,
        vm=w.vm,
        config=cfg,
        state=cv.WORKLOAD_STATE_PB[w.state],
        error=w.error,
        started_at_ns=w.started_at_ns,
        elapsed_ms=int(w.elapsed_s * 1000),
        writes=w.writes,
        achieved_rate=w.achieved_rate,
        writes_by_path=path_counts_pb(w.pieces),
        cycles=pb.CycleCounts(
            mmio_exit=w.cycles.mmio_exit, fast=w.cycles.fast, emulated=w.cycles.emulated,
            total=w.cycles.total,
        ),
    )


def process_pb(p: ProcessView) -> pb.ProcessInfo:
    """The ProcessInfo message."""
    return pb.ProcessInfo(
        rss_bytes=p.rss_bytes, tasks=p.tasks, notifiers=p.notifiers, watchers=p.watchers,
        leases=p.leases, vms=p.vms,
    )
