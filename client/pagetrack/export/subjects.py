"""Subjects, headers and payloads of exported messages, and the export position they
record.

A VM's records go to ``<prefix>.<tenant>.<vm>.events``, ``.gaps`` and ``.regions``. Every
message names its VM and seq range in headers; ``Nats-Msg-Id`` is made from them, so a
publish repeated within the stream's duplicate window is stored once. Names may hold
``.``, which separates subject tokens, so ``%`` and ``.`` are percent-escaped.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass

from pagetrack.v1 import pagetrack_pb2 as pb

KINDS = ("events", "gaps", "regions")

H_MSG_ID = "Nats-Msg-Id"
H_CONTENT_TYPE = "Content-Type"
H_TENANT = "Pagetrack-Tenant"
H_VM = "Pagetrack-Vm"
H_KIND = "Pagetrack-Kind"
H_FIRST_SEQ = "Pagetrack-First-Seq"
H_LAST_SEQ = "Pagetrack-Last-Seq"
H_COUNT = "Pagetrack-Count"  #: events in the batch, or lost in the gap
H_GAP_REASON = "Pagetrack-Gap-Reason"
H_AT_SEQ = "Pagetrack-At-Seq"  #: regions: the VM's seq when the region went
H_REGION_INDEX = "Pagetrack-Region-Index"  #: regions: its place among those at one seq
H_INCARNATION = "Pagetrack-Incarnation"  #: the daemon run that sent it, when it says

CT_PROTOBUF = "application/x-protobuf; messageType=pagetrack.v1.{}"
CT_JSON = "application/json"
CT_JSONL = "application/x-ndjson"


def token(name: str) -> str:
    """``name`` as one subject token."""
    return name.replace("%", "%25").replace(".", "%2E")


def subject(prefix: str, tenant: str, vm: str, kind: str) -> str:
    """The subject of one VM's records of ``kind`` (events, gaps or regions)."""
    return f"{prefix}.{token(tenant)}.{token(vm)}.{kind}"


@dataclass(frozen=True, slots=True)
class Position:
    """How far a VM's export has got in JetStream: the newest seq stored as an event or in
    a gap (0 = none), and the newest region record stored (its at_seq and index; -1 =
    none)."""

    last_seq: int = 0
    region_at_seq: int = -1
    region_index: int = -1

    def region_done(self, at_seq: int, index: int) -> bool:
        """Whether the region record (at_seq, index) is already stored."""
        return (at_seq, index) <= (self.region_at_seq, self.region_index)


def position(last: Mapping[str, Mapping[str, str] | None]) -> Position:
    """The position from the headers of the last message on each kind's subject (None
    where the subject holds none)."""
    seqs = [int(h[H_LAST_SEQ]) for k in ("events", "gaps") if (h := last.get(k))]
    region = last.get("regions")
    if region:
        return Position(max(seqs, default=0), int(region[H_AT_SEQ]),
                        int(region[H_REGION_INDEX]))
    return Position(max(seqs, default=0))


class Encoder:
    """Builds the headers and payload of each exported record for one VM."""

    def __init__(self, tenant: str, vm: str, fmt: str, incarnation: str = "") -> None:
        self.tenant = tenant
        self.vm = vm
        self.jsonl = fmt == "jsonl"
        self.incarnation = incarnation
        self._id = f"{token(tenant)}.{token(vm)}"

    def _headers(self, kind: str, first: int, last: int, msg_id: str) -> dict[str, str]:
        out = {
            H_MSG_ID: msg_id, H_TENANT: self.tenant, H_VM: self.vm, H_KIND: kind,
            H_FIRST_SEQ: str(first), H_LAST_SEQ: str(last),
        }
        if self.incarnation:
            out[H_INCARNATION] = self.incarnation
        return out

    def events(self, batch: pb.EventBatch) -> tuple[dict[str, str], bytes]:
        """One message for an EventBatch."""
        first, last = batch.seq[0], batch.seq[-1]
        h = self._headers("events", first, last, f"{self._id}.e.{first}-{last}")
        h[H_COUNT] = str(len(batch.seq))
        if self.jsonl:
            h[H_CONTENT_TYPE] = CT_JSONL
            return h, _events_jsonl(batch)
        h[H_CONTENT_TYPE] = CT_PROTOBUF.format("EventBatch")
        return h, batch.SerializeToString()

    def gap(self, gap: pb.Gap) -> tuple[dict[str, str], bytes]:
        """One message for a Gap."""
        h = self._headers("gaps", gap.first_seq, gap.last_seq,
                          f"{self._id}.g.{gap.first_seq}-{gap.last_seq}")
        reason = pb.GapReason.Name(gap.reason).removeprefix("GAP_REASON_")
        h[H_COUNT] = str(gap.count)
        h[H_GAP_REASON] = reason
        if self.jsonl:
            h[H_CONTENT_TYPE] = CT_JSON
            doc = {"first_seq": gap.first_seq, "last_seq": gap.last_seq, "count": gap.count,
                   "reason": reason}
            return h, json.dumps(doc).encode() + b"\n"
        h[H_CONTENT_TYPE] = CT_PROTOBUF.format("Gap")
        return h, gap.SerializeToString()

    def region(self, rec: pb.RegionRemoved, index: int) -> tuple[dict[str, str], bytes]:
        """One message for a RegionRemoved record, the ``index``-th at its at_seq."""
        h = self._headers("regions", rec.at_seq, rec.at_seq,
                          f"{self._id}.r.{rec.at_seq}.{index}")
        h[H_AT_SEQ] = str(rec.at_seq)
        h[H_REGION_INDEX] = str(index)
        if self.jsonl:
            h[H_CONTENT_TYPE] = CT_JSON
            doc = {"slot": rec.slot, "base_gfn": rec.base_gfn, "npages": rec.npages,
                   "change": pb.MemslotChange.Name(rec.change).removeprefix("MEMSLOT_CHANGE_"),
                   "new_base_gfn": rec.new_base_gfn, "at_seq": rec.at_seq}
            return h, json.dumps(doc).encode() + b"\n"
        h[H_CONTENT_TYPE] = CT_PROTOBUF.format("RegionRemoved")
        return h, rec.SerializeToString()


def _events_jsonl(batch: pb.EventBatch) -> bytes:
    lines = []
    data = batch.data
    offset = 0
    for seq, gpa, length, vcpu, flags, ts in zip(
        batch.seq, batch.gpa, batch.length, batch.vcpu, batch.flags, batch.timestamp_ns,
        strict=True,
    ):
        doc: dict[str, object] = {"seq": seq, "gpa": gpa, "length": length, "vcpu": vcpu,
                                  "flags": flags, "timestamp_ns": ts}
        if not flags & pb.EVENT_FLAG_DATA_OMITTED:
            doc["data"] = base64.b64encode(data[offset:offset + length]).decode()
            offset += length
        lines.append(json.dumps(doc))
    return ("\n".join(lines) + "\n").encode()
