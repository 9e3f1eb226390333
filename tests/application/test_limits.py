"""Every limit and default lives in pagetrackd.limits; the other places read it from there."""

from __future__ import annotations

import re
from pathlib import Path

from pagetrackd import limits
from pagetrackd.application import EngineConfig
from pagetrackd.config import Config
from pagetrackd.domain import Vm, VmLimits
from pagetrackd.leases import LeaseTable
from pagetrackd.plugins.catalog import Catalog

SERVER = Path(__file__).resolve().parents[2] / "server" / "pagetrackd"


def test_defaults_come_from_the_limits_module() -> None:
    """The engine, the config, the domain and the lease table use the one module's values."""
    assert EngineConfig().history_events == Config().history_events == limits.DEFAULT_HISTORY_EVENTS
    assert EngineConfig().history_bytes == Config().history_bytes == limits.DEFAULT_HISTORY_BYTES
    assert EngineConfig().plugin_failure_limit == limits.DEFAULT_PLUGIN_FAILURE_LIMIT
    assert Config().plugin_failure_limit == limits.DEFAULT_PLUGIN_FAILURE_LIMIT
    assert Catalog().failure_limit == limits.DEFAULT_PLUGIN_FAILURE_LIMIT
    assert VmLimits().max_slots == limits.DEFAULT_MEMSLOTS
    assert VmLimits().gfn_bits == limits.DEFAULT_GFN_BITS
    assert VmLimits().max_write_bytes == limits.ServerLimits().max_write_bytes
    assert Vm("v").vcpus == limits.DEFAULT_VCPUS
    table = LeaseTable(lambda lease: None)
    for ttl in (limits.MIN_LEASE_TTL_MS, limits.MAX_LEASE_TTL_MS):
        table.create("t", ttl)  # type: ignore[arg-type]


def test_cli_help_names_the_daemons_default_vcpus() -> None:
    """The client does not import the daemon, so its help text is checked here."""
    cli = (SERVER.parents[1] / "client" / "pagetrack" / "cli.py").read_text()
    assert f"Number of vCPUs (default {limits.DEFAULT_VCPUS})." in cli


def test_no_copies_of_moved_limits_in_the_server() -> None:
    """Literals that used to be repeated beside the checks are not written again."""
    copies = re.compile(
        r"24 \* 3600 \* 1000|max_vcpus=8\b|else 8,|<= 32768|MIN_TTL_MS = |MAX_TTL_MS = "
    )
    found = [
        f"{path.relative_to(SERVER)}:{n}"
        for path in SERVER.rglob("*.py")
        if path.name != "limits.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if copies.search(line)
    ]
    assert found == []
