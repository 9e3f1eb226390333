"""TrackingService and LeaseService against a real daemon."""

from __future__ import annotations

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.integration.support import Api, expect_error, snapshot
from tests.waiting import until

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def test_add_remove_query_tracking(api: Api, vm: str) -> None:
    """Add counts references (a gfn named twice gets two), transitions count 0->1 and
    1->0; Query reports counters, owners and the large-page effects."""
    r = await api.track.AddTracking(
        pb.TrackingChangeRequest(vm=vm, ranges=[pb.GfnRange(start=0x100, count=3)],
                                 gfns=[0x101, 0x13F])
    )
    assert (r.references, r.transitions, r.tracked_gfns) == (5, 4, 4)
    q = await api.track.QueryTracking(
        pb.QueryTrackingRequest(vm=vm, gfns=[0x101, 0x13F, 0x103, 0x300], include_owners=True)
    )
    states = [(g.gfn, g.in_memslot, g.slot, g.counter, g.write_protected) for g in q.gfns]
    assert states == [
        (0x101, True, 0, 2, True), (0x13F, True, 0, 1, True), (0x103, True, 0, 0, False),
        (0x300, False, 0, 0, False),
    ]
    assert [(o.kind, o.count) for o in q.gfns[0].owners] == [(pb.OWNER_KIND_TENANT, 2)]
    assert q.gfns[0].lpage_2m_disallowed and q.gfns[0].lpage_1g_disallowed
    assert not q.gfns[2].lpage_2m_disallowed or q.gfns[2].counter == 0
    r = await api.track.RemoveTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x101, 0x100]))
    assert (r.references, r.transitions, r.tracked_gfns) == (2, 1, 3)
    listed = await api.track.QueryTracking(pb.QueryTrackingRequest(vm=vm, only_tracked=True))
    assert [g.gfn for g in listed.gfns] == [0x101, 0x102, 0x13F]
    only = await api.track.QueryTracking(
        pb.QueryTrackingRequest(vm=vm, ranges=[pb.GfnRange(start=0x100, count=4)],
                                only_tracked=True)
    )
    assert [g.gfn for g in only.gfns] == [0x101, 0x102]
    assert (await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.tracked_gfns == 3


BAD_CHANGE = [
    ({}, INVALID, "at least one gfn"),
    ({"ranges": [pb.GfnRange(start=0x100, count=0)]}, INVALID, "gfn"),
    ({"ranges": [pb.GfnRange(start=0x100, count=0)], "gfns": [0x100]}, INVALID, "count"),
    ({"gfns": [0x100, 0x300]}, PRECONDITION, "0x300"),
    ({"gfns": [2**40]}, INVALID, "gfn space"),
    ({"gfns": [2**64 - 1]}, INVALID, "gfn space"),
    ({"gfns": [2**63]}, INVALID, "gfn space"),
    ({"ranges": [pb.GfnRange(start=2**64 - 1, count=2)]}, INVALID, "gfn space"),
    ({"ranges": [pb.GfnRange(start=0x100, count=2**64 - 1)]}, INVALID, "at most"),
    ({"ranges": [pb.GfnRange(start=0x100, count=1 << 26)]}, INVALID, "at most"),
    ({"gfns": [0x100], "mode": 9}, INVALID, "mode"),
    ({"gfns": [0x100], "lease_id": "no-such-lease"}, grpc.StatusCode.NOT_FOUND, "no-such-lease"),
]


@pytest.mark.parametrize(("fields", "code", "needle"), BAD_CHANGE)
async def test_add_tracking_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, object], code: grpc.StatusCode, needle: str
) -> None:
    """Each malformed AddTracking field is refused naming the problem; the batch is
    atomic, so the valid gfns in it are not tracked either."""
    before = await snapshot(api, vm)
    await expect_error(
        api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, **fields)),  # type: ignore[arg-type]
        code, needle,
    )
    assert await snapshot(api, vm) == before


@pytest.mark.parametrize(("fields", "code", "needle"), BAD_CHANGE)
async def test_remove_tracking_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, object], code: grpc.StatusCode, needle: str
) -> None:
    """The same malformed fields are refused by RemoveTracking, changing nothing."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x100, 0x101]))
    before = await snapshot(api, vm)
    await expect_error(
        api.track.RemoveTracking(pb.TrackingChangeRequest(vm=vm, **fields)),  # type: ignore[arg-type]
        code, needle,
    )
    assert await snapshot(api, vm) == before


async def test_remove_tracking_not_held_is_failed_precondition(api: Api, vm: str) -> None:
    """Removing more references than held, or another owner's, is FAILED_PRECONDITION
    and removes none of the batch."""
    lease = (await api.lease.CreateLease(pb.CreateLeaseRequest(ttl_ms=60000))).lease
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x100, 0x101]))
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x102], lease_id=lease.id))
    before = await snapshot(api, vm)
    await expect_error(
        api.track.RemoveTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x100, 0x100])),
        PRECONDITION, "0x100",
    )
    await expect_error(
        api.track.RemoveTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x101, 0x102])),
        PRECONDITION, "0x102",
    )
    await expect_error(
        api.track.RemoveTracking(
            pb.TrackingChangeRequest(vm=vm, gfns=[0x100], lease_id=lease.id)
        ),
        PRECONDITION, "0x100",
    )
    assert await snapshot(api, vm) == before
    await api.lease.RevokeLease(pb.RevokeLeaseRequest(lease_id=lease.id))


async def test_counter_overflow_is_resource_exhausted(api: Api, vm: str) -> None:
    """A counter passing 65535 is RESOURCE_EXHAUSTED and nothing changes."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x110] * 65535))
    before = await snapshot(api, vm)
    await expect_error(
        api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x111, 0x110])),
        grpc.StatusCode.RESOURCE_EXHAUSTED, "65535",
    )
    assert await snapshot(api, vm) == before


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({}, "only_tracked"),
        ({"gfns": [0x100], "mode": 77}, "mode"),
        ({"gfns": [2**64 - 1]}, "gfn space"),
        ({"ranges": [pb.GfnRange(start=2**64 - 1, count=1)]}, "gfn space"),
        ({"ranges": [pb.GfnRange(start=0, count=(1 << 20) + 1)]}, "at most"),
        ({"ranges": [pb.GfnRange(start=0x100, count=0)], "gfns": [0x100]}, "count"),
    ],
)
async def test_query_tracking_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, object], needle: str
) -> None:
    """Malformed queries are INVALID_ARGUMENT naming the problem."""
    await expect_error(
        api.track.QueryTracking(pb.QueryTrackingRequest(vm=vm, **fields)),  # type: ignore[arg-type]
        INVALID, needle,
    )


@pytest.mark.parametrize("call", ["AddTracking", "RemoveTracking", "QueryTracking"])
async def test_tracking_on_unknown_vm_is_not_found(api: Api, call: str) -> None:
    """Tracking calls on an unknown VM are NOT_FOUND naming it."""
    req: object = (
        pb.QueryTrackingRequest(vm="ghost-vm", gfns=[1]) if call == "QueryTracking"
        else pb.TrackingChangeRequest(vm="ghost-vm", gfns=[1])
    )
    await expect_error(getattr(api.track, call)(req), grpc.StatusCode.NOT_FOUND, "ghost-vm")


# ------------------------------------------------------------------------------- leases


async def test_lease_lifecycle_releases_exactly_its_references(api: Api, vm: str) -> None:
    """Create, keep alive, list and revoke a lease; revoking releases only the
    references it holds."""
    lease = (
        await api.lease.CreateLease(pb.CreateLeaseRequest(ttl_ms=5000, label="tool"))
    ).lease
    assert lease.kind == pb.LEASE_KIND_TTL and lease.ttl_ms == 5000 and lease.label == "tool"
    assert lease.expires_at_ns > 0 and lease.references == 0 and 0 < len(lease.id) <= 64
    await api.track.AddTracking(
        pb.TrackingChangeRequest(vm=vm, gfns=[0x100, 0x101, 0x101], lease_id=lease.id)
    )
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x101]))
    q = await api.track.QueryTracking(pb.QueryTrackingRequest(vm=vm, gfns=[0x101],
                                                              include_owners=True))
    owners = {(o.kind, o.id, o.count) for o in q.gfns[0].owners}
    tenant = (await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.tenant
    assert tenant  # the tenant references are reported under the tenant's name
    assert owners == {(pb.OWNER_KIND_LEASE, lease.id, 2), (pb.OWNER_KIND_TENANT, tenant, 1)}
    kept = (await api.lease.KeepAliveLease(pb.KeepAliveLeaseRequest(lease_id=lease.id))).lease
    assert kept.expires_at_ns >= lease.expires_at_ns and kept.references == 3
    listed = (await api.lease.ListLeases(pb.ListLeasesRequest())).leases
    assert lease.id in {le.id for le in listed}
    r = await api.lease.RevokeLease(pb.RevokeLeaseRequest(lease_id=lease.id))
    assert (r.released_references, r.untracked_gfns) == (3, 1)
    q = await api.track.QueryTracking(pb.QueryTrackingRequest(vm=vm, only_tracked=True))
    assert [(g.gfn, g.counter) for g in q.gfns] == [(0x101, 1)]
    assert lease.id not in {le.id for le in (await api.lease.ListLeases(
        pb.ListLeasesRequest())).leases}


async def test_lease_expiry_releases_tracking(api: Api, vm: str) -> None:
    """A TTL lease that is not kept alive ends and its tracking goes with it."""
    lease = (await api.lease.CreateLease(pb.CreateLeaseRequest(ttl_ms=100))).lease
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x120], lease_id=lease.id))

    async def released() -> bool:
        return (await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.tracked_gfns == 0

    await until(released, "the expired lease's tracking to be released")
    await expect_error(
        api.lease.KeepAliveLease(pb.KeepAliveLeaseRequest(lease_id=lease.id)),
        grpc.StatusCode.NOT_FOUND, lease.id,
    )


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (pb.CreateLeaseRequest(ttl_ms=0), "ttl_ms"),
        (pb.CreateLeaseRequest(ttl_ms=99), "ttl_ms"),
        (pb.CreateLeaseRequest(ttl_ms=2**64 - 1), "ttl_ms"),
        (pb.CreateLeaseRequest(ttl_ms=1000, label="x" * 129), "label"),
    ],
)
async def test_create_lease_refuses_bad_fields(
    api: Api, req: pb.CreateLeaseRequest, needle: str
) -> None:
    """A TTL outside the limits or a long label is INVALID_ARGUMENT; no lease appears."""
    before = (await api.lease.ListLeases(pb.ListLeasesRequest())).leases
    await expect_error(api.lease.CreateLease(req), INVALID, needle)
    after = (await api.lease.ListLeases(pb.ListLeasesRequest())).leases
    assert {le.id for le in after} == {le.id for le in before}


@pytest.mark.parametrize("call", ["KeepAliveLease", "RevokeLease"])
async def test_lease_calls_refuse_missing_and_unknown_ids(api: Api, call: str) -> None:
    """An empty lease_id is INVALID_ARGUMENT, an unknown one NOT_FOUND."""
    req_type = getattr(pb, f"{call}Request")
    await expect_error(getattr(api.lease, call)(req_type()), INVALID, "lease_id")
    await expect_error(
        getattr(api.lease, call)(req_type(lease_id="f" * 300)), grpc.StatusCode.NOT_FOUND,
        "not found",
    )
