"""Which events and findings a Watch stream wants: gfn ranges, sources, an owner's
tracked gfns, plugins."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pagetrackd.domain.errors import InvalidArgument
from pagetrackd.domain.events import EventBatch, WriteEvent
from pagetrackd.domain.findings import Finding
from pagetrackd.domain.types import PAGE_SHIFT, Source

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a stream wants. Empty ``ranges`` means every gfn; ``sources`` None
    means both; ``owner`` keeps only gfns that owner holds a tracking reference on.
    Findings pass when their gfns meet a range and, with ``plugins``, when one of those
    plugins published them; ``only_findings`` lets no write event through."""

    ranges: tuple[tuple[int, int], ...] = ()
    sources: frozenset[Source] | None = None
    owner: str | None = None
    plugins: frozenset[str] | None = None
    only_findings: bool = False

    @property
    def filters_events(self) -> bool:
        """Whether some write event may be filtered out."""
        return bool(
            self.ranges or self.sources is not None or self.owner is not None
            or self.only_findings
        )

    def passes_finding(self, finding: Finding) -> bool:
        """Whether a finding passes."""
        if self.plugins is not None and finding.plugin not in self.plugins:
            return False
        return not self.ranges or any(finding.overlaps(s, c) for s, c in self.ranges)

    def mask(self, vm: Vm, batch: EventBatch) -> npt.NDArray[np.bool_] | None:
        """Which events of ``batch`` pass, or None when all do."""
        if self.only_findings:
            return np.zeros(len(batch), dtype=np.bool_)
        keep: npt.NDArray[np.bool_] | None = None
        if self.ranges:
            gfn = (batch.gpa >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            keep = np.zeros(len(batch), dtype=np.bool_)
            for start, count in self.ranges:
                keep |= (gfn >= start) & (gfn < start + count)
        if self.sources is not None:
            allowed = np.isin(batch.source, [int(s) for s in self.sources])
            keep = allowed if keep is None else keep & allowed
        if self.owner is not None:
            gfns = (batch.gpa >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            owned = np.isin(gfns, vm.tracked_gfns(self.owner))
            keep = owned if keep is None else keep & owned
        return keep

    def passes(self, vm: Vm, event: WriteEvent) -> bool:
        """Whether one event passes."""
        if self.only_findings:
            return False
        gfn = event.gpa >> PAGE_SHIFT
        if self.ranges and not any(s <= gfn < s + c for s, c in self.ranges):
            return False
        if self.sources is not None and event.source not in self.sources:
            return False
        if self.owner is not None:
            info = vm.track_query([gfn])[0]
            return info.owners.get(self.owner, 0) > 0
        return True


def make_filter(
    ranges: Sequence[tuple[int, int]] = (),
    sources: Sequence[Source] = (),
    owner: str | None = None,
    plugins: Sequence[str] = (),
    only_findings: bool = False,
) -> Filter:
    """Validate and build a filter."""
    if len(plugins) > 64 or any(not p or len(p) > 128 for p in plugins):
        raise InvalidArgument(
            "filter plugins: at most 64 plugin names of 1..128 characters", field="plugins"
        )
    for start, count in ranges:
        if start < 0 or count <= 0:
            raise InvalidArgument(
                f"filter gfn range start={start} count={count}: start >= 0 and count > 0",
                field="gfn_ranges",
            )
    if len(ranges) > 1024:
        raise InvalidArgument(f"{len(ranges)} filter ranges; at most 1024", field="gfn_ranges")
    return Filter(
        tuple(ranges), frozenset(sources) if sources else None, owner or None,
        frozenset(plugins) if plugins else None, only_findings,
    )
