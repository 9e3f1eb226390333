"""Workloads started through the API: set up, stepped in the background, pruned."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Mapping
from typing import Any

import structlog

from pagetrackd.application.entries import VmEntry, WorkloadRun
from pagetrackd.application.leasing import Leasing
from pagetrackd.domain import InvalidArgument, QuotaExceeded, TenantId, WorkloadNotFound
from pagetrackd.limits import FINISHED_WORKLOAD_TTL_S
from pagetrackd.workloads import WORKLOADS

log = structlog.get_logger("pagetrackd.engine")

#: writes per workload step at a target rate
WORKLOAD_CHUNK = 256
#: writes per step at rate 0 (as fast as possible): larger steps cost less per write
WORKLOAD_FAST_CHUNK = 2048
#: a workload at rate 0 steps for this long before yielding to the event loop (streams
#: then send what it wrote in fewer, larger messages)
WORKLOAD_SLICE_S = 0.010
#: workloads that take StartWorkloadRequest.tracked_fraction (the others ignore it, as
#: the field's documentation says)
TRACKED_FRACTION_KINDS = frozenset({"random-writes", "kernel-build"})


class Workloads(Leasing):
    """The tenants' workload runs, running and ended (kept for their figures)."""

    def start_workload(
        self,
        entry: VmEntry,
        kind: str,
        *,
        seed: int,
        rate: float,
        count: int,
        duration_s: float,
        options: Mapping[str, Any],
    ) -> WorkloadRun:
        """Set a workload up on a VM and start running it in the background."""
        self.check_serving()
        factory = WORKLOADS.get(kind)
        if factory is None:
            raise InvalidArgument(
                f"unknown workload {kind!r}; available: {', '.join(sorted(WORKLOADS)) or 'none'}"
            )
        if rate < 0 or rate > 1e8:
            raise InvalidArgument(f"rate {rate} must be 0 (as fast as possible) .. 1e8 writes/s")
        if count < 0 or duration_s < 0:
            raise InvalidArgument("count and duration must be >= 0")
        self.prune_workloads()
        q = self.quotas(entry.tenant).workloads
        running = sum(
            1 for r in self.workloads.values() if r.tenant == entry.tenant and r.state == "running"
        )
        if running >= q:
            raise QuotaExceeded(
                f"tenant already runs {q} workloads, its quota", quota="workloads", limit=q
            )
        workload = factory(seed, options)
        try:
            workload.setup(entry.vm)
        finally:
            # Take in a plugin the setup attached (a failed setup detaches its own, so
            # this finds nothing then; adopting in `finally` keeps the API's view right
            # whatever a setup leaves behind).
            self._adopt_plugins(entry)
        # Unguessable, not a count: a tenant learns nothing of the others' workloads.
        run_id = f"w{secrets.token_hex(6)}"
        run = WorkloadRun(
            run_id, entry.tenant, entry, kind, workload, rate, count, duration_s,
            {"seed": seed, **dict(options)},
        )
        run.stats_before = (list(entry.vm.stats.pieces), list(entry.vm.stats.cycles))
        self.workloads[run_id] = run
        run.task = asyncio.create_task(self._run_workload(run), name=f"workload-{run_id}")
        log.info("workload.started", tenant=entry.tenant, vm=entry.name, kind=kind, id=run_id)
        return run

    async def _run_workload(self, run: WorkloadRun) -> None:
        chunk = WORKLOAD_CHUNK if run.rate else WORKLOAD_FAST_CHUNK
        vm = run.entry.vm
        entry = run.entry
        try:
            while True:
                if run.count and run.writes >= run.count:
                    break
                if run.duration_s and run.elapsed_s >= run.duration_s:
                    break
                n = chunk
                if run.rate:
                    due = int(run.rate * run.elapsed_s) - run.writes
                    if due <= 0:
                        await asyncio.sleep(min(0.005, 1 / run.rate))
                        continue
                    n = min(n, due)
                if run.count:
                    n = min(n, run.count - run.writes)
                room = self.writes_available(run.tenant)
                if room < n:
                    # The tenant's write_rate quota holds workloads too: wait for the
                    # bucket to refill instead of writing past it.
                    if room <= 0:
                        rate = self.quotas(run.tenant).write_rate
                        await asyncio.sleep(min(0.05, max(0.001, 1 / rate)))
                        continue
                    n = room
                await self.admit(entry)
                async with self.vm_locks.hold(run.tenant, vm.name):
                    if vm.closed:
                        break
                    made = self._workload_slice(run, n)
                if made == 0:
                    break
                await asyncio.sleep(0)
            run.state = "finished"
        except asyncio.CancelledError:
            run.state = "stopped"
            raise
        except Exception as exc:  # a workload bug must not take the daemon down
            run.state = "failed"
            run.error = f"{type(exc).__name__}: {exc}"
            log.exception("workload.failed", id=run.run_id)
        finally:
            run.ended = time.monotonic()
            asyncio.get_running_loop().call_soon(self.prune_workloads)  # once its task is done

    def _workload_slice(self, run: WorkloadRun, n: int) -> int:
        """One slice of a workload (the VM's lock held): ``n`` writes, and as fast as
        possible more for a time slice when it has no rate. Returns the writes made in
        the last step (0: the workload is done)."""
        entry = run.entry
        vm = entry.vm
        step = run.workload.step
        self._check_workload_memory(entry)
        made = step(vm, n)
        run.writes += made
        if run.rate:
            return made
        # As fast as possible: keep stepping for a time slice, then let the loop run
        # (streams, RPCs). Leave the slice early when a block-policy stream has no
        # room, so admit() decides before the next write.
        end = time.monotonic() + WORKLOAD_SLICE_S
        while made and (not run.count or run.writes < run.count):
            if time.monotonic() >= end or self.must_admit(entry):
                break
            if run.duration_s and run.elapsed_s >= run.duration_s:
                break
            n = WORKLOAD_FAST_CHUNK if not run.count else min(
                WORKLOAD_FAST_CHUNK, run.count - run.writes
            )
            n = min(n, self.writes_available(run.tenant))
            if n <= 0:
                break
            made = step(vm, n)
            run.writes += made
        return made

    def prune_workloads(self) -> int:
        """Forget ended workloads older than FINISHED_WORKLOAD_TTL_S, and beyond each
        tenant's finished_workloads quota the oldest ended ones; returns how many went.
        (An ended workload keeps its figures for GetWorkload, and its VM: unbounded,
        they would hold memory forever.)"""
        now = time.monotonic()
        ended: dict[TenantId, list[WorkloadRun]] = {}
        for run in self.workloads.values():
            if run.ended is not None and (run.task is None or run.task.done()):
                ended.setdefault(run.tenant, []).append(run)
        gone = 0
        for tenant, runs in ended.items():
            runs.sort(key=lambda r: r.ended or 0.0, reverse=True)
            keep = self.quotas(tenant).finished_workloads
            for i, run in enumerate(runs):
                if i >= keep or now - (run.ended or now) > FINISHED_WORKLOAD_TTL_S:
                    del self.workloads[run.run_id]
                    gone += 1
        return gone

    def _check_workload_memory(self, entry: VmEntry) -> None:
        """A workload's writes are made inside the daemon, so they are checked step by
        step: once the tenant's guest memory has reached its quota, the workload fails
        with the quota's error (a step adds at most a few MiB past it)."""
        q = self.quotas(entry.tenant).guest_memory_bytes
        used = self.memory_used(entry.tenant)
        if used >= q:
            raise QuotaExceeded(
                f"guest memory holds {used} bytes, the tenant's guest_memory_bytes quota"
                f" is {q}: the workload stopped writing",
                quota="guest_memory_bytes", limit=q,
            )

    def workload(self, tenant: TenantId, run_id: str) -> WorkloadRun:
        """One of the tenant's workloads."""
        run = self.workloads.get(run_id)
        if run is None or run.tenant != tenant:
            raise WorkloadNotFound(f"workload {run_id!r} not found", name=run_id)
        return run

    async def stop_workload(self, tenant: TenantId, run_id: str) -> WorkloadRun:
        """Stop a workload; it keeps its figures."""
        run = self.workload(tenant, run_id)
        if run.task is not None and not run.task.done():
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.task
        return run

    def start_on(
        self, tenant: TenantId, vm: str, kind: str, *, seed: int, rate: float, count: int,
        duration_s: float, vcpus: int, tracked_fraction: float, options: Mapping[str, Any],
    ) -> WorkloadRun:
        """StartWorkload: ``vcpus`` (0 = the workload's default) must fit the VM;
        ``tracked_fraction`` goes to the workloads that take it (the others ignore it)."""
        entry = self.vm(tenant, vm)
        if not 0 <= tracked_fraction <= 1:
            raise InvalidArgument(f"tracked_fraction {tracked_fraction} must be between 0 and 1")
        if vcpus > entry.vm.vcpus:
            raise InvalidArgument(
                f"vcpus {vcpus}: the VM has {entry.vm.vcpus} (1..{entry.vm.vcpus}; 0 = 1)"
            )
        opts = dict(options)
        if vcpus:
            opts["vcpus"] = vcpus
        if tracked_fraction and kind in TRACKED_FRACTION_KINDS:
            opts["tracked_fraction"] = tracked_fraction
        return self.start_workload(
            entry, kind, seed=seed, rate=rate, count=count, duration_s=duration_s,
            options=opts,
        )

    def list_workloads(self, tenant: TenantId, vm: str = "") -> list[WorkloadRun]:
        """The tenant's workloads (of one VM when ``vm`` is given)."""
        if vm:
            self.vm(tenant, vm)
        return [
            r for r in self.workloads.values()
            if r.tenant == tenant and (not vm or r.entry.name == vm)
        ]
