"""Tenancy: each tenant's quotas, and what its VMs hold against them.

Usage is kept as running totals per tenant, brought up to date with the VMs that
changed since the last count (a check costs the VMs that changed, not every VM).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pagetrackd.application.base import EngineBase
from pagetrackd.application.entries import VmEntry
from pagetrackd.domain import QuotaExceeded, TenantId, Vm
from pagetrackd.domain.arrays import distinct
from pagetrackd.domain.memory import PAGE_OBJECT_BYTES, PROMOTE_BYTES
from pagetrackd.domain.snapshot import VmState
from pagetrackd.domain.track import SlotTracking
from pagetrackd.domain.types import PAGE_SIZE
from pagetrackd.limits import MAX_RESTORE_REFERENCES, Quotas

#: the most one written page piece can add to guest memory: a whole page, its objects
#: and directory nodes (an exact bound is computed only near the quota)
_PIECE_WORST_BYTES = PAGE_SIZE + 1024

#: a VM's share of its tenant's totals before it is counted: memslot pages, tracked
#: gfns, guest memory bytes, track pool bytes
_NOTHING = (0, 0, 0, 0)


class Tenancy(EngineBase):
    """Quotas per tenant: the write-rate bucket, usage totals and the checks that
    refuse, before anything changes, what would pass a quota."""

    def quotas(self, tenant: TenantId) -> Quotas:
        """The quotas that apply to ``tenant``."""
        return self.config.tenant_quotas.get(tenant, self.config.quotas)

    def charge_writes(self, tenant: TenantId, writes: int) -> None:
        """Take ``writes`` from the tenant's write-rate bucket (refilled at write_rate per
        second, holding at most one second's worth); raise QuotaExceeded when empty."""
        rate = self.quotas(tenant).write_rate
        if not rate:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(tenant, (float(rate), now))
        tokens = min(float(rate), tokens + (now - last) * rate)
        if writes > tokens:
            self._buckets[tenant] = (tokens, now)
            raise QuotaExceeded(
                f"{writes} writes exceed the tenant's write_rate quota of {rate} writes/s"
                f" ({int(tokens)} available now); slow down or ask for a higher quota",
                quota="write_rate", limit=rate,
                # The bucket holds one second's worth: a larger batch never fits.
                retry_after_s=(writes - tokens) / rate if writes <= rate else None,
            )
        self._buckets[tenant] = (tokens - writes, now)

    def writes_available(self, tenant: TenantId) -> int:
        """Writes the tenant's write-rate bucket holds now (a large number without a
        write_rate quota)."""
        rate = self.quotas(tenant).write_rate
        if not rate:
            return 1 << 62
        now = time.monotonic()
        tokens, last = self._buckets.get(tenant, (float(rate), now))
        return int(min(float(rate), tokens + (now - last) * rate))

    def refund_writes(self, tenant: TenantId, writes: int) -> None:
        """Give back writes charged for a call that was refused (it changed nothing)."""
        if tenant in self._buckets:
            tokens, last = self._buckets[tenant]
            self._buckets[tenant] = (tokens + writes, last)

    def check_vm_count(self, tenant: TenantId) -> None:
        """Raise QuotaExceeded if the tenant may not have one more VM."""
        q = self.quotas(tenant)
        if self.registry.count_vms(tenant) >= q.vms:
            raise QuotaExceeded(
                f"tenant already has {q.vms} VMs, its quota", quota="vms", limit=q.vms
            )

    def _account(self) -> None:
        """Bring the per-tenant totals up to date with the VMs that changed."""
        while self._changed:
            vm = self._changed.pop()
            tenant = self._vm_tenant.get(vm)
            if tenant is None or vm.closed:
                continue
            was = self._counted.get(vm, _NOTHING)
            usage = self._usage.setdefault(tenant, [0, 0, 0, 0])
            gen = vm.generation
            if self._counted_gen.get(vm) == gen:
                # Only guest memory changed (a write): memslots and tracking move the
                # generation, and their sums cost far more than a write. Most writes
                # land in bytes the memory holds already: then nothing changed.
                memory = vm.memory_footprint
                if memory != was[2]:
                    usage[2] += memory - was[2]
                    self._counted[vm] = (was[0], was[1], memory, was[3])
                continue
            now = (
                sum(s.info.npages for s in vm.slots.slots()), vm.tracked_count,
                vm.memory_footprint, vm.tracking_footprint,
            )
            self._counted_gen[vm] = gen
            self._counted[vm] = now
            for k in range(4):
                usage[k] += now[k] - was[k]

    def _forget_usage(self, tenant: TenantId, vm: Vm) -> None:
        """Take a VM that is going away out of its tenant's totals."""
        self._account()
        counted = self._counted.pop(vm, _NOTHING)
        self._counted_gen.pop(vm, None)
        usage = self._usage.setdefault(tenant, [0, 0, 0, 0])
        for k, v in enumerate(counted):
            usage[k] -= v

    def usage(self, tenant: TenantId) -> tuple[int, int]:
        """(memslot pages, tracked gfns) summed over the tenant's VMs."""
        self._account()
        usage = self._usage.get(tenant, _NOTHING)
        return usage[0], usage[1]

    def check_guest_pages(self, tenant: TenantId, extra: int) -> None:
        """Raise QuotaExceeded if ``extra`` more memslot pages pass the tenant's quota."""
        q = self.quotas(tenant).guest_pages
        used = self.usage(tenant)[0]
        if used + extra > q:
            raise QuotaExceeded(
                f"memslots would hold {used + extra} guest pages; the tenant's quota is {q}",
                quota="guest_pages", limit=q,
            )

    def _tenant_entries(self, tenant: TenantId) -> list[VmEntry]:
        return [self.entries[(tenant, vm.name)] for vm in self.registry.vms_of(tenant)]

    def memory_used(self, tenant: TenantId) -> int:
        """Bytes the tenant's guest memory really holds, over its VMs (kept up to date
        with the VMs written since the last count, not summed over every VM)."""
        self._account()
        return self._usage.get(tenant, _NOTHING)[2]

    def tracking_used(self, tenant: TenantId) -> int:
        """Bytes the tenant's track counters really hold, over its VMs."""
        self._account()
        return self._usage.get(tenant, _NOTHING)[3]

    def check_memory(
        self, entry: VmEntry, gpa: Any, length: Any, *, grow: int | None = None
    ) -> None:
        """Raise QuotaExceeded, before anything is written, if guest writes of
        ``length[i]`` bytes at ``gpa[i]`` could take the tenant's guest memory past its
        guest_memory_bytes quota. ``grow``: their growth bound, found already."""
        q = self.quotas(entry.tenant).guest_memory_bytes
        used = self.memory_used(entry.tenant)
        if grow is None:
            total = sum(length) if isinstance(length, list) else int(length.sum())
            pieces = len(gpa) + total // PAGE_SIZE + len(gpa)
            if used + pieces * _PIECE_WORST_BYTES <= q:
                return  # far from the quota: no need for the exact bound
            grow = entry.vm.memory_growth_bound(
                np.asarray(gpa, dtype=np.int64), np.asarray(length, dtype=np.int64)
            )
        if grow and used + grow > q:  # writes that grow nothing pass, even over a lowered quota
            raise QuotaExceeded(
                f"guest memory would hold up to {used + grow} bytes (now {used}); the"
                f" tenant's guest_memory_bytes quota is {q}. Nothing was written",
                quota="guest_memory_bytes", limit=q,
            )

    def check_tracking_memory(self, entry: VmEntry, gfns: Any, owner: str) -> None:
        """Raise QuotaExceeded, before anything changes, if tracking ``gfns`` could take
        the tenant's track counters past its tracking_bytes quota."""
        q = self.quotas(entry.tenant).tracking_bytes
        used = self.tracking_used(entry.tenant)
        grow = entry.vm.tracking_growth_bound(np.asarray(gfns, dtype=np.int64), owner)
        if used + grow > q:
            raise QuotaExceeded(
                f"track counters would hold up to {used + grow} bytes (now {used}); the"
                f" tenant's tracking_bytes quota is {q}. A huge memslot needs a large"
                " counter directory; nothing was tracked",
                quota="tracking_bytes", limit=q,
            )

    def check_restore_size(
        self, tenant: TenantId, state: VmState, replacing: VmEntry | None = None
    ) -> None:
        """Raise QuotaExceeded, before a saved VM is loaded, if loading it could take the
        tenant past guest_memory_bytes or tracking_bytes (``replacing``'s share given
        back), or if it holds more tracking references than one request may add: what a
        small file declares is checked before anything is allocated for it."""
        q = self.quotas(tenant)
        memory = tracking = references = 0
        for s in state.slots:
            pages = int(s.mem_index.size)
            if pages:
                width = np.where(s.mem_len > PROMOTE_BYTES, PAGE_SIZE, s.mem_len + 2 * 8)
                top = (int(s.mem_index.max()) >> 10) + 1
                memory += int(width.sum()) + pages * (PAGE_OBJECT_BYTES + 24 + 256) + 6 * top
            counters = SlotTracking(s.npages, s.base_gfn)
            for owner, (owned, counts) in s.owners.items():
                references += int(counts.sum())
                tracking += counters.growth_bound(distinct(owned), owner)
        if references > MAX_RESTORE_REFERENCES:
            raise QuotaExceeded(
                f"the snapshot holds {references} tracking references; at most"
                f" {MAX_RESTORE_REFERENCES} are restored at once",
                quota="tracked_gfns", limit=MAX_RESTORE_REFERENCES,
            )
        mem_used = self.memory_used(tenant)
        track_used = self.tracking_used(tenant)
        if replacing is not None:
            mem_used -= replacing.vm.memory_footprint
            track_used -= replacing.vm.tracking_footprint
        if mem_used + memory > q.guest_memory_bytes:
            raise QuotaExceeded(
                f"the snapshot's guest memory needs up to {memory} bytes; with the {mem_used}"
                f" the tenant holds that passes its guest_memory_bytes quota of"
                f" {q.guest_memory_bytes}",
                quota="guest_memory_bytes", limit=q.guest_memory_bytes,
            )
        if track_used + tracking > q.tracking_bytes:
            raise QuotaExceeded(
                f"the snapshot's tracking needs up to {tracking} bytes of counters; with the"
                f" {track_used} the tenant holds that passes its tracking_bytes quota of"
                f" {q.tracking_bytes}",
                quota="tracking_bytes", limit=q.tracking_bytes,
            )

    def check_tracked(self, tenant: TenantId, extra: int) -> None:
        """Raise QuotaExceeded if ``extra`` more tracked gfns pass the tenant's quota."""
        q = self.quotas(tenant).tracked_gfns
        used = self.usage(tenant)[1]
        if used + extra > q:
            raise QuotaExceeded(
                f"{used + extra} gfns would be tracked; the tenant's quota is {q}",
                quota="tracked_gfns", limit=q,
            )
