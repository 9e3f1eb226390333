"""What every part of the application layer shares: the daemon's state, by tenant."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagetrackd.application.config import EngineConfig
from pagetrackd.application.entries import VmEntry, WorkloadRun
from pagetrackd.application.slices import VmLocks
from pagetrackd.domain import Registry, TenantId, Unavailable, Vm
from pagetrackd.leases import LeaseTable
from pagetrackd.plugins.budget import StateBudget
from pagetrackd.plugins.catalog import Catalog

if TYPE_CHECKING:
    from pagetrackd.application.snapshot_port import SnapshotFormat
    from pagetrackd.journal import Journal


class EngineBase:
    """The state the use cases share (each module of this package adds one job's
    operations on top of it; :class:`~pagetrackd.application.engine.Engine` is all of
    them). Nothing here is the wire's: the servicers translate."""

    #: every live lease (made by the Engine, which knows how a lease is released)
    leases: LeaseTable

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.registry = Registry()
        self.plugin_catalog = Catalog(
            self.config.plugins_allow, self.config.plugin_failure_limit
        )
        #: plugin name -> times it was detached for failing (metrics)
        self.plugin_failure_detaches: dict[str, int] = {}
        self.entries: dict[tuple[TenantId, str], VmEntry] = {}
        self.workloads: dict[str, WorkloadRun] = {}
        #: one lock per VM: the calls on a VM (and its workloads' slices) run one at a
        #: time, so a request done in slices is seen whole (see slices.py)
        self.vm_locks = VmLocks()
        self.shutting_down = asyncio.Event()
        self.started_ns = time.time_ns()
        #: this run of the daemon (Watch's Registered.incarnation)
        self.incarnation = uuid.uuid4().hex
        #: called with every VM created, before anything is written to it
        self.on_vm_created: list[Callable[[VmEntry], None]] = []
        #: what is wrong right now (GetServerInfo.problems): key -> (tenant the problem
        #: belongs to, None for the whole daemon; one-line description)
        self.problems: dict[str, tuple[TenantId | None, str]] = {}
        #: with durability = "journal": where every change is appended (see journal.py)
        self.journal: Journal | None = None
        #: the snapshot format (the state package's; set by the daemon)
        self.snapshots: SnapshotFormat[Any] | None = None
        #: called with (tenant, name) of every VM deleted
        self.on_vm_deleted: list[Callable[[TenantId, str], None]] = []
        self._record_dir: Path | None = None  #: made on the first recorded VM
        #: where recordings are kept: the state directory's, else a temporary one
        self.recordings_dir: Path | None = None
        #: tenant -> (tokens left, monotonic time of the last refill) for write_rate
        self._buckets: dict[TenantId, tuple[float, float]] = {}
        #: tenant -> [memslot pages, tracked gfns] over its VMs, as of each VM's last
        #: accounting; VMs changed since wait in _changed (quota checks then cost the
        #: VMs that changed, not every VM)
        self._usage: dict[TenantId, list[int]] = {}
        self._counted: dict[Vm, tuple[int, int, int, int]] = {}
        #: the VM generation each count of memslot pages and tracking was taken at
        self._counted_gen: dict[Vm, int] = {}
        self._changed: set[Vm] = set()
        self._vm_tenant: dict[Vm, TenantId] = {}
        #: tenant -> its VMs' event history bounds, summed (the history_bytes quota)
        self._history_held: dict[TenantId, int] = {}
        #: tenant -> bytes its built-in plugins' state holds (plugin_state_bytes quota)
        self._plugin_budgets: dict[TenantId, StateBudget] = {}
        #: list_vms answers, each beside the registry listing it was built from
        self._listed: dict[TenantId | None, tuple[list[Any], list[VmEntry]]] = {}

    def check_serving(self) -> None:
        """Raise Unavailable once shutdown has begun."""
        if self.shutting_down.is_set():
            raise Unavailable("pagetrackd is shutting down; retry against a running daemon")
