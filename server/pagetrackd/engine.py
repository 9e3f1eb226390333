"""The daemon's state and operations, without any wire format.

The engine owns the registry of VMs, each VM's event hub (history and Watch
subscribers), plugins, workloads and leases. The gRPC servicers translate requests
into calls here and results back; tests can drive it directly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import secrets
import shutil
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import structlog

from pagetrackd import slices
from pagetrackd.domain import (
    CostModel,
    DmaPolicy,
    FailedPrecondition,
    InvalidArgument,
    PageTrackError,
    PluginAlreadyAttached,
    PluginNotFound,
    QuotaExceeded,
    Registry,
    Semantics,
    TenantId,
    Unavailable,
    Vm,
    VmLimits,
    WorkloadNotFound,
)
from pagetrackd.domain.arrays import distinct
from pagetrackd.domain.hub import History, SlowPolicy, StreamCounters, Subscriber, VmHub
from pagetrackd.domain.memory import PAGE_OBJECT_BYTES, PROMOTE_BYTES
from pagetrackd.domain.snapshot import VmState
from pagetrackd.domain.track import SlotTracking
from pagetrackd.domain.types import PAGE_SIZE
from pagetrackd.leases import Lease, LeaseKind, LeaseTable
from pagetrackd.plugins import PLUGINS, Plugin
from pagetrackd.plugins.catalog import Catalog, canonical_name
from pagetrackd.plugins.host import DEFAULT_FAILURE_LIMIT, HostedPlugin
from pagetrackd.quota_guard import QuotaGuard, guard

if TYPE_CHECKING:
    from pagetrackd.journal import Journal
from pagetrackd.replay import Recorder, read_header
from pagetrackd.workloads import WORKLOADS, Workload

log = structlog.get_logger("pagetrackd.engine")


#: writes per workload step at a target rate
WORKLOAD_CHUNK = 256
#: writes per step at rate 0 (as fast as possible): larger steps cost less per write
WORKLOAD_FAST_CHUNK = 2048
#: the most one written page piece can add to guest memory: a whole page, its objects
#: and directory nodes (an exact bound is computed only near the quota)
_PIECE_WORST_BYTES = PAGE_SIZE + 1024
#: ended workloads are forgotten this long after they ended (and beyond each tenant's
#: finished_workloads quota, the oldest first)
FINISHED_WORKLOAD_TTL_S = 3600.0
#: the most tracking references one restore adds (as many as one AddTracking may)
MAX_RESTORE_REFERENCES = 1 << 22
#: a workload at rate 0 steps for this long before yielding to the event loop (streams
#: then send what it wrote in fewer, larger messages)
WORKLOAD_SLICE_S = 0.010


#: a VM's share of its tenant's totals before it is counted: memslot pages, tracked
#: gfns, guest memory bytes, track pool bytes
_NOTHING = (0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-tenant limits. The defaults suit a daemon that several tenants share: each
    bounds what one tenant can make the daemon hold or do (docs/operations.md says
    why each is safe and how to raise it). The byte quotas count what the daemon
    really holds, not just the bytes a client sent."""

    vms: int = 64
    guest_pages: int = 1 << 36  #: pages summed over the tenant's memslots
    tracked_gfns: int = 1 << 26
    watchers: int = 256  #: open Watch streams
    workloads: int = 64  #: running workloads
    write_rate: int = 0  #: guest writes per second (a 1 s burst is allowed); 0 = no limit
    guest_memory_bytes: int = 1 << 30  #: bytes guest memory holds, summed over VMs
    tracking_bytes: int = 256 << 20  #: bytes track counters hold, summed over VMs
    history_bytes: int = 1 << 30  #: the VMs' event history bounds, summed
    stream_queue_bytes: int = 1 << 30  #: the open Watch streams' queue bounds, summed
    recording_bytes: int = 256 << 20  #: one VM's recording file
    upload_bytes: int = 256 << 20  #: one RestoreVm or ReplayVm upload, and what it decodes to
    leases: int = 1024  #: TTL leases held at once
    finished_workloads: int = 64  #: ended workloads kept for their figures


def make_quotas(values: Mapping[str, Any], base: Quotas | None = None) -> Quotas:
    """Quotas from a TOML table; unknown names and negative values are refused."""
    base = base or Quotas()
    known = set(Quotas.__dataclass_fields__)
    out = {}
    for key, value in values.items():
        if key not in known:
            raise InvalidArgument(f"unknown quota {key!r}; known: {', '.join(sorted(known))}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"quota {key} must be a whole number >= 0, got {value!r}")
        out[key] = value
    return dataclasses.replace(base, **out)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine settings (see ``pagetrackd --help`` for their flags)."""

    history_events: int = 65536
    history_bytes: int = 16 << 20
    quotas: Quotas = field(default_factory=Quotas)
    #: quotas for named tenants; others get ``quotas``
    tenant_quotas: Mapping[str, Quotas] = field(default_factory=dict)
    lease_check_interval_s: float = 0.05
    #: third-party plugins (entry-point names) tenants may attach; built-ins always
    plugins_allow: tuple[str, ...] = ()
    #: failed hooks after which a third-party plugin is detached
    plugin_failure_limit: int = DEFAULT_FAILURE_LIMIT


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
    #: woken whenever a block-policy subscriber's queue drains
    room: asyncio.Event = field(default_factory=asyncio.Event)
    #: records every operation when the VM was created with ``record``
    recorder: Recorder | None = None
    recording: Path | None = None
    #: the open recording file
    recording_file: IO[str] | None = None
    #: charges the VM's own methods to the tenant's quotas (every path, not only RPCs)
    quota: QuotaGuard | None = None

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


class Engine:
    """Everything the daemon serves, by tenant."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.registry = Registry()
        self.plugin_catalog = Catalog(
            self.config.plugins_allow, self.config.plugin_failure_limit
        )
        self.plugin_catalog.on_detached = self._plugin_detached
        #: plugin name -> times it was detached for failing (metrics)
        self.plugin_failure_detaches: dict[str, int] = {}
        self.entries: dict[tuple[TenantId, str], VmEntry] = {}
        self.leases = LeaseTable(self._release_lease)
        self.workloads: dict[str, WorkloadRun] = {}
        #: one lock per VM: the calls on a VM (and its workloads' slices) run one at a
        #: time, so a request done in slices is seen whole (see slices.py)
        self.vm_locks = slices.VmLocks()
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
        #: called with (tenant, name) of every VM deleted
        self.on_vm_deleted: list[Callable[[TenantId, str], None]] = []
        self._lease_task: asyncio.Task[None] | None = None
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
        self._changed: set[Vm] = set()
        self._vm_tenant: dict[Vm, TenantId] = {}
        #: tenant -> its VMs' event history bounds, summed (the history_bytes quota)
        self._history_held: dict[TenantId, int] = {}
        #: list_vms answers, each beside the registry listing it was built from
        self._listed: dict[TenantId | None, tuple[list[Any], list[VmEntry]]] = {}

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

    def check_serving(self) -> None:
        """Raise Unavailable once shutdown has begun."""
        if self.shutting_down.is_set():
            raise Unavailable("pagetrackd is shutting down; retry against a running daemon")

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

    def check_leases(self, tenant: TenantId) -> None:
        """Raise QuotaExceeded if the tenant may not hold one more TTL lease."""
        q = self.quotas(tenant).leases
        held = sum(
            1 for lease in self.leases.live()
            if lease.tenant == tenant and lease.kind is LeaseKind.TTL
        )
        if held >= q:
            raise QuotaExceeded(
                f"tenant already holds {q} leases, its leases quota; revoke some or let"
                " them expire", quota="leases", limit=q,
            )

    # ------------------------------------------------------------------ VMs

    def create_vm(
        self,
        tenant: TenantId,
        name: str,
        *,
        vcpus: int = 8,
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
        if not 0 <= h_events <= 1 << 24 or not 0 <= h_bytes <= 1 << 32:
            raise InvalidArgument(
                "history_events must be 0..16777216 and history_bytes 0..4294967296"
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

    def recording_path(self, tenant: TenantId, name: str) -> Path:
        """Where the recording of a VM is kept."""
        base = self.recordings_dir
        if base is None:
            if self._record_dir is None:
                self._record_dir = Path(tempfile.mkdtemp(prefix="pagetrack-recordings-"))
            base = self._record_dir
        return base / urllib.parse.quote(tenant, safe="") / f"{name}.jsonl"

    def _start_recording(self, entry: VmEntry, record_from: tuple[int, bool] | None) -> None:
        """Record the VM's operations, up to the tenant's recording_bytes quota.
        ``record_from`` (bytes, overflowed) continues the recording already on disk
        after a restart: it is cut to the bytes that go with the loaded state (what
        followed is replayed from the journal, or was lost with the crash)."""
        path = self.recording_path(entry.tenant, entry.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = 0
        if record_from is not None and path.is_file():
            kept = min(record_from[0], path.stat().st_size)
            with open(path, "r+b") as old:
                old.truncate(kept)
        out = open(path, "a" if record_from is not None else "w", encoding="utf-8")
        entry.recording = path
        entry.recording_file = out
        entry.recorder = Recorder(
            entry.vm, out, max_bytes=self.quotas(entry.tenant).recording_bytes,
            fresh=record_from is None, header=record_from is None,
        )
        entry.recorder.nbytes = kept
        if record_from is not None and (record_from[1] or kept < record_from[0]):
            entry.recorder.overflowed = True  # stopped before, or cut short: incomplete

    @contextlib.contextmanager
    def unjournaled(self) -> Iterator[None]:
        """Nothing is journaled inside (a restore journals the snapshot instead)."""
        journal = self.journal
        if journal is None or journal.paused:
            yield
            return
        journal.paused = True
        try:
            yield
        finally:
            journal.paused = False

    def journal_restored(self, entry: VmEntry, data: bytes) -> None:
        """Journal a VM restored from snapshot bytes (replayed by restoring them)."""
        if self.journal is not None:
            self.journal.append({
                "t": entry.tenant, "vm": entry.name, "op": "restore",
                "data": base64.b64encode(data).decode("ascii"),
            })

    def recording(self, entry: VmEntry) -> Path:
        """The VM's recording so far, flushed to its file."""
        if entry.recorder is None or entry.recording is None:
            raise FailedPrecondition(
                f"VM {entry.name!r} is not recorded; create it with the record option"
            )
        if entry.recorder.overflowed:
            q = self.quotas(entry.tenant).recording_bytes
            raise QuotaExceeded(
                f"VM {entry.name!r}'s recording passed the tenant's recording_bytes quota of"
                f" {q} bytes and was stopped there; it cannot be replayed",
                quota="recording_bytes", limit=q,
            )
        entry.recorder.flush()
        return entry.recording

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
        self._account()
        counted = self._counted.pop(entry.vm, _NOTHING)
        usage = self._usage.setdefault(tenant, [0, 0, 0, 0])
        for k, v in enumerate(counted):
            usage[k] -= v
        self.registry.delete_vm(tenant, name)
        self._history_held[tenant] -= entry.hub.history.max_bytes
        self._changed.discard(entry.vm)
        self._vm_tenant.pop(entry.vm, None)
        del self.entries[(tenant, name)]
        for gone in self.on_vm_deleted:
            gone(tenant, name)
        entry.room.set()
        log.info("vm.deleted", tenant=tenant, vm=name, last_seq=last)
        return last

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
            now = (
                sum(s.info.npages for s in vm.slots.slots()), vm.tracked_count,
                vm.memory_footprint, vm.tracking_footprint,
            )
            was = self._counted.get(vm, _NOTHING)
            self._counted[vm] = now
            usage = self._usage.setdefault(tenant, [0, 0, 0, 0])
            for k in range(4):
                usage[k] += now[k] - was[k]

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
            pieces = len(gpa) + int(np.sum(length)) // PAGE_SIZE + len(gpa)
            if used + pieces * _PIECE_WORST_BYTES <= q:
                return  # far from the quota: no need for the exact bound
            grow = entry.vm.memory_growth_bound(
                np.asarray(gpa, dtype=np.int64), np.asarray(length, dtype=np.int64)
            )
        if used + grow > q:
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

    # ------------------------------------------------------------------ streams

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
        entry.room.set()

    @staticmethod
    def _must_admit(entry: VmEntry) -> bool:
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

    # ------------------------------------------------------------------ leases

    def _release_lease(self, lease: Lease) -> None:
        released = 0
        for entry in self.list_vms(lease.tenant):
            released += entry.vm.release_owner(lease.owner)
        log.info("lease.ended", tenant=lease.tenant, lease=lease.lease_id, untracked=released)

    def stream_lease(self, tenant: TenantId) -> Lease:
        """A lease that lives as long as one Watch stream."""
        return self.leases.create(tenant, 0, "watch", LeaseKind.STREAM)

    def lease_owner(self, tenant: TenantId, lease_id: str) -> str:
        """The owner name for tracking under ``lease_id`` ("" = the tenant)."""
        if not lease_id:
            return "tenant"
        return self.leases.get(tenant, lease_id).owner

    def lease_references(self, lease: Lease) -> int:
        """Tracking references held under a lease, over the tenant's VMs."""
        return sum(e.vm.owner_references(lease.owner) for e in self.list_vms(lease.tenant))

    # ------------------------------------------------------------------ plugins

    def attach_plugin(
        self, entry: VmEntry, kind: str, options: Mapping[str, Any]
    ) -> Plugin:
        """Attach a plugin by name to a VM: a built-in, or a third-party plugin the
        operator allowed (see :class:`~pagetrackd.plugins.catalog.Catalog`)."""
        self.check_serving()
        kind = canonical_name(kind)
        if kind in entry.plugins:
            raise PluginAlreadyAttached(
                f"plugin {kind!r} is already attached to VM {entry.name!r}"
            )
        plugin = self.plugin_catalog.make(kind)
        plugin.attach(entry.vm, **options)
        entry.plugins[kind] = plugin
        entry.plugin_options[kind] = dict(options)
        return plugin

    def _plugin_detached(self, plugin: HostedPlugin) -> None:
        """A third-party plugin failed too often and detached itself: forget it."""
        self.plugin_failure_detaches[plugin.name] = (
            self.plugin_failure_detaches.get(plugin.name, 0) + 1
        )
        for entry in self.entries.values():
            if entry.plugins.get(plugin.name) is plugin:
                del entry.plugins[plugin.name]
                entry.plugin_options.pop(plugin.name, None)

    def _adopt_plugins(self, entry: VmEntry) -> None:
        """Take plugins that something other than :meth:`attach_plugin` registered on the
        VM (a workload's setup attaching the vGPU or the shadow MMU) into
        ``entry.plugins``, so the API lists, audits and detaches them like any other."""
        kinds: dict[object, str] = {factory: kind for kind, factory in PLUGINS.items()}
        for node in entry.vm.notifiers.nodes():
            kind = kinds.get(type(node.notifier))
            if kind is None or kind in entry.plugins:
                continue
            plugin: Plugin = node.notifier  # type: ignore[assignment]
            entry.plugins[kind] = plugin
            options = getattr(plugin, "attach_options", None)
            entry.plugin_options[kind] = dict(options()) if callable(options) else {}
            log.info("plugin.adopted", tenant=entry.tenant, vm=entry.name, plugin=kind)

    def plugin(self, entry: VmEntry, kind: str) -> Plugin:
        """An attached plugin."""
        kind = canonical_name(kind)
        plugin = entry.plugins.get(kind)
        if plugin is None:
            raise PluginNotFound(
                f"plugin {kind!r} is not attached to VM {entry.name!r}", name=kind
            )
        return plugin

    def detach_plugin(self, entry: VmEntry, kind: str) -> int:
        """Detach a plugin; returns the tracking references it released."""
        kind = canonical_name(kind)
        plugin = self.plugin(entry, kind)
        refs = entry.vm.owner_references(f"plugin:{kind}")
        plugin.detach()
        del entry.plugins[kind]
        entry.plugin_options.pop(kind, None)
        return refs

    # ------------------------------------------------------------------ workloads

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
        chunk = WORKLOAD_FAST_CHUNK
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
            if time.monotonic() >= end or self._must_admit(entry):
                break
            if run.duration_s and run.elapsed_s >= run.duration_s:
                break
            n = chunk if not run.count else min(chunk, run.count - run.writes)
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
