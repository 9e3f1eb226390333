"""With ``durability = "journal"`` a TTL lease is as durable as any other acknowledged
change: one made before a SIGKILL is there after the restart, with the tracking held
under it, and one revoked before the SIGKILL stays gone."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemon, Daemons, wait_for

ARGS = ("--durability", "journal")
PAGES = 16


def _vm(d: Daemon, name: str = "vm1") -> None:
    d.stub("VmService").CreateVm(pb.CreateVmRequest(name=name))
    d.stub("MemoryService").SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=0, npages=PAGES)
    )


def _lease(d: Daemon, label: str, gfns: list[int]) -> str:
    lease_id: str = d.stub("LeaseService").CreateLease(
        pb.CreateLeaseRequest(ttl_ms=600_000, label=label)
    ).lease.id
    if gfns:
        d.stub("TrackingService").AddTracking(
            pb.TrackingChangeRequest(vm="vm1", gfns=gfns, lease_id=lease_id)
        )
    return lease_id


def _leases(d: Daemon) -> dict[str, tuple[str, int]]:
    """lease id -> (label, references held)"""
    got = d.stub("LeaseService").ListLeases(pb.ListLeasesRequest()).leases
    return {le.id: (le.label, le.references) for le in got}


def _tracked(d: Daemon) -> int:
    count: int = d.stub("VmService").GetVm(pb.GetVmRequest(vm="vm1")).vm.tracked_gfns
    return count


def _clean(d: Daemon) -> None:
    log = d.log_text()
    for bad in ("journal.replay_failed", "journal.seq_differs", "journal.lease_replay_failed"):
        assert bad not in log, log


def _gone(d: Daemon, lease_id: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        d.stub("LeaseService").KeepAliveLease(pb.KeepAliveLeaseRequest(lease_id=lease_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_lease_acknowledged_before_sigkill_is_there_after_restart(
    daemons: Daemons, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    d = daemons.start(*ARGS, "--save-interval", "3600", state_dir=state)
    _vm(d)
    kept = _lease(d, "kept", [3, 7])
    revoked = _lease(d, "revoked", [7, 9])
    d.stub("LeaseService").RevokeLease(pb.RevokeLeaseRequest(lease_id=revoked))
    assert _tracked(d) == 2
    d.kill()  # no save ever ran: only the journal holds the leases

    d = daemons.start(*ARGS, "--save-interval", "3600", state_dir=state)
    _clean(d)
    assert _leases(d) == {kept: ("kept", 2)}
    assert _tracked(d) == 2
    _gone(d, revoked)
    d.stub("LeaseService").KeepAliveLease(pb.KeepAliveLeaseRequest(lease_id=kept))
    r = d.stub("LeaseService").RevokeLease(pb.RevokeLeaseRequest(lease_id=kept))
    assert (r.released_references, r.untracked_gfns) == (2, 2)
    assert _tracked(d) == 0
    assert d.stop() == 0


def test_leases_made_and_ended_after_a_save_replay_over_it(
    daemons: Daemons, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    d = daemons.start(*ARGS, "--save-interval", "0.2", state_dir=state)
    _vm(d)
    old = _lease(d, "old", [1, 2])
    ended = _lease(d, "ended", [5])

    def saved() -> bool:
        body = json.loads((state / "leases.json").read_text())["body"]
        return {r["lease_id"] for r in body["leases"]} == {old, ended}

    wait_for(lambda: (state / "leases.json").exists() and saved(),
             what="a save holding both leases")
    d.stub("LeaseService").RevokeLease(pb.RevokeLeaseRequest(lease_id=ended))
    new = _lease(d, "new", [2, 11])
    d.kill()

    d = daemons.start(*ARGS, "--save-interval", "3600", state_dir=state)
    _clean(d)
    leases = _leases(d)
    assert leases[old] == ("old", 2)
    assert leases[new] == ("new", 2)
    assert ended not in leases
    _gone(d, ended)
    assert _tracked(d) == 3  # 1, 2, 11: gfn 5 went with the ended lease
    assert d.stop() == 0
