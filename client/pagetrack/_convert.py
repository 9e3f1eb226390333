"""Protobuf messages to and from the client's dataclasses and enums."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

from pagetrack import types as t
from pagetrack.errors import InvalidArgument
from pagetrack.v1 import pagetrack_pb2 as pb

E = TypeVar("E", bound=enum.StrEnum)
D = TypeVar("D")


class _EnumMap:
    """One client enum <-> one proto enum (``PREFIX_MEMBER`` names)."""

    def __init__(
        self,
        cls: type[enum.StrEnum],
        proto: Any,
        prefix: str,
        rename: Mapping[str, str] | None = None,
    ) -> None:
        self.cls = cls
        self.to_pb: dict[enum.StrEnum, int] = {}
        self.from_pb: dict[int, enum.StrEnum] = {}
        for member in cls:
            suffix = (rename or {}).get(member.name, member.name)
            number = proto.Value(prefix + suffix)
            self.to_pb[member] = number
            self.from_pb[number] = member


_MAPS: dict[type[enum.StrEnum], _EnumMap] = {
    m.cls: m
    for m in (
        _EnumMap(t.DmaPolicy, pb.DmaPolicy, "DMA_POLICY_"),
        _EnumMap(t.Semantics, pb.Semantics, "SEMANTICS_", {"V2016": "2016"}),
        _EnumMap(t.WritePath, pb.WritePath, "WRITE_PATH_"),
        _EnumMap(t.DmaPath, pb.DmaPath, "DMA_PATH_"),
        _EnumMap(t.EventSource, pb.EventSource, "EVENT_SOURCE_"),
        _EnumMap(t.SlowConsumerPolicy, pb.SlowConsumerPolicy, "SLOW_CONSUMER_POLICY_"),
        _EnumMap(t.PluginKind, pb.PluginKind, "PLUGIN_KIND_"),
        _EnumMap(t.WorkloadKind, pb.WorkloadKind, "WORKLOAD_KIND_"),
        _EnumMap(t.WorkloadState, pb.WorkloadState, "WORKLOAD_STATE_"),
        _EnumMap(t.MemslotChange, pb.MemslotChange, "MEMSLOT_CHANGE_", {"NONE": "UNSPECIFIED"}),
        _EnumMap(t.GapReason, pb.GapReason, "GAP_REASON_"),
        _EnumMap(t.CloseReason, pb.CloseReason, "CLOSE_REASON_"),
        _EnumMap(t.OwnerKind, pb.OwnerKind, "OWNER_KIND_"),
        _EnumMap(t.LeaseKind, pb.LeaseKind, "LEASE_KIND_"),
        _EnumMap(t.NotifierKind, pb.NotifierKind, "NOTIFIER_KIND_"),
    )
}


def parse_enum(cls: type[E], value: str | E, what: str) -> E:
    """A member of ``cls`` from a member, its value (``"linux-6.6"``) or its name
    (``"LINUX_6_6"``), case-insensitively; InvalidArgument naming the choices otherwise."""
    if isinstance(value, cls):
        return value
    text = str(value).strip().lower()
    for member in cls:
        if text in (member.value.lower(), member.name.lower(), member.value.replace("-", "_")):
            if member.value != "unspecified":
                return member
    choices = ", ".join(m.value for m in cls if m.value != "unspecified")
    raise InvalidArgument(f"{what} {value!r} is not one of: {choices}")


def to_pb(cls: type[E], value: str | E | None, what: str) -> int:
    """The proto number for a client enum value; 0 (UNSPECIFIED) for None."""
    if value is None:
        return 0
    return _MAPS[cls].to_pb[parse_enum(cls, value, what)]


def from_pb(cls: type[E], number: int, default: E) -> E:
    """The client enum member for a proto number; ``default`` for unknown or 0 numbers."""
    member = _MAPS[cls].from_pb.get(number)
    if member is None or member.value == "unspecified":
        return default
    return member  # type: ignore[return-value]


def plain(cls: type[D], msg: Any) -> D:
    """A dataclass whose fields are all scalars named as in the message."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return cls(**{f.name: getattr(msg, f.name) for f in fields})


# --------------------------------------------------------------------------- requests


def gfn_ranges_pb(ranges: Iterable[Any] | None) -> list[pb.GfnRange]:
    """GfnRange messages from GfnRange objects, ``(start, count)`` pairs or ``range``s."""
    out: list[pb.GfnRange] = []
    for r in ranges or ():
        if isinstance(r, t.GfnRange):
            start, count = r.start, r.count
        elif isinstance(r, range):
            if r.step != 1:
                raise InvalidArgument(f"gfn range {r!r} must have step 1")
            start, count = r.start, len(r)
        else:
            try:
                start, count = (int(x) for x in r)
            except (TypeError, ValueError):
                raise InvalidArgument(
                    f"gfn range {r!r}: give a GfnRange, a range or a (start, count) pair"
                ) from None
        if start < 0 or count < 1:
            raise InvalidArgument(
                f"gfn range start={start} count={count}: need start >= 0 and count >= 1"
            )
        out.append(pb.GfnRange(start=start, count=count))
    return out


def gfn_list(gfns: Any) -> list[int]:
    """A list of gfns from an int, an iterable of ints or a numpy array."""
    if gfns is None:
        return []
    if isinstance(gfns, int | np.integer):
        return [int(gfns)]
    arr = np.asarray(gfns)
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0):
        raise InvalidArgument("gfns must be non-negative integers")
    return [int(x) for x in arr.reshape(-1).tolist()]


def cost_pb(cost: Mapping[str, int] | None) -> pb.CostModel | None:
    """A CostModel message from a mapping of its field names to cycle counts."""
    if cost is None:
        return None
    known = {f.name for f in pb.CostModel.DESCRIPTOR.fields}
    unknown = set(cost) - known
    if unknown:
        raise InvalidArgument(
            f"cost: unknown field(s) {', '.join(sorted(unknown))};"
            f" known: {', '.join(sorted(known))}"
        )
    return pb.CostModel(**{k: int(v) for k, v in cost.items()})


def options_pb(options: Mapping[str, Any] | None) -> dict[str, str]:
    """A string map for plugin and workload options (bools as true/false)."""
    out: dict[str, str] = {}
    for key, value in (options or {}).items():
        out[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


# --------------------------------------------------------------------------- replies


def vm(msg: pb.Vm) -> t.Vm:
    """A Vm."""
    o = msg.options
    return t.Vm(
        name=msg.name,
        tenant=msg.tenant,
        options=t.VmOptions(
            dma_policy=from_pb(t.DmaPolicy, o.dma_policy, t.DmaPolicy.BYPASS),
            semantics=from_pb(t.Semantics, o.semantics, t.Semantics.V2016),
            cost=plain(t.CostModel, o.cost),
            limits=plain(t.VmLimits, o.limits),
        ),
        created_at_ns=msg.created_at_ns,
        memslot_count=msg.memslot_count,
        tracked_gfns=msg.tracked_gfns,
        resident_pages=msg.resident_pages,
        head_seq=msg.head_seq,
        oldest_seq=msg.oldest_seq,
        notifier_count=msg.notifier_count,
        plugins=tuple(
            from_pb(t.PluginKind, k, t.PluginKind.SHADOW_MMU)
            for k in msg.plugins
            if k in _MAPS[t.PluginKind].from_pb
        ),
        running_workloads=msg.running_workloads,
    )


def memslot(msg: pb.Memslot) -> t.Memslot:
    """A Memslot."""
    return plain(t.Memslot, msg)


def region_change(msg: pb.SetMemoryRegionResponse) -> t.RegionChange:
    """A RegionChange."""
    return t.RegionChange(
        change=from_pb(t.MemslotChange, msg.change, t.MemslotChange.NONE),
        region=memslot(msg.region),
        old_base_gfn=msg.old_base_gfn,
        at_seq=msg.at_seq,
    )


def _write_pieces(pieces: Iterable[pb.WritePiece]) -> tuple[t.WritePiece, ...]:
    return tuple(
        t.WritePiece(
            gpa=p.gpa,
            length=p.length,
            path=from_pb(t.WritePath, p.path, t.WritePath.UNSPECIFIED),
            seq=p.seq if p.HasField("seq") else None,
        )
        for p in pieces
    )


def write_result(msg: pb.WriteGuestResponse) -> t.WriteResult:
    """A WriteResult."""
    return t.WriteResult(pieces=_write_pieces(msg.pieces), cycles=msg.cycles)


def cmpxchg_result(msg: pb.CompareExchangeGuestResponse) -> t.CmpxchgResult:
    """A CmpxchgResult."""
    return t.CmpxchgResult(
        exchanged=msg.exchanged, current=msg.current, as_write=msg.as_write,
        pieces=_write_pieces(msg.pieces), cycles=msg.cycles,
    )


def batch_result(msg: pb.WriteGuestBatchResponse) -> t.BatchWriteResult:
    """A BatchWriteResult."""
    return t.BatchWriteResult(
        writes=msg.writes,
        pieces=plain(t.WritePathCounts, msg.pieces),
        first_seq=msg.first_seq if msg.HasField("first_seq") else None,
        last_seq=msg.last_seq if msg.HasField("last_seq") else None,
        cycles=msg.cycles,
        piece_path=np.frombuffer(msg.piece_path, dtype=np.uint8) if msg.piece_path else None,
        piece_write=np.array(msg.piece_write, dtype=np.uint32) if msg.piece_write else None,
    )


def dma_result(msg: pb.DmaWriteResponse) -> t.DmaResult:
    """A DmaResult."""
    return t.DmaResult(
        pieces=tuple(
            t.DmaPiece(
                gpa=p.gpa,
                length=p.length,
                path=from_pb(t.DmaPath, p.path, t.DmaPath.UNSPECIFIED),
                seq=p.seq if p.HasField("seq") else None,
            )
            for p in msg.pieces
        ),
        cycles=msg.cycles,
    )


def track_state(msg: pb.GfnTrackState) -> t.GfnTrackState:
    """A GfnTrackState."""
    return t.GfnTrackState(
        gfn=msg.gfn,
        in_memslot=msg.in_memslot,
        slot=msg.slot,
        counter=msg.counter,
        owners=tuple(
            t.OwnerCount(
                kind=from_pb(t.OwnerKind, o.kind, t.OwnerKind.UNSPECIFIED), id=o.id, count=o.count
            )
            for o in msg.owners
        ),
        write_protected=msg.write_protected,
        lpage_2m_disallowed=msg.lpage_2m_disallowed,
        lpage_1g_disallowed=msg.lpage_1g_disallowed,
    )


def lease(msg: pb.Lease) -> t.Lease:
    """A Lease."""
    return t.Lease(
        id=msg.id,
        kind=from_pb(t.LeaseKind, msg.kind, t.LeaseKind.UNSPECIFIED),
        ttl_ms=msg.ttl_ms,
        expires_at_ns=msg.expires_at_ns,
        references=msg.references,
        label=msg.label,
    )


def plugin_status(msg: pb.PluginStatus) -> t.PluginStatus:
    """A PluginStatus."""
    kind = _MAPS[t.PluginKind].from_pb.get(msg.kind)
    return t.PluginStatus(
        kind=kind,  # type: ignore[arg-type]
        attached_at_ns=msg.attached_at_ns,
        tracked_gfns=msg.tracked_gfns,
        counters=dict(msg.counters),
        info=dict(msg.info),
        name=msg.name or (kind.value if kind is not None else ""),
        failures=msg.failures,
        findings=msg.findings,
    )


def plugin_ref(plugin: t.PluginKind | str) -> dict[str, Any]:
    """Request fields naming a plugin: a built-in by kind, any other by name."""
    try:
        return {"kind": to_pb(t.PluginKind, plugin, "plugin")}
    except InvalidArgument:
        return {"name": str(plugin)}


def finding(msg: pb.Finding) -> t.Finding:
    """A plugin's Finding."""
    return t.Finding(
        seq=msg.seq, plugin=msg.plugin, kind=msg.kind, first_gfn=msg.first_gfn,
        npages=msg.npages, message=msg.message, details=dict(msg.details),
        timestamp_ns=msg.timestamp_ns,
    )


def audit(msg: pb.AuditPluginResponse) -> t.AuditReport:
    """An AuditReport."""
    return t.AuditReport(
        checked_entries=msg.checked_entries,
        mismatch_count=msg.mismatch_count,
        mismatches=tuple(plain(t.AuditMismatch, m) for m in msg.mismatches),
    )


def workload(msg: pb.WorkloadStatus) -> t.WorkloadStatus:
    """A WorkloadStatus."""
    c = msg.config
    return t.WorkloadStatus(
        id=msg.id,
        vm=msg.vm,
        kind=from_pb(t.WorkloadKind, c.kind, t.WorkloadKind.UNSPECIFIED),
        state=from_pb(t.WorkloadState, msg.state, t.WorkloadState.UNSPECIFIED),
        error=msg.error,
        started_at_ns=msg.started_at_ns,
        elapsed_ms=msg.elapsed_ms,
        writes=msg.writes,
        achieved_rate=msg.achieved_rate,
        writes_by_path=plain(t.WritePathCounts, msg.writes_by_path),
        cycles=plain(t.CycleCounts, msg.cycles),
        rate=c.rate,
        count=c.count,
        duration_ms=c.duration_ms,
        seed=c.seed,
        options=dict(c.options),
    )


def vm_stats(msg: pb.VmStats) -> t.VmStats:
    """A VmStats."""
    return t.VmStats(
        vm=msg.vm,
        guest_writes=msg.guest_writes,
        writes=plain(t.WritePathCounts, msg.writes),
        bytes_written=msg.bytes_written,
        mmio_exits=msg.mmio_exits,
        emulations=msg.emulations,
        dma=plain(t.DmaCounts, msg.dma),
        notifications=msg.notifications,
        notifier_errors=msg.notifier_errors,
        events_dropped=msg.events_dropped,
        events_coalesced=msg.events_coalesced,
        tracked_gfns=msg.tracked_gfns,
        write_protected_gfns=msg.write_protected_gfns,
        memory_bytes=msg.memory_bytes,
        track_pool_bytes=msg.track_pool_bytes,
        cycles=plain(t.CycleCounts, msg.cycles),
        simulated_seconds=msg.simulated_seconds,
        vcpus=tuple(
            t.VcpuStats(
                vcpu=v.vcpu,
                writes=plain(t.WritePathCounts, v.writes),
                cycles=plain(t.CycleCounts, v.cycles),
            )
            for v in msg.vcpus
        ),
        head_seq=msg.head_seq,
        oldest_seq=msg.oldest_seq,
        notifiers=msg.notifiers,
        uptime_ms=msg.uptime_ms,
    )


def server_info(msg: pb.GetServerInfoResponse) -> t.ServerInfo:
    """A ServerInfo."""
    return t.ServerInfo(
        version=msg.version,
        tenant=msg.tenant,
        role=msg.role,
        limits=plain(t.ServerLimits, msg.limits),
        quotas=plain(t.TenantQuotas, msg.quotas),
        started_at_ns=msg.started_at_ns,
        process=plain(t.ProcessInfo, msg.process),
    )


def notifier(msg: pb.NotifierInfo) -> t.Notifier:
    """A Notifier."""
    return t.Notifier(
        notifier_id=msg.notifier_id,
        kind=from_pb(t.NotifierKind, msg.kind, t.NotifierKind.UNSPECIFIED),
        name=msg.name,
        registered_at_ns=msg.registered_at_ns,
        policy=_MAPS[t.SlowConsumerPolicy].from_pb.get(msg.policy),  # type: ignore[arg-type]
        queue_depth=msg.queue_depth,
        queue_limit=msg.queue_limit,
        lag=msg.lag,
        sent_total=msg.sent_total,
        dropped_total=msg.dropped_total,
        coalesced_total=msg.coalesced_total,
        lease_id=msg.lease_id,
    )


# --------------------------------------------------------------------------- watch


def registered(vm_name: str, msg: pb.Registered, reconnects: int) -> t.Registered:
    """A Registered record."""
    return t.Registered(
        vm=vm_name,
        notifier_id=msg.notifier_id,
        head_seq=msg.head_seq,
        oldest_seq=msg.oldest_seq,
        start_seq=msg.start_seq,
        lease_id=msg.lease_id,
        max_batch_events=msg.max_batch_events,
        max_batch_bytes=msg.max_batch_bytes,
        max_batch_delay_ms=msg.max_batch_delay_ms,
        queue_limit=msg.queue_limit,
        policy=from_pb(t.SlowConsumerPolicy, msg.policy, t.SlowConsumerPolicy.DROP),
        block_timeout_ms=msg.block_timeout_ms,
        heartbeat_interval_ms=msg.heartbeat_interval_ms,
        reconnects=reconnects,
        incarnation=msg.incarnation,
    )


def event_batch(vm_name: str, msg: pb.EventBatch) -> t.EventBatch:
    """An EventBatch, its columns decoded in bulk."""
    return t.EventBatch(
        vm=vm_name,
        seq=np.array(msg.seq, dtype=np.uint64),
        gpa=np.array(msg.gpa, dtype=np.uint64),
        length=np.array(msg.length, dtype=np.uint32),
        vcpu=np.array(msg.vcpu, dtype=np.uint32),
        flags=np.array(msg.flags, dtype=np.uint32),
        timestamp_ns=np.array(msg.timestamp_ns, dtype=np.uint64),
        data=msg.data,
        head_seq=msg.head_seq,
    )


def gap(msg: pb.Gap) -> t.Gap:
    """A Gap."""
    return t.Gap(
        first_seq=msg.first_seq,
        last_seq=msg.last_seq,
        count=msg.count,
        reason=from_pb(t.GapReason, msg.reason, t.GapReason.UNSPECIFIED),
    )


def region_removed(msg: pb.RegionRemoved) -> t.RegionRemoved:
    """A RegionRemoved record."""
    return t.RegionRemoved(
        slot=msg.slot,
        base_gfn=msg.base_gfn,
        npages=msg.npages,
        change=from_pb(t.MemslotChange, msg.change, t.MemslotChange.NONE),
        new_base_gfn=msg.new_base_gfn,
        at_seq=msg.at_seq,
    )


def progress(msg: pb.Progress) -> t.Progress:
    """A Progress record."""
    return plain(t.Progress, msg)


def closed(msg: pb.Closed) -> t.Closed:
    """A Closed record."""
    return t.Closed(
        reason=from_pb(t.CloseReason, msg.reason, t.CloseReason.UNSPECIFIED),
        last_seq=msg.last_seq,
    )
