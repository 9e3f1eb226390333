"""Proto <-> domain conversions. Enum numbers differ (proto reserves 0 for UNSPECIFIED)."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.domain import (
    CostModel,
    DmaPolicy,
    InvalidArgument,
    Memslot,
    Semantics,
    SlotChange,
    SlotFlags,
    Source,
    TrackInfo,
    WritePath,
)
from pagetrackd.domain.arrays import uniform
from pagetrackd.domain.events import EventBatch
from pagetrackd.domain.findings import Finding
from pagetrackd.domain.hub import Gap, GapReason, RegionRemoved, SlowPolicy
from pagetrackd.domain.types import TENANT_OWNER

DMA_POLICY = {
    pb.DMA_POLICY_BYPASS: DmaPolicy.BYPASS,
    pb.DMA_POLICY_NOTIFY: DmaPolicy.NOTIFY,
    pb.DMA_POLICY_REJECT: DmaPolicy.REJECT,
}
DMA_POLICY_PB = {v: k for k, v in DMA_POLICY.items()}
SEMANTICS = {pb.SEMANTICS_2016: Semantics.V2016, pb.SEMANTICS_LINUX_6_6: Semantics.LINUX_6_6}
SEMANTICS_PB = {v: k for k, v in SEMANTICS.items()}
CHANGE_PB = {
    SlotChange.CREATE: pb.MEMSLOT_CHANGE_CREATE,
    SlotChange.MOVE: pb.MEMSLOT_CHANGE_MOVE,
    SlotChange.FLAGS_ONLY: pb.MEMSLOT_CHANGE_FLAGS_ONLY,
    SlotChange.DELETE: pb.MEMSLOT_CHANGE_DELETE,
    SlotChange.NONE: pb.MEMSLOT_CHANGE_UNSPECIFIED,
}
SOURCES = {pb.EVENT_SOURCE_GUEST: Source.GUEST, pb.EVENT_SOURCE_DMA: Source.DMA}
POLICY = {
    pb.SLOW_CONSUMER_POLICY_UNSPECIFIED: SlowPolicy.DROP,
    pb.SLOW_CONSUMER_POLICY_DROP: SlowPolicy.DROP,
    pb.SLOW_CONSUMER_POLICY_COALESCE: SlowPolicy.COALESCE,
    pb.SLOW_CONSUMER_POLICY_DISCONNECT: SlowPolicy.DISCONNECT,
    pb.SLOW_CONSUMER_POLICY_BLOCK: SlowPolicy.BLOCK,
}
POLICY_PB = {v: k for k, v in POLICY.items() if k != pb.SLOW_CONSUMER_POLICY_UNSPECIFIED}
PLUGIN_KIND = {pb.PLUGIN_KIND_SHADOW_MMU: "shadow_mmu", pb.PLUGIN_KIND_VGPU: "vgpu"}
PLUGIN_KIND_PB = {v: k for k, v in PLUGIN_KIND.items()}
WORKLOAD_KIND = {
    pb.WORKLOAD_KIND_GPU_PPGTT: "gpu-ppgtt",
    pb.WORKLOAD_KIND_GUEST_PAGETABLES: "guest-pagetables",
    pb.WORKLOAD_KIND_RANDOM_WRITES: "random-writes",
    pb.WORKLOAD_KIND_KERNEL_BUILD: "kernel-build",
}
WORKLOAD_KIND_PB = {v: k for k, v in WORKLOAD_KIND.items()}
WORKLOAD_STATE_PB = {
    "running": pb.WORKLOAD_STATE_RUNNING,
    "finished": pb.WORKLOAD_STATE_FINISHED,
    "stopped": pb.WORKLOAD_STATE_STOPPED,
    "failed": pb.WORKLOAD_STATE_FAILED,
}
GAP_REASON_PB = {
    GapReason.DROPPED: pb.GAP_REASON_QUEUE_OVERFLOW,
    GapReason.COALESCED: pb.GAP_REASON_COALESCED,
    GapReason.RESTART: pb.GAP_REASON_RESTART,
}


def enum_value(
    table: Mapping[Any, object], value: int, field: str, allow_unset: bool = True
) -> None:
    """Raise InvalidArgument for an enum number outside ``table``."""
    if value == 0 and allow_unset:
        return
    if value not in table:
        raise InvalidArgument(f"{field}: unknown value {value}")


def cost_model(msg: pb.CostModel, base: CostModel) -> CostModel:
    """A cost model from ``base`` with the fields the message sets."""
    return CostModel(
        mmio_exit_cycles=(
            msg.mmio_exit_cycles if msg.HasField("mmio_exit_cycles") else base.mmio_exit_cycles
        ),
        emulate_cycles=(
            msg.emulate_cycles if msg.HasField("emulate_cycles") else base.emulate_cycles
        ),
        fast_cycles=msg.fast_cycles if msg.HasField("fast_cycles") else base.fast_cycles,
        dma_cycles=msg.dma_cycles if msg.HasField("dma_cycles") else base.dma_cycles,
        host_hz=float(msg.host_hz) if msg.HasField("host_hz") else base.host_hz,
    )


def cost_model_pb(cost: CostModel) -> pb.CostModel:
    """The message form of a cost model."""
    return pb.CostModel(
        mmio_exit_cycles=cost.mmio_exit_cycles,
        emulate_cycles=cost.emulate_cycles,
        fast_cycles=cost.fast_cycles,
        dma_cycles=cost.dma_cycles,
        host_hz=int(cost.host_hz),
    )


def memslot_pb(slot: Memslot, tracked: int = 0, dirty: int = 0) -> pb.Memslot:
    """The message form of a memslot."""
    return pb.Memslot(
        slot=slot.slot_id,
        base_gfn=slot.base_gfn,
        npages=slot.npages,
        readonly=bool(slot.flags & SlotFlags.READONLY),
        log_dirty_pages=bool(slot.flags & SlotFlags.LOG_DIRTY_PAGES),
        tracked_gfns=tracked,
        dirty_pages=dirty,
    )


def path_pb(path: WritePath) -> pb.WritePath.ValueType:
    """WritePath to its proto number."""
    return pb.WritePath.ValueType(int(path) + 1)


def owner_pb(owner: str, count: int, tenant: str) -> pb.OwnerCount:
    """One owner's references on a gfn; the tenant's own are named by ``tenant``."""
    if owner == TENANT_OWNER:
        return pb.OwnerCount(kind=pb.OWNER_KIND_TENANT, id=tenant, count=count)
    kind, _, ident = owner.partition(":")
    k = {"lease": pb.OWNER_KIND_LEASE, "plugin": pb.OWNER_KIND_PLUGIN}.get(
        kind, pb.OWNER_KIND_UNSPECIFIED
    )
    return pb.OwnerCount(kind=k, id=ident, count=count)


def track_state_pb(
    info: TrackInfo, slot: int | None, owners: bool, tenant: str
) -> pb.GfnTrackState:
    """What the track pool knows of one gfn (``tenant``: the VM's tenant, who owns the
    tenant references)."""
    return pb.GfnTrackState(
        gfn=info.gfn,
        in_memslot=slot is not None,
        slot=slot or 0,
        counter=info.count,
        owners=(
            [owner_pb(o, c, tenant) for o, c in sorted(info.owners.items())] if owners else []
        ),
        write_protected=info.write_protected,
        lpage_2m_disallowed=info.lpage_disallowed_2m,
        lpage_1g_disallowed=info.lpage_disallowed_1g,
    )


#: EventBatch.flags of a guest write in WRITE mode (source bit 0 clear)
_WRITE_MODE_FLAGS = pb.TRACK_MODE_WRITE << 8


#: the one-byte varints (0..127): tags and small counts
_BYTE_VARINTS = tuple(bytes((v,)) for v in range(0x80))


def varint(value: int) -> bytes:
    """Protobuf's varint encoding of one unsigned value."""
    if 0 <= value < 0x80:
        return _BYTE_VARINTS[value]
    if 0x80 <= value < 0x4000:  # two bytes: a message's field lengths, mostly
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varints(values: npt.NDArray[Any]) -> bytes:
    """Protobuf's varint encoding of unsigned values, back to back (a packed field's
    payload), computed in bulk: upb's ``extend`` converts one Python int at a time."""
    if not values.size:
        return b""
    same = uniform(values)
    if same is not None:  # vcpu, length and flags usually are
        return varint(same) * values.size
    v = values.astype(np.uint64, copy=False)
    width = max(1, (int(v.max()).bit_length() + 6) // 7)  # bytes of the longest varint
    if width == 1:
        return v.astype(np.uint8).tobytes()
    # Row i holds value i's seven-bit groups, lowest first; every group but a value's
    # last carries the continuation bit.
    shifts = np.arange(0, 7 * width, 7, dtype=np.uint64)
    out = ((v[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
    if (int(v.min()).bit_length() + 6) // 7 == width:
        # Every value is as long as the longest (seqs and gpas of one batch usually).
        out[:, :-1] |= 0x80
        return out.tobytes()
    size = np.ones(v.size, dtype=np.int64)  # bytes of each varint
    for k in range(1, width):
        size += v >= np.uint64(1 << (7 * k))
    col = np.arange(width, dtype=np.int64)
    out |= (col < (size[:, None] - 1)).view(np.uint8) << 7
    return out[col < size[:, None]].tobytes()  # row-major: the values stay in order


_U64 = struct.Struct("<Q").pack


def _packed(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def events_wire(
    parts: Sequence[tuple[EventBatch, int]], head_seq: int, omit_data: bool
) -> bytes:
    """The wire form of an EventBatch message holding the events of ``parts`` ((batch,
    timestamp ns) pairs in seq order). The packed columns are encoded in bulk with
    numpy, far cheaper than extending each repeated field from Python ints."""
    base = _WRITE_MODE_FLAGS | (pb.EVENT_FLAG_DATA_OMITTED if omit_data else 0)
    if len(parts) == 1:
        only = parts[0][0]
        seq, gpa, length, vcpu, source, eflags = (
            only.seq, only.gpa, only.length, only.vcpu, only.source, only.flags
        )
    else:
        batches = [b for b, _ in parts]
        seq = np.concatenate([b.seq for b in batches])
        gpa = np.concatenate([b.gpa for b in batches])
        length = np.concatenate([b.length for b in batches])
        vcpu = np.concatenate([b.vcpu for b in batches])
        source = np.concatenate([b.source for b in batches])
        eflags = np.concatenate([b.flags for b in batches])
    # The domain's flag bits (FLAG_UNTRACKED) are the proto's EventFlag bits.
    one_source, one_flag = uniform(source), uniform(eflags)
    if one_source is not None and one_flag is not None:  # the usual case: no numpy
        flag_wire = varint(one_source | one_flag | base) * len(seq)
    else:
        flag_wire = varints((source.astype(np.uint32) | eflags) | np.uint32(base))
    wire = [
        _packed(1, seq.astype("<u8", copy=False).tobytes()),
        _packed(2, gpa.astype("<u8", copy=False).tobytes()),
        _packed(3, varints(length)),
        _packed(4, varints(vcpu)),
        _packed(5, flag_wire),
        _packed(6, b"".join(_U64(ts) * len(b) for b, ts in parts)),
    ]
    if not omit_data:
        data = parts[0][0].data if len(parts) == 1 else b"".join(b.data for b, _ in parts)
        if data:
            wire.append(b"\x3a" + varint(len(data)) + data)
    if head_seq:
        wire.append(b"\x40" + varint(head_seq))
    return b"".join(wire)


def events_response_wire(
    parts: Sequence[tuple[EventBatch, int]], head_seq: int, omit_data: bool
) -> bytes:
    """The wire form of a WatchResponse carrying those events (field 2, ``events``):
    the Watch stream sends it as it is, with no message object built and serialized."""
    inner = events_wire(parts, head_seq, omit_data)
    return b"\x12" + varint(len(inner)) + inner


def fill_events(
    msg: pb.EventBatch,
    parts: Sequence[tuple[EventBatch, int]],
    head_seq: int,
    omit_data: bool,
) -> None:
    """Fill ``msg`` (e.g. ``WatchResponse().events``, in place) with the events of
    ``parts``, by parsing :func:`events_wire`."""
    msg.MergeFromString(events_wire(parts, head_seq, omit_data))


def event_batch_pb(
    batch: EventBatch, ts_ns: int, head_seq: int, omit_data: bool
) -> pb.EventBatch:
    """A columnar event batch message, built from numpy columns in bulk."""
    msg = pb.EventBatch()
    fill_events(msg, ((batch, ts_ns),), head_seq, omit_data)
    return msg


def gap_pb(gap: Gap) -> pb.Gap:
    """A gap record."""
    return pb.Gap(
        first_seq=gap.first_seq,
        last_seq=gap.last_seq,
        count=gap.count,
        reason=GAP_REASON_PB[gap.reason],
    )


def region_pb(rec: RegionRemoved) -> pb.RegionRemoved:
    """A region-removed record."""
    msg = pb.RegionRemoved(base_gfn=rec.base_gfn, npages=rec.npages, at_seq=rec.at_seq)
    if rec.change is not None:
        msg.slot = rec.change.slot_id
        msg.change = CHANGE_PB[rec.change.change]
        msg.new_base_gfn = rec.change.new_base_gfn
    return msg


def finding_pb(finding: Finding) -> pb.Finding:
    """A plugin's finding."""
    return pb.Finding(
        seq=finding.seq, plugin=plugin_api_name(finding.plugin), kind=finding.kind,
        first_gfn=finding.first_gfn, npages=finding.npages, message=finding.message,
        details=dict(finding.details), timestamp_ns=finding.ts_ns,
    )


def plugin_api_name(name: str) -> str:
    """A plugin's name as the API spells it (built-ins with a dash)."""
    return name.replace("_", "-") if name in PLUGIN_KIND_PB else name


def gfn_ranges(ranges: Iterable[pb.GfnRange]) -> list[tuple[int, int]]:
    """(start, count) pairs from range messages."""
    return [(r.start, r.count) for r in ranges]


def now_ns() -> int:
    """Wall-clock time in ns."""
    return time.time_ns()
