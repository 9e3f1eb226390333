"""Findings: what a plugin reports about a VM, as records of the VM's event stream.

A finding takes the VM's next seq, exactly like a write event, so a Watch stream
delivers it in seq order with the events around it, a client resumes across it, and
the history keeps (and the state directory saves) it. KVM has no such thing: its
in-kernel users report to their own consumers; pagetrack carries their reports on the
same stream as the writes that caused them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pagetrackd.domain.errors import InvalidArgument

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm

#: bounds on what one finding may carry (a finding lives in every stream queue and the
#: history, so its size is bounded like an event's)
MAX_KIND = 64
MAX_MESSAGE = 1024
MAX_DETAILS = 32
MAX_DETAIL_TEXT = 256
#: highest gfn a finding may name (52-bit guest physical addresses)
MAX_GFN = (1 << 40) - 1
#: what holding one finding costs beyond its text: the object, its mapping, a queue slot
FINDING_BYTES = 400


@dataclass(frozen=True, slots=True)
class Finding:
    """One report: ``plugin`` saw something of ``kind`` over the gfns
    ``[first_gfn, first_gfn + npages)`` (``npages`` 0: about no gfn in particular).
    ``seq`` is its place in the VM's stream and ``ts_ns`` when it was published
    (both set by :func:`publish_finding`)."""

    plugin: str
    kind: str
    first_gfn: int
    npages: int
    message: str
    details: Mapping[str, str] = field(default_factory=dict)
    seq: int = 0
    ts_ns: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes the finding holds in a queue or the history."""
        text = len(self.plugin) + len(self.kind) + len(self.message)
        return FINDING_BYTES + text + sum(len(k) + len(v) for k, v in self.details.items())

    def overlaps(self, start: int, count: int) -> bool:
        """Whether the finding's gfns meet ``[start, start + count)``."""
        return self.first_gfn < start + count and start < self.first_gfn + self.npages


@runtime_checkable
class FindingNotifier(Protocol):
    """A notifier that keeps findings (the history and the Watch streams)."""

    def track_finding(self, vm: Vm, finding: Finding) -> None:
        """A finding was published; its seq is the VM's newest."""


def check_finding(finding: Finding) -> None:
    """Raise InvalidArgument for a finding that breaks the bounds above."""
    if not finding.kind or len(finding.kind) > MAX_KIND:
        raise InvalidArgument(f"finding kind must be 1..{MAX_KIND} characters")
    if len(finding.message) > MAX_MESSAGE:
        raise InvalidArgument(f"finding message is over {MAX_MESSAGE} characters")
    if not 0 <= finding.first_gfn <= MAX_GFN or not 0 <= finding.npages <= MAX_GFN:
        raise InvalidArgument(
            f"finding gfn range {finding.first_gfn}+{finding.npages}: first_gfn"
            f" 0..{MAX_GFN}, npages 0..{MAX_GFN} (0: no gfns)"
        )
    if len(finding.details) > MAX_DETAILS:
        raise InvalidArgument(f"finding has {len(finding.details)} details; at most {MAX_DETAILS}")
    for key, value in finding.details.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument("finding details map text to text")
        if not key or len(key) > MAX_DETAIL_TEXT or len(value) > MAX_DETAIL_TEXT:
            raise InvalidArgument(
                f"finding detail {key[:40]!r}: key 1..{MAX_DETAIL_TEXT}, value"
                f" 0..{MAX_DETAIL_TEXT} characters"
            )


def publish_finding(vm: Vm, finding: Finding) -> Finding:
    """Give ``finding`` the VM's next seq and hand it to every notifier that keeps
    findings (the history, Watch streams). Returns the finding as published.

    Events a batched write still holds back are handed over first, so every stream
    sees the finding after the write that caused it. Raises InvalidArgument (nothing
    changes) for a finding that breaks the bounds.
    """
    check_finding(finding)
    notifiers = vm.notifiers
    if notifiers.flush is not None:
        notifiers.flush()
    vm.seq += 1
    published = Finding(
        finding.plugin, finding.kind, finding.first_gfn, finding.npages, finding.message,
        dict(finding.details), vm.seq, time.time_ns(),
    )
    for node in notifiers.batch:
        if node.active and isinstance(node.notifier, FindingNotifier):
            node.notifier.track_finding(vm, published)
    return published


def finding_record(finding: Finding) -> dict[str, object]:
    """A finding as JSON-able data (how the state directory saves it)."""
    return {
        "seq": finding.seq, "plugin": finding.plugin, "kind": finding.kind,
        "first_gfn": finding.first_gfn, "npages": finding.npages,
        "message": finding.message, "details": dict(finding.details), "ts_ns": finding.ts_ns,
    }


def finding_from_record(rec: object) -> Finding:
    """A finding back from :func:`finding_record`; InvalidArgument if malformed."""
    if not isinstance(rec, dict):
        raise InvalidArgument("saved finding is not an object")
    ints = {k: rec.get(k) for k in ("seq", "first_gfn", "npages", "ts_ns")}
    texts = {k: rec.get(k) for k in ("plugin", "kind", "message")}
    details = rec.get("details", {})
    if (
        not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints.values())
        or not all(isinstance(v, str) for v in texts.values())
        or not isinstance(details, dict)
    ):
        raise InvalidArgument("saved finding is malformed")
    finding = Finding(
        str(texts["plugin"]), str(texts["kind"]), int(ints["first_gfn"] or 0),
        int(ints["npages"] or 0), str(texts["message"]), details,
        int(ints["seq"] or 0), int(ints["ts_ns"] or 0),
    )
    check_finding(finding)
    if finding.seq < 1:
        raise InvalidArgument("saved finding has no seq")
    return finding


__all__ = [
    "Finding",
    "FindingNotifier",
    "check_finding",
    "finding_from_record",
    "finding_record",
    "publish_finding",
]
