"""The consistent-hash ring that places VMs on daemons by name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagetrack import InvalidArgument
from pagetrack.placement import DEFAULT_VNODES, HashRing, stable_hash
from pagetrack.sharded import split_targets

TARGETS = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
NAMES = [f"vm-{i}" for i in range(10_000)]


def test_placement_is_deterministic_across_instances_orders_and_processes() -> None:
    """The same targets, in any order or in another process (another PYTHONHASHSEED),
    place every name the same way; the hash is pinned so it cannot drift."""
    a = HashRing(TARGETS)
    b = HashRing(list(reversed(TARGETS)) + [TARGETS[0]])
    assert b.targets == (TARGETS[2], TARGETS[1], TARGETS[0])
    assert [a.owner(n) for n in NAMES] == [b.owner(n) for n in NAMES]
    assert stable_hash("vm-0") == 0xA1049844800EAA0A  # BLAKE2b-64, big-endian
    code = (
        "from pagetrack.placement import HashRing;"
        f"r = HashRing({TARGETS!r});"
        "print(','.join(r.owner(f'vm-{i}') for i in range(200)))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ",".join(a.owner(f"vm-{i}") for i in range(200))


def test_pinned_placements() -> None:
    """A few placements written down: a change of hash or ring layout would move VMs
    between daemons that already hold them, so it must be deliberate."""
    ring = HashRing(TARGETS)
    assert ring.vnodes == DEFAULT_VNODES
    assert {n: ring.owner(n) for n in ("vm-0", "vm-1", "vm-2", "db")} == {
        "vm-0": "10.0.0.1:50051",
        "vm-1": "10.0.0.2:50051",
        "vm-2": "10.0.0.3:50051",
        "db": "10.0.0.1:50051",
    }


def test_balanced_over_three_targets() -> None:
    """10,000 names over 3 targets: each gets its third within 15%."""
    shares = HashRing(TARGETS).shares(NAMES)
    even = len(NAMES) / 3
    assert sum(shares.values()) == len(NAMES)
    for target, n in shares.items():
        assert abs(n - even) / even < 0.15, (target, shares)


def test_balanced_for_other_target_sets() -> None:
    """Not only for one lucky set of addresses: ten more sets of three, each within 15%."""
    for k in range(10):
        targets = [f"pagetrackd-{k}-{i}.pagetrackd.svc:50051" for i in range(3)]
        shares = HashRing(targets).shares(NAMES[:6000])
        assert all(abs(n - 2000) < 300 for n in shares.values()), shares


def test_adding_a_target_moves_about_a_quarter() -> None:
    """A 4th target takes about 1/4 of the names, every moved name goes to it, and the
    rest stay where they were; removing it puts exactly those back."""
    three = HashRing(TARGETS)
    four = HashRing([*TARGETS, "10.0.0.4:50051"])
    moved = [n for n in NAMES if three.owner(n) != four.owner(n)]
    assert 0.18 < len(moved) / len(NAMES) < 0.32, len(moved)
    assert {four.owner(n) for n in moved} == {"10.0.0.4:50051"}
    # Removing a target moves only its own names.
    two = HashRing(TARGETS[:2])
    for n in NAMES:
        if three.owner(n) != TARGETS[2]:
            assert two.owner(n) == three.owner(n)


def test_one_target_owns_everything_and_bad_rings_are_refused() -> None:
    ring = HashRing(["only:1"], vnodes=1)
    assert {ring.owner(n) for n in NAMES[:100]} == {"only:1"}
    assert "only:1" in ring and len(ring) == 1
    with pytest.raises(ValueError, match="at least one target"):
        HashRing([])
    with pytest.raises(ValueError, match="vnodes"):
        HashRing(TARGETS, vnodes=0)


def test_split_targets() -> None:
    """Comma lists and lists are normalized (a bare host gets port 50051), deduplicated."""
    assert split_targets("a, b:1,,unix:/x.sock,a:50051") == ["a:50051", "b:1", "unix:/x.sock"]
    assert split_targets(["h1", "h2:7"]) == ["h1:50051", "h2:7"]
    with pytest.raises(InvalidArgument, match="no targets"):
        split_targets(" , ")

