"""Watch streams: subscribing under the tenant's quotas, and the block policy's waits."""

from __future__ import annotations

import asyncio
import contextlib
import time

from pagetrackd.application.entries import VmEntry
from pagetrackd.application.vms import Vms
from pagetrackd.domain import QuotaExceeded, TenantId
from pagetrackd.domain.hub import SlowPolicy, Subscriber


class Streams(Vms):
    """Each VM's Watch subscribers, counted against the tenant's quotas."""

    def watchers(self, tenant: TenantId) -> int:
        """Watch streams the tenant has open."""
        return sum(len(e.hub.subscribers) for e in self.list_vms(tenant))

    def subscribe(
        self, entry: VmEntry, sub: Subscriber, start_seq: int | None
    ) -> int:
        """Register a Watch subscriber (after the quota check)."""
        self.check_serving()
        quotas = self.quotas(entry.tenant)
        q = quotas.watchers
        if self.watchers(entry.tenant) >= q:
            raise QuotaExceeded(
                f"tenant already has {q} Watch streams open, its quota",
                quota="watchers", limit=q,
            )
        held = sum(
            s.queue_bytes for e in self._tenant_entries(entry.tenant)
            for s in e.hub.subscribers.values()
        )
        if held + sub.queue_bytes > quotas.stream_queue_bytes:
            raise QuotaExceeded(
                f"a queue of {sub.queue_bytes} bytes would take the tenant's open Watch"
                f" streams to {held + sub.queue_bytes} queue bytes; its stream_queue_bytes"
                f" quota is {quotas.stream_queue_bytes}. Ask for a smaller queue_bytes",
                quota="stream_queue_bytes", limit=quotas.stream_queue_bytes,
            )
        return entry.hub.subscribe(entry.vm, sub, start_seq)

    def unsubscribe(self, entry: VmEntry, sub: Subscriber) -> None:
        """Unregister a Watch subscriber; nothing more reaches it."""
        entry.hub.unsubscribe(entry.vm, sub)
        done, c = entry.ended_streams, sub.counters
        done.sent += c.sent
        done.dropped += c.dropped
        done.coalesced += c.coalesced
        done.queued += c.queued
        entry.wake_room()

    @staticmethod
    def must_admit(entry: VmEntry) -> bool:
        """Whether a block-policy stream of the VM has no room (admit() would wait)."""
        for s in entry.hub.subscribers.values():
            if s.policy is SlowPolicy.BLOCK and s.full:
                return True
        return False

    async def admit(self, entry: VmEntry) -> None:
        """Before a guest write: wait while a block-policy stream's queue is full, each
        stream up to its own block timeout. What still does not fit afterwards is
        dropped and reported to that stream."""
        blocking = [
            s for s in entry.hub.subscribers.values()
            if s.policy is SlowPolicy.BLOCK and s.full
        ]
        if not blocking:
            return
        now = time.monotonic()
        waits = {id(s): now + s.block_timeout_s for s in blocking}
        for s in blocking:
            s.counters.blocked_writes += 1
        while True:
            now = time.monotonic()
            waiting = [s for s in blocking if s.full and s.node is not None]
            expired = [s for s in waiting if waits[id(s)] <= now]
            for s in expired:
                s.counters.block_timeouts += 1
                blocking.remove(s)
            waiting = [s for s in waiting if s not in expired]
            if not waiting:
                return
            entry.room.clear()
            left = min(waits[id(s)] for s in waiting) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.room.wait(), left)
