"""The Daemon: engine + gRPC server (our services, health, reflection) + lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.application import Engine, EngineConfig, make_quotas
from pagetrackd.auth import Authenticator
from pagetrackd.config import Config, parse_listen
from pagetrackd.journal import Journal
from pagetrackd.limits import ServerLimits
from pagetrackd.metrics import MetricsServer, RpcMetrics, build_registry
from pagetrackd.state import StateDir, StateSnapshots
from pagetrackd.transport.interceptors import RequestContextInterceptor
from pagetrackd.transport.reflection import reflection_handlers
from pagetrackd.transport.services import (
    AdminService,
    LeaseService,
    MemoryService,
    PluginService,
    TrackingService,
    VmService,
    WorkloadService,
)
from pagetrackd.transport.watch import WatchService

log = structlog.get_logger("pagetrackd")

SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in (
        "VmService", "MemoryService", "TrackingService", "LeaseService", "WatchService",
        "PluginService", "WorkloadService", "AdminService",
    )
)


def _server_credentials(config: Config) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


def _remove_stale_socket(path: str) -> None:
    p = Path(path)
    if p.exists() and p.is_socket():
        p.unlink()  # left by a daemon that did not shut down cleanly


class _GenericOnly:
    """Hands the generated ``add_*_to_server`` functions our server, minus registered
    methods. grpc.aio keeps one pending request task per registered method and waits on
    all of them (asyncio.wait over ~45 tasks here) for every incoming call, about
    100 us per RPC; the generic handlers registered alongside serve the same methods."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass


def _write_ready(path: str, addresses: list[str], metrics: str = "") -> None:
    tmp = Path(path + ".tmp")
    doc: dict[str, object] = {"addresses": addresses}
    if metrics:
        doc["metrics"] = metrics
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


class BoundedHealth(health.aio.HealthServicer):
    """grpc.health.v1 with a bound on open Watch streams: they need no token, so without
    one anyone could hold any number of them (and the memory each costs)."""

    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watching = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if self.watching >= self.max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_watchers} Health.Watch streams are open, the daemon's"
                " health_watchers limit; use Health.Check, or retry later",
            )
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1


class Daemon:
    """One pagetrackd: start() binds and serves, stop() drains and ends streams."""

    def __init__(self, config: Config, limits: ServerLimits | None = None) -> None:
        self.config = config
        self.limits = limits or ServerLimits()
        self.engine = Engine(
            EngineConfig(
                history_events=config.history_events,
                history_bytes=config.history_bytes,
                quotas=make_quotas(config.quotas),
                tenant_quotas={
                    t: make_quotas(q, make_quotas(config.quotas))
                    for t, q in config.tenant_quotas.items()
                },
                plugins_allow=config.plugins_allow,
                plugin_failure_limit=config.plugin_failure_limit,
            )
        )
        self.engine.snapshots = StateSnapshots()
        self.auth = (
            Authenticator.from_file(Path(config.tokens_file))
            if config.tokens_file
            else Authenticator()
        )
        self.health = BoundedHealth(config.health_watchers)
        self.server: grpc.aio.Server | None = None
        self.addresses: list[str] = []
        self.watch = WatchService(self.engine, self.limits)
        #: saved VM state (--state-dir); None when nothing is saved
        self.state = StateDir(Path(config.state_dir)) if config.state_dir else None
        if self.state is not None and config.durability == "journal":
            self.state.journal = Journal(Path(config.state_dir) / "journal")
        self._saver: asyncio.Task[None] | None = None
        self._journal_task: asyncio.Task[None] | None = None
        self.rpc_metrics: RpcMetrics | None = None
        self.metrics: MetricsServer | None = None
        self.metrics_address = ""
        #: what the process exits with after stop(): 1 when the final save failed
        self.exit_code = 0
        if config.metrics_port:
            registry, self.rpc_metrics = build_registry(
                self.engine, max_vms=config.metrics_max_vms, state=self.state
            )
            self.metrics = MetricsServer(
                registry, config.metrics_host, config.metrics_port, self.auth.may_scrape
            )

    async def start(self) -> list[str]:
        """Bind every listen address and start serving; returns the bound addresses
        (with real ports when port 0 was asked for)."""
        lim = self.limits
        server = grpc.aio.server(
            interceptors=[
                RequestContextInterceptor(
                    self.auth, self.rpc_metrics.observe if self.rpc_metrics else None,
                    self.state.journal if self.state is not None else None,
                    serialize=self.engine.vm_locks.hold,
                )
            ],
            options=[
                ("grpc.max_receive_message_length", lim.max_message_bytes),
                ("grpc.max_send_message_length", lim.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        engine = self.engine
        srv: Any = _GenericOnly(server)
        pbg.add_VmServiceServicer_to_server(VmService(engine), srv)
        pbg.add_MemoryServiceServicer_to_server(MemoryService(engine, lim), srv)
        pbg.add_TrackingServiceServicer_to_server(TrackingService(engine, lim), srv)
        pbg.add_LeaseServiceServicer_to_server(LeaseService(engine), srv)
        pbg.add_WatchServiceServicer_to_server(self.watch, srv)
        pbg.add_PluginServiceServicer_to_server(PluginService(engine, lim), srv)
        pbg.add_WorkloadServiceServicer_to_server(WorkloadService(engine), srv)
        pbg.add_AdminServiceServicer_to_server(AdminService(engine, lim), srv)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, srv)
        # Reflection as v1 and v1alpha, as generic handlers (enable_server_reflection, given
        # the server itself, registers a method, which costs every call).
        server.add_generic_rpc_handlers(
            reflection_handlers(
                (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
            )
        )
        creds = _server_credentials(self.config)
        bound = []
        for addr in self.config.listen:
            host, port = parse_listen(addr)
            if host == "unix":
                _remove_stale_socket(port)
                server.add_insecure_port(addr)
                bound.append(addr)
                continue
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            real = (
                server.add_secure_port(target, creds)
                if creds is not None
                else server.add_insecure_port(target)
            )
            bound.append(f"[{host}]:{real}" if ":" in host else f"{host}:{real}")
        if self.state is not None:
            self.state.load(engine)  # before serving: no client sees a half-loaded daemon
        await engine.start()
        await server.start()
        if self.state is not None:
            self._saver = asyncio.create_task(
                self.state.run(engine, self.config.save_interval_s), name="state-saver"
            )
            if self.state.journal is not None:
                self._journal_task = asyncio.create_task(
                    self.state.journal.run(), name="journal-flusher"
                )
        if self.metrics is not None:
            self.metrics_address = await self.metrics.start()
            log.info("metrics.listening", address=self.metrics_address)
        self.server = server
        self.addresses = bound
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if not self.auth.enabled and self.config.insecure:
            log.warning("daemon.insecure", detail="serving without tokens on a network address")
        log.info("daemon.listening", addresses=bound, tls=creds is not None, auth=self.auth.enabled)
        if self.config.ready_file:
            _write_ready(self.config.ready_file, bound, self.metrics_address)
        return bound

    async def stop(self, grace: float | None = None) -> None:
        """Stop: health NOT_SERVING, streams end with UNAVAILABLE, in-flight calls get
        ``grace`` seconds."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.engine.stop()
        for stream in list(self.watch.streams.values()):
            stream.wake.set()
        if self.server is not None:
            await self.server.stop(grace)
        for task in (self._saver, self._journal_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.state is not None:
            # Streams have ended, so their leases' references are gone: what is saved is
            # what a restart should bring back.
            written = await self.state.save(self.engine)
            self.state.release_unused(self.engine)
            if self.state.journal is not None:
                await self.state.journal.close()
            if self.state.last_save_complete:
                log.info("state.saved", path=str(self.state.path), written=written)
            else:
                self.exit_code = 1
                log.error("state.final_save_incomplete", path=str(self.state.path),
                          written=written, unsaved=self.state.failing)
        if self.metrics is not None:
            await self.metrics.stop()
        log.info("daemon.stopped")

    async def wait(self) -> None:
        """Until the server ends."""
        if self.server is not None:
            await self.server.wait_for_termination()


__all__ = ["Daemon"]
