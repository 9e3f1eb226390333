"""Prometheus metrics, read from the engine at scrape time, served on their own port.

Nothing here runs on the write path: :class:`EngineCollector` walks the engine's VMs,
streams and plugins when Prometheus scrapes, and only RPC counts and latencies are
recorded as they happen (once per call, by the logging interceptor). The HTTP endpoint
runs on the daemon's event loop, so a scrape sees the engine between two operations,
never in the middle of one, and needs no locks.

Labels are ``tenant`` and ``vm``. Past ``max_vms`` VMs (oldest first keep theirs),
further VMs are added up under ``vm="_other"`` of their tenant, so a tenant that creates
thousands of VMs cannot blow up Prometheus' series count.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pagetrackd import __version__
from pagetrackd.application.plugin_ops import plugin_metrics
from pagetrackd.application.views import VmStatsView, vm_stats

if TYPE_CHECKING:
    from pagetrackd.application import Engine, VmEntry
    from pagetrackd.state import StateDir

log = structlog.get_logger("pagetrackd.metrics")

__all__ = ["OTHER", "EngineCollector", "MetricsServer", "RpcMetrics", "build_registry"]

#: the ``vm`` label of VMs past the cardinality cap
OTHER = "_other"

_RPC_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
)


class RpcMetrics:
    """RPC counts and latency by service, method and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("service", "method", "code")
        self.requests = Counter(
            "pagetrack_rpc_requests", "RPCs finished, by method and status code.",
            labels, registry=registry,
        )
        self.duration = Histogram(
            "pagetrack_rpc_duration_seconds",
            "RPC handling time (for streams: the stream's lifetime), by method and code.",
            labels, buckets=_RPC_BUCKETS, registry=registry,
        )
        #: (method path, code) -> its counter and histogram children: looking a child
        #: up by labels costs more than counting the call (the keys are the served
        #: methods times the status codes, a bounded set)
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one finished call; ``method`` is the full gRPC path."""
        children = self._children.get((method, code))
        if children is None:
            service, _, name = method.lstrip("/").rpartition("/")
            service = service.rsplit(".", 1)[-1]
            children = self._children[(method, code)] = (
                self.requests.labels(service, name, code),
                self.duration.labels(service, name, code),
            )
        children[0].inc()
        children[1].observe(seconds)


# (family name, help, kind) for the per-VM families, in output order
_VM_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("pagetrack_guest_writes", "Guest write calls (a batch of n counts n).", "counter"),
    ("pagetrack_guest_bytes_written", "Bytes guest writes stored in guest memory.", "counter"),
    ("pagetrack_mmio_exits", "Write pieces that exited to user space (MMIO).", "counter"),
    ("pagetrack_emulations", "Write pieces trapped, emulated and notified.", "counter"),
    ("pagetrack_events", "Track-write events produced (the VM's head seq).", "counter"),
    ("pagetrack_events_sent", "Events taken off Watch stream queues to be sent.", "counter"),
    ("pagetrack_events_dropped", "Events Watch streams lost (reported to them as gaps).",
     "counter"),
    ("pagetrack_events_coalesced", "Events superseded in COALESCE streams.", "counter"),
    ("pagetrack_notifications", "Notifier callbacks made.", "counter"),
    ("pagetrack_notifier_errors", "Notifier callbacks that raised.", "counter"),
    ("pagetrack_memslots", "Live memslots.", "gauge"),
    ("pagetrack_tracked_gfns", "Gfns whose track counter is above 0.", "gauge"),
    ("pagetrack_watchers", "Open Watch streams.", "gauge"),
    ("pagetrack_stream_queue_depth_events", "Events queued in Watch streams, summed.", "gauge"),
    ("pagetrack_stream_lag_events", "Largest lag (head seq - sent seq) of a Watch stream.",
     "gauge"),
    ("pagetrack_history_events", "Events held for Watch resume.", "gauge"),
    ("pagetrack_guest_memory_bytes", "Bytes guest memory holds, with its index.", "gauge"),
    ("pagetrack_track_pool_bytes", "Bytes held by track counters.", "gauge"),
)
_MAX_AGG = frozenset({"pagetrack_stream_lag_events"})
_PATHS = ("mmio_exit", "fast", "emulated")


def _vm_values(s: VmStatsView) -> dict[str, float]:
    st = s.streams
    return {
        "pagetrack_guest_writes": s.guest_writes,
        "pagetrack_guest_bytes_written": s.bytes_written,
        "pagetrack_mmio_exits": s.mmio_exits,
        "pagetrack_emulations": s.emulations,
        "pagetrack_events": s.head_seq,
        "pagetrack_events_sent": st.sent,
        "pagetrack_events_dropped": st.dropped,
        "pagetrack_events_coalesced": st.coalesced,
        "pagetrack_notifications": s.notifications,
        "pagetrack_notifier_errors": s.notifier_errors,
        "pagetrack_memslots": s.memslots,
        "pagetrack_tracked_gfns": s.tracked_gfns,
        "pagetrack_watchers": st.watchers,
        "pagetrack_stream_queue_depth_events": st.queue_depth,
        "pagetrack_stream_lag_events": st.max_lag,
        "pagetrack_history_events": s.history_events,
        "pagetrack_guest_memory_bytes": s.memory_bytes,
        "pagetrack_track_pool_bytes": s.track_pool_bytes,
    }


class _Tally:
    """The per-VM families, added up by (tenant, vm label) over the VMs' typed views."""

    def __init__(self) -> None:
        self.per: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)
        self.pieces: dict[tuple[str, ...], float] = defaultdict(float)
        self.cycles: dict[tuple[str, ...], float] = defaultdict(float)
        self.dma: dict[tuple[str, ...], float] = defaultdict(float)
        self.plugin_attached: dict[tuple[str, ...], float] = defaultdict(float)
        self.plugin_tracked: dict[tuple[str, ...], float] = defaultdict(float)
        self.plugin_status: dict[tuple[str, ...], float] = defaultdict(float)
        self.vms: dict[tuple[str, ...], float] = defaultdict(float)

    def add(self, tenant: str, label: str, entry: VmEntry) -> None:
        """Count one VM under its labels."""
        key = (tenant, label)
        self.vms[(tenant,)] += 1
        s = vm_stats(entry)
        for name, value in _vm_values(s).items():
            fam = self.per[name]
            if name in _MAX_AGG:
                fam[key] = max(fam.get(key, 0), value)
            else:
                fam[key] = fam.get(key, 0) + value
        for pname in _PATHS:
            self.pieces[(*key, pname)] += getattr(s.pieces, pname)
            self.cycles[(*key, pname)] += getattr(s.cycles, pname)
        self.cycles[(*key, "dma")] += s.dma_cycles
        self.dma[(*key, "applied")] += s.dma_applied
        self.dma[(*key, "bypassed")] += s.dma_bypassed
        self.dma[(*key, "notified")] += s.dma_notified
        self.dma[(*key, "rejected")] += s.dma_rejected
        for p in plugin_metrics(entry):
            pkey = (*key, p.name)
            self.plugin_attached[pkey] += 1
            self.plugin_tracked[pkey] += p.tracked_gfns
            for k, v in p.numbers.items():
                self.plugin_status[(*pkey, k)] += v


class EngineCollector(Collector):
    """Reads the engine (and the state directory) at scrape time."""

    def __init__(
        self, engine: Engine, *, max_vms: int = 100, state: StateDir | None = None
    ) -> None:
        self.engine = engine
        self.max_vms = max_vms
        self.state = state

    def _labelled(self) -> list[tuple[str, str, VmEntry]]:
        """(tenant, vm label, entry) for every VM; oldest VMs keep their own label."""
        entries = sorted(
            self.engine.list_vms(None), key=lambda e: (e.created_at_ns, e.tenant, e.name)
        )
        return [
            (e.tenant, e.name if i < self.max_vms else OTHER, e) for i, e in enumerate(entries)
        ]

    def collect(self) -> Iterator[Metric]:
        """Every family, computed now."""
        labelled = self._labelled()
        keys = ["tenant", "vm"]
        tally = _Tally()
        for tenant, label, entry in labelled:
            tally.add(tenant, label, entry)
        per, pieces, cycles, dma = tally.per, tally.pieces, tally.cycles, tally.dma
        plugin_attached, plugin_tracked = tally.plugin_attached, tally.plugin_tracked
        plugin_status, vms = tally.plugin_status, tally.vms
        for name, help_, kind in _VM_FAMILIES:
            yield _family(name, help_, kind, keys, per.get(name, {}))
        yield _family(
            "pagetrack_write_pieces", "Page-sized pieces of guest writes, by path.", "counter",
            [*keys, "path"], pieces,
        )
        yield _family(
            "pagetrack_dma", "DMA writes applied, pieces notified and writes rejected.",
            "counter", [*keys, "outcome"], dma,
        )
        yield _family(
            "pagetrack_simulated_cycles", "Simulated host CPU cycles by path.", "counter",
            [*keys, "path"], cycles,
        )
        pk = [*keys, "plugin"]
        yield _family("pagetrack_plugin_attached", "Attached plugins.", "gauge", pk,
                      plugin_attached)
        yield _family("pagetrack_plugin_tracked_gfns", "Gfns a plugin holds references on.",
                      "gauge", pk, plugin_tracked)
        yield _family(
            "pagetrack_plugin_status",
            "A plugin's own numeric counters and sizes (its status), by key.", "gauge",
            [*pk, "key"], plugin_status,
        )
        yield _family(
            "pagetrack_plugin_failure_detaches",
            "Third-party plugins detached for failing plugin_failure_limit hooks, by plugin.",
            "counter", ["plugin"],
            {(name,): float(n) for name, n in self.engine.plugin_failure_detaches.items()},
        )
        yield _family("pagetrack_vms", "VMs, by tenant.", "gauge", ["tenant"], vms)
        yield GaugeMetricFamily(
            "pagetrack_metrics_vms_aggregated",
            f"VMs past the label cap, added up under vm=\"{OTHER}\".",
            value=sum(1 for _, label, _ in labelled if label == OTHER),
        )
        leases: dict[tuple[str, ...], float] = defaultdict(float)
        for lease in self.engine.leases.live():
            leases[(lease.tenant, lease.kind.value)] += 1
        yield _family("pagetrack_leases", "Live leases, by tenant and kind.", "gauge",
                      ["tenant", "kind"], leases)
        yield CounterMetricFamily(
            "pagetrack_leases_expired", "Leases ended by their TTL.",
            value=self.engine.leases.expired_total,
        )
        runs: dict[tuple[str, ...], float] = defaultdict(float)
        for run in self.engine.workloads.values():
            if run.state == "running":
                runs[(run.tenant, run.kind)] += 1
        yield _family("pagetrack_workloads_running", "Running workloads.", "gauge",
                      ["tenant", "kind"], runs)
        info = GaugeMetricFamily("pagetrack_build_info", "The daemon's version.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from self._state_families()

    def _state_families(self) -> Iterable[Metric]:
        st = self.state
        if st is None:
            return
        yield CounterMetricFamily("pagetrack_state_saves", "State saves completed.",
                                  value=st.saves)
        yield CounterMetricFamily("pagetrack_state_save_errors", "State saves that failed.",
                                  value=st.save_errors)
        yield CounterMetricFamily(
            "pagetrack_state_vm_save_errors",
            "VM state files that could not be saved (each VM on its own; the others are"
            " still saved).", value=st.vm_save_errors)
        yield GaugeMetricFamily(
            "pagetrack_state_vms_unsaved", "VMs whose last save failed.",
            value=len([k for k in st.failing if k != "leases"]))
        yield CounterMetricFamily(
            "pagetrack_state_seq_reservation_errors",
            "Seq reservations that could not be written to the state directory.",
            value=st.seqs.errors)
        yield CounterMetricFamily("pagetrack_state_files_written",
                                  "VM state files written.", value=st.files_written)
        yield GaugeMetricFamily(
            "pagetrack_state_last_save_timestamp_seconds", "Unix time of the last save.",
            value=st.last_save_ns / 1e9,
        )
        yield GaugeMetricFamily(
            "pagetrack_state_last_save_duration_seconds", "How long the last save took.",
            value=st.last_save_s,
        )
        yield GaugeMetricFamily(
            "pagetrack_state_files_refused", "State files refused (moved aside) at start.",
            value=len(st.refused),
        )


def _family(
    name: str, help_: str, kind: str, labels: list[str], values: dict[tuple[str, ...], float]
) -> Metric:
    fam: Metric
    if kind == "counter":
        fam = CounterMetricFamily(name, help_, labels=labels)
    else:
        fam = GaugeMetricFamily(name, help_, labels=labels)
    for key, value in sorted(values.items()):
        fam.add_metric(list(key), value)
    return fam


def build_registry(
    engine: Engine, *, max_vms: int = 100, state: StateDir | None = None
) -> tuple[CollectorRegistry, RpcMetrics]:
    """A registry of its own (not the process-global one) with the engine collector and
    the RPC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, max_vms=max_vms, state=state))
    return registry, RpcMetrics(registry)


class MetricsServer:
    """A minimal HTTP/1.0 server for ``GET /metrics``, on the daemon's event loop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        may_scrape: Callable[[str | None], bool] = lambda authorization: True,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        #: whether a request's Authorization header may read /metrics
        self.may_scrape = may_scrape
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Bind and serve; returns ``host:port`` with the real port."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        port = self._server.sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.split(b"\r\n")
            parts = lines[0].split()
            authorization = next(
                (
                    line.split(b":", 1)[1].strip().decode("latin-1")
                    for line in lines[1:]
                    if line.lower().startswith(b"authorization:")
                ),
                None,
            )
            extra = ""
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if method not in (b"GET", b"HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path in (b"/metrics", b"/") and not self.may_scrape(authorization):
                status, ctype, body = (
                    "401 Unauthorized", "text/plain",
                    b"send 'Authorization: Bearer <token>' with a token of role metrics\n",
                )
                extra = 'WWW-Authenticate: Bearer realm="pagetrackd"\r\n'
            elif path in (b"/metrics", b"/"):
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(
                    self.registry
                )
            elif path == b"/healthz":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n{extra}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:
            log.exception("metrics.scrape_failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
