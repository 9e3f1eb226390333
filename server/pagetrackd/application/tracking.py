"""Write-tracking use cases: add and remove references (under the tenant or a lease), and
query what the track pool holds without stalling the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pagetrackd.application import slices
from pagetrackd.domain import InvalidArgument, TenantId, Unavailable, Vm
from pagetrackd.domain.tracking import gfns_from
from pagetrackd.domain.types import TrackInfo

if TYPE_CHECKING:
    from pagetrackd.application.engine import Engine

#: the most gfns one QueryTracking reports: the answer (~35 bytes a gfn with owners) is
#: encoded on the event loop in some 20 ms, and stays well within grpc's default 4 MiB
QUERY_MAX_GFNS = 1 << 13
#: gfns QueryTracking answers per turn of the event loop (a few ms of work)
QUERY_CHUNK = 512
#: times a large query starts over when tracking changes under it
QUERY_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class GfnSelection:
    """Gfns a request names: (start, count) ranges and single gfns (as uint64, so a
    value past 2^63 is refused instead of wrapping negative)."""

    ranges: Sequence[tuple[int, int]]
    gfns: npt.NDArray[np.uint64]

    @property
    def total(self) -> int:
        """Gfns named, repeats counted."""
        return sum(count for _, count in self.ranges) + len(self.gfns)


@dataclass(frozen=True, slots=True)
class TrackingChange:
    """What an add or remove did."""

    references: int  #: references added or removed
    transitions: int  #: gfns that became tracked (add) or untracked (remove)
    tracked_gfns: int  #: the VM's tracked gfns afterwards


@dataclass(frozen=True, slots=True)
class QueryPart:
    """Part of a query's answer; ``fresh`` means tracking changed and the answer
    starts over with this part."""

    fresh: bool
    items: list[tuple[TrackInfo, int | None]]  #: each gfn's state and memslot id


def _check_gfn_space(vm: Vm, sel: GfnSelection) -> None:
    """Every gfn named is below 2^gfn_bits."""
    limit = vm.limits.gfn_limit
    for start, count in sel.ranges:
        if start + count > limit:
            raise InvalidArgument(
                f"gfn range start={start:#x} count={count:#x} passes the VM's"
                f" {vm.limits.gfn_bits}-bit gfn space (last gfn {limit - 1:#x})",
                field="ranges",
            )
    if len(sel.gfns) and int(sel.gfns.max()) >= limit:
        raise InvalidArgument(
            f"gfn {int(sel.gfns.max()):#x} is outside the VM's {vm.limits.gfn_bits}-bit gfn"
            f" space (last gfn {limit - 1:#x})",
            field="gfns",
        )


def _gfns(vm: Vm, sel: GfnSelection, most: int) -> npt.NDArray[np.int64]:
    total = sel.total
    if total > most:
        raise InvalidArgument(f"{total} gfns in one request; at most {most}")
    if total == 0:
        raise InvalidArgument("name at least one gfn (ranges or gfns)")
    _check_gfn_space(vm, sel)
    return gfns_from(sel.ranges, sel.gfns)


async def add_tracking(
    engine: Engine, tenant: TenantId, name: str, sel: GfnSelection, lease_id: str, most: int
) -> TrackingChange:
    """Track gfns under the tenant (``lease_id`` "") or a lease, within its quotas (in
    slices when many: see :mod:`.slices`)."""
    entry = engine.vm(tenant, name)
    owner = engine.lease_owner(tenant, lease_id)
    gfns = _gfns(entry.vm, sel, most)
    started = await slices.change_tracking(engine, entry, gfns, owner, lease_id, add=True)
    return TrackingChange(len(gfns), started, entry.vm.tracked_count)


async def remove_tracking(
    engine: Engine, tenant: TenantId, name: str, sel: GfnSelection, lease_id: str, most: int
) -> TrackingChange:
    """Drop references the tenant (or the lease) holds (in slices when many)."""
    entry = engine.vm(tenant, name)
    owner = engine.lease_owner(tenant, lease_id)
    gfns = _gfns(entry.vm, sel, most)
    stopped = await slices.change_tracking(engine, entry, gfns, owner, lease_id, add=False)
    return TrackingChange(len(gfns), stopped, entry.vm.tracked_count)


def _query_gfns(vm: Vm, sel: GfnSelection, only_tracked: bool) -> tuple[list[int], bool]:
    if not sel.ranges and not len(sel.gfns):
        if not only_tracked:
            raise InvalidArgument("name gfns or ranges, or set only_tracked to list all")
        gfns = vm.tracked_gfns()
        only_tracked = False  # tracked_gfns() lists only tracked ones
    else:
        if sel.total > QUERY_MAX_GFNS:
            raise InvalidArgument(
                f"{sel.total} gfns in one query; at most {QUERY_MAX_GFNS} (query a range at"
                " a time)"
            )
        _check_gfn_space(vm, sel)
        gfns = gfns_from(sel.ranges, sel.gfns)
    if len(gfns) > QUERY_MAX_GFNS:
        raise InvalidArgument(
            f"{len(gfns)} gfns to report; at most {QUERY_MAX_GFNS} at once: query the"
            " tracked gfns a range at a time"
        )
    return gfns.tolist(), only_tracked


async def query_tracking(
    engine: Engine, tenant: TenantId, name: str, sel: GfnSelection, only_tracked: bool
) -> AsyncIterator[QueryPart]:
    """Each gfn's tracking state, QUERY_CHUNK gfns per turn of the event loop so a
    large query does not stall other calls; if tracking or memslots change in between,
    the answer starts over (a part with ``fresh``), so it is one consistent view."""
    vm = engine.vm(tenant, name).vm
    wanted, only_tracked = _query_gfns(vm, sel, only_tracked)
    for _ in range(QUERY_ATTEMPTS):
        gen = vm.generation
        for k in range(0, len(wanted), QUERY_CHUNK) or [0]:
            if k:
                await asyncio.sleep(0)
                if vm.closed or vm.generation != gen:
                    break
            part = wanted[k : k + QUERY_CHUNK]
            if only_tracked:
                part = [g for g in part if vm.is_tracked(g)]
            items = []
            for info in vm.track_query(part):
                slot = vm.slots.find(info.gfn)
                items.append((info, None if slot is None else slot.info.slot_id))
            yield QueryPart(k == 0, items)
        else:
            return
        vm = engine.vm(tenant, name).vm  # NotFound once deleted
    raise Unavailable(
        f"tracking of VM {name!r} kept changing while {len(wanted)} gfns were"
        " queried; retry, or query fewer gfns at once"
    )
