"""The engine: every use case of the daemon, by tenant, without any wire format.

It owns the registry of VMs, each VM's event hub (history and Watch subscribers),
plugins, workloads and leases. Each job is its own module of this package, stacked
into one class (tenancy -> plugins -> recordings -> vms -> streams -> leasing ->
workload_runs); this module adds the lifecycle. The gRPC servicers translate
requests into calls here and results back; tests can drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time

import structlog

from pagetrackd.application.config import EngineConfig
from pagetrackd.application.workload_runs import Workloads
from pagetrackd.leases import LeaseTable

log = structlog.get_logger("pagetrackd.engine")


class Engine(Workloads):
    """Everything the daemon serves, by tenant."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        super().__init__(config)
        self.plugin_catalog.on_detached = self._plugin_detached
        self.leases = LeaseTable(self._release_lease)
        self._lease_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start background work (lease expiry)."""
        self._lease_task = asyncio.create_task(self._expire_leases(), name="lease-expiry")

    async def stop(self) -> None:
        """Stop taking work: streams end, workloads stop, background tasks end."""
        self.shutting_down.set()
        for run in list(self.workloads.values()):
            if run.state == "running":
                await self.stop_workload(run.tenant, run.run_id)
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
        if self._record_dir is not None:
            # Without a state directory recordings do not outlive the daemon.
            shutil.rmtree(self._record_dir, ignore_errors=True)

    async def _expire_leases(self) -> None:
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(self.config.lease_check_interval_s)
            try:
                self.leases.expire()
                if time.monotonic() - last_prune > 1.0:
                    last_prune = time.monotonic()
                    self.prune_workloads()
            except Exception:
                log.exception("lease.expiry_failed")
