"""The exporter's Prometheus metrics: progress, lag, published counts and waits."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class ExportMetrics:
    """One registry per exporter, so that several in one process (tests) keep apart."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        labels = ["tenant", "vm"]
        self.messages = Counter(
            "pagetrack_export_messages", "Messages stored in JetStream (acked), by kind.",
            [*labels, "kind"], registry=r)
        self.events = Counter(
            "pagetrack_export_events", "Events stored in JetStream.", labels, registry=r)
        self.bytes = Counter(
            "pagetrack_export_payload_bytes", "Payload bytes stored in JetStream.", labels,
            registry=r)
        self.duplicates = Counter(
            "pagetrack_export_duplicates",
            "Publishes JetStream dropped as repeats (same Nats-Msg-Id in its window).",
            labels, registry=r)
        self.gap_events = Counter(
            "pagetrack_export_gap_events", "Events reported lost in gap messages, by reason.",
            [*labels, "reason"], registry=r)
        self.exported_seq = Gauge(
            "pagetrack_export_exported_seq",
            "Newest seq stored in JetStream as an event or in a gap.", labels, registry=r)
        self.head_seq = Gauge(
            "pagetrack_export_head_seq", "The VM's newest seq, as the daemon last said.",
            labels, registry=r)
        self.lag = Gauge(
            "pagetrack_export_lag_events", "head_seq - exported_seq.", labels, registry=r)
        self.inflight = Gauge(
            "pagetrack_export_inflight", "Publishes awaiting their JetStream ack.", labels,
            registry=r)
        self.ack_wait = Counter(
            "pagetrack_export_ack_wait_seconds",
            "Time the Watch was held back waiting for JetStream acks (backpressure).",
            labels, registry=r)
        self.restarts = Counter(
            "pagetrack_export_restarts",
            "Times a VM's export started again from JetStream's position, by cause.",
            [*labels, "cause"], registry=r)
        self.vms = Gauge("pagetrack_export_vms", "VMs being exported.", registry=r)
        self.nats_connects = Counter(
            "pagetrack_export_nats_connects", "Connections made to NATS.", registry=r)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 = a free port); returns the port."""
        server, _ = start_http_server(port, host, registry=self.registry)
        return int(server.server_address[1])

    def forget(self, tenant: str, vm: str) -> None:
        """Drop a VM's gauges (it was deleted); counters stay, as Prometheus expects."""
        for gauge in (self.exported_seq, self.head_seq, self.lag, self.inflight):
            try:
                gauge.remove(tenant, vm)
            except KeyError:
                pass
