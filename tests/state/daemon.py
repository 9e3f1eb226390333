"""A real ``pagetrackd`` subprocess for the state and metrics tests."""

from __future__ import annotations

import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import let_go
from tests.daemon_process import start_daemon as start_process


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Daemon:
    """One running daemon: its process, address, log file and stubs."""

    proc: subprocess.Popen[bytes]
    address: str
    metrics: str
    log: Path
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def channel(self) -> grpc.Channel:
        """A channel to the daemon (made once)."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def stub(self, name: str) -> Any:
        """The stub of one service, e.g. ``stub("VmService")``."""
        return getattr(pbg, f"{name}Stub")(self.channel)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` and wait for the process to end; returns its exit code."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            let_go(self.proc)

    def log_text(self) -> str:
        """Everything the daemon logged so far."""
        return self.log.read_text(errors="replace")


def start_daemon(tmp: Path, *args: str, name: str = "pagetrackd") -> Daemon:
    """Start ``pagetrackd`` on 127.0.0.1:0 with ``args`` and wait until it serves; each
    start logs to a file of its own."""
    n = len(list(tmp.glob(f"{name}-*.log")))
    d = start_process(tmp, *args, log_name=f"{name}-{n}.log")
    return Daemon(d.proc, d.addresses[0], d.metrics, d.log)
