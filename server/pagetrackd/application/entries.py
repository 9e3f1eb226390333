"""What the engine keeps beside each VM, and each workload it runs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pagetrackd.domain import TenantId, Vm
from pagetrackd.domain.hub import StreamCounters, VmHub
from pagetrackd.plugins import Plugin
from pagetrackd.quota_guard import QuotaGuard
from pagetrackd.replay import Recorder
from pagetrackd.workloads import Workload


@dataclass(eq=False)
class VmEntry:
    """A VM with everything the daemon keeps beside it."""

    tenant: TenantId
    vm: Vm
    hub: VmHub
    created_at_ns: int
    plugins: dict[str, Plugin] = field(default_factory=dict)
    #: the options each attached plugin was attached with (saved with the VM's state)
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: counters of the Watch streams that have ended, summed (metrics stay monotonic)
    ended_streams: StreamCounters = field(default_factory=StreamCounters)
    #: woken whenever a block-policy subscriber's queue drains (made when first
    #: needed: an Event takes some 900 bytes and most VMs never have such a stream)
    _room: asyncio.Event | None = field(default=None, repr=False)
    #: records every operation when the VM was created with ``record``
    recorder: Recorder | None = None
    #: with durability = "journal": records every operation into the journal
    journal_recorder: Recorder | None = None
    recording: Path | None = None
    #: the open recording file
    recording_file: IO[str] | None = None
    #: charges the VM's own methods to the tenant's quotas (every path, not only RPCs)
    quota: QuotaGuard | None = None

    @property
    def room(self) -> asyncio.Event:
        """Set whenever a block-policy subscriber's queue drains."""
        if self._room is None:
            self._room = asyncio.Event()
        return self._room

    def wake_room(self) -> None:
        """Wake the writers waiting for room (none wait if :attr:`room` was never made)."""
        if self._room is not None:
            self._room.set()

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.vm.name


@dataclass(eq=False)
class WorkloadRun:
    """One workload started through the API."""

    run_id: str
    tenant: TenantId
    entry: VmEntry
    kind: str
    workload: Workload
    rate: float  #: writes per second; 0 = as fast as possible
    count: int  #: stop after this many writes; 0 = no bound
    duration_s: float  #: stop after this long; 0 = no bound
    config: dict[str, Any]
    state: str = "running"  #: running, finished, stopped, failed
    error: str = ""
    writes: int = 0
    started: float = field(default_factory=time.monotonic)
    started_ns: int = field(default_factory=time.time_ns)
    ended: float | None = None
    #: the VM's pieces and cycles by path when the workload started
    stats_before: tuple[list[int], list[int]] = field(
        default_factory=lambda: ([0, 0, 0], [0, 0, 0])
    )
    task: asyncio.Task[None] | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds the workload ran (so far)."""
        return (self.ended or time.monotonic()) - self.started

    @property
    def achieved_rate(self) -> float:
        """Writes per second achieved."""
        e = self.elapsed_s
        return self.writes / e if e > 0 else 0.0


@contextlib.contextmanager
def unrecorded(entry: VmEntry) -> Iterator[None]:
    """Operations on the VM inside are neither recorded nor journaled (a restore
    rebuilding a plugin's shadow: the restore itself is what replays it)."""
    with contextlib.ExitStack() as stack:
        for rec in (entry.recorder, entry.journal_recorder):
            if rec is not None:
                stack.enter_context(rec.paused())
        yield
