"""VMs: create (fresh, loaded or replayed), look up, list and delete."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog

from pagetrackd.application import slices
from pagetrackd.application.entries import VmEntry
from pagetrackd.application.recordings import Recordings
from pagetrackd.domain import (
    CostModel,
    DmaPolicy,
    InvalidArgument,
    PageTrackError,
    QuotaExceeded,
    Semantics,
    TenantId,
    Vm,
    VmLimits,
)
from pagetrackd.domain.hub import History, VmHub
from pagetrackd.limits import DEFAULT_VCPUS, MAX_HISTORY_BYTES, MAX_HISTORY_EVENTS
from pagetrackd.quota_guard import guard
from pagetrackd.replay import read_header

log = structlog.get_logger("pagetrackd.engine")


class Vms(Recordings):
    """The tenants' VMs, each a :class:`VmEntry` beside the registry's VM."""

    def create_vm(
        self,
        tenant: TenantId,
        name: str,
        *,
        vcpus: int = DEFAULT_VCPUS,
        dma_policy: DmaPolicy = DmaPolicy.BYPASS,
        semantics: Semantics = Semantics.V2016,
        cost: CostModel | None = None,
        limits: VmLimits | None = None,
        history_events: int | None = None,
        history_bytes: int | None = None,
        record: bool = False,
        check_quota: bool = True,
        record_from: tuple[int, bool] | None = None,
        vm: Vm | None = None,
    ) -> VmEntry:
        """Create a VM for ``tenant`` with its event history; with ``record``, every
        operation on it is recorded (see :mod:`pagetrackd.replay`). Given ``vm`` (made
        and loaded apart, with the options given here), that VM is registered.
        ``check_quota`` false is for VMs the daemon accepted before (its state
        directory); ``record_from`` continues a recording on disk (see
        :meth:`_start_recording`)."""
        self.check_serving()
        if check_quota:
            self.check_vm_count(tenant)
        h_events = self.config.history_events if history_events is None else history_events
        h_bytes = self.config.history_bytes if history_bytes is None else history_bytes
        if not 0 <= h_events <= MAX_HISTORY_EVENTS or not 0 <= h_bytes <= MAX_HISTORY_BYTES:
            raise InvalidArgument(
                f"history_events must be 0..{MAX_HISTORY_EVENTS} and history_bytes"
                f" 0..{MAX_HISTORY_BYTES}"
            )
        q = self.quotas(tenant)
        held = self._history_held.get(tenant, 0)
        if check_quota and held + h_bytes > q.history_bytes:
            raise QuotaExceeded(
                f"an event history of {h_bytes} bytes would take the tenant's VMs to"
                f" {held + h_bytes} bytes of history; its history_bytes quota is"
                f" {q.history_bytes}. Ask for a smaller history_bytes",
                quota="history_bytes", limit=q.history_bytes,
            )
        vm = self.registry.create_vm(
            tenant, name, vm=vm, vcpus=vcpus, dma_policy=dma_policy, semantics=semantics,
            cost=cost, limits=limits,
        )
        history = History(h_events, h_bytes)
        vm.register_notifier(history)
        self._history_held[tenant] = held + h_bytes
        self._vm_tenant[vm] = tenant
        vm.on_change = self._changed.add
        self._changed.add(vm)  # a VM loaded apart (a restore) holds pages already
        entry = VmEntry(tenant, vm, VmHub(history), time.time_ns())
        entry.quota = guard(self, tenant, vm)
        if record:
            self._start_recording(entry, record_from)
        self.entries[(tenant, name)] = entry
        for hook in self.on_vm_created:
            hook(entry)
        log.info("vm.created", tenant=tenant, vm=name, record=record)
        return entry

    async def replay_vm(
        self, tenant: TenantId, name: str, path: Path
    ) -> tuple[VmEntry, int]:
        """Create VM ``name`` configured as the recording's and replay it, a few records
        at a time (other requests are served in between; the VM's own wait); on any
        failure the new VM is deleted again. Returns the entry and the operations
        replayed."""
        try:
            h = read_header(path)["vm"]
            options: dict[str, Any] = {
                "vcpus": int(h["vcpus"]),
                "dma_policy": DmaPolicy(h["dma_policy"]),
                "semantics": Semantics(h["semantics"]),
                "cost": CostModel(**h["cost"]),
                "limits": VmLimits(**h["limits"]),
            }
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise InvalidArgument(
                f"not a usable recording header: {exc}", field="data"
            ) from None
        entry = self.create_vm(tenant, name, **options)
        try:
            result = await slices.replay_into(self.vm_locks, entry, path)
        except PageTrackError:
            self.delete_vm(tenant, name)
            raise
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # malformed JSON
            self.delete_vm(tenant, name)
            raise InvalidArgument(f"recording is malformed: {exc}", field="data") from None
        if entry.vm.closed:
            # A recording of a VM that was deleted ends with its close: nothing is left
            # to serve (a closed VM must not stay registered).
            self.delete_vm(tenant, name)
            raise InvalidArgument(
                "the recording closes its VM (op \"close\"); replay it without that record",
                field="data",
            )
        self._adopt_plugins(entry)
        return entry, result.records

    def vm(self, tenant: TenantId, name: str) -> VmEntry:
        """The tenant's VM; another tenant's is NotFound like an unknown name."""
        self.registry.get_vm(tenant, name)  # raises VmNotFound with the standard message
        return self.entries[(tenant, name)]

    def list_vms(self, tenant: TenantId | None) -> list[VmEntry]:
        """VMs of one tenant (or all), sorted by tenant and name. The caller must not
        change the list: it is kept until a VM is created or deleted."""
        pairs = self.registry.list_vms(tenant)
        held = self._listed.get(tenant)
        if held is None or held[0] is not pairs:
            held = (pairs, [self.entries[(t, vm.name)] for t, vm in pairs])
            self._listed[tenant] = held
        return held[1]

    def list_vms_page(
        self, tenant: TenantId | None, start: int, size: int
    ) -> tuple[list[VmEntry], int]:
        """``size`` VMs from position ``start`` of :meth:`list_vms`, and how many there
        are in all (a page costs its own VMs, not every VM)."""
        pairs = self.registry.list_vms(tenant)
        page = [self.entries[(t, vm.name)] for t, vm in pairs[start : start + size]]
        return page, len(pairs)

    def delete_vm(self, tenant: TenantId, name: str) -> int:
        """Delete a VM: workloads stop, notifiers hear regions go, streams close.
        Returns the VM's last seq."""
        entry = self.vm(tenant, name)
        for run in list(self.workloads.values()):
            if run.entry is not entry:
                continue
            if run.task is not None and not run.task.done():
                run.task.cancel()
                run.state = "stopped"
                run.ended = time.monotonic()
            # Its figures go with the VM: a kept run would keep the deleted VM alive.
            del self.workloads[run.run_id]
        for plugin in list(entry.plugins.values()):
            plugin.detach()
        entry.plugins.clear()
        if entry.recorder is not None:
            entry.recorder.stop()
            if entry.recording_file is not None:
                entry.recording_file.close()
            if entry.recording is not None:
                entry.recording.unlink(missing_ok=True)
        last = entry.vm.seq
        self._forget_usage(tenant, entry.vm)
        self.registry.delete_vm(tenant, name)
        self._history_held[tenant] -= entry.hub.history.max_bytes
        self._changed.discard(entry.vm)
        self._vm_tenant.pop(entry.vm, None)
        del self.entries[(tenant, name)]
        for gone in self.on_vm_deleted:
            gone(tenant, name)
        entry.wake_room()
        log.info("vm.deleted", tenant=tenant, vm=name, last_seq=last)
        return last

    def set_vm_policy(
        self, entry: VmEntry, *, dma_policy: DmaPolicy | None, semantics: Semantics | None,
        cost: CostModel | None,
    ) -> VmEntry:
        """Change the VM's DMA policy, memslot semantics or cost model (None = keep)."""
        entry.vm.set_policy(dma_policy=dma_policy, semantics=semantics, cost=cost)
        return entry
