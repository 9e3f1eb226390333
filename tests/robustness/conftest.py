"""Fixtures for robustness tests: real ``pagetrackd`` processes, started with a given
config and state directory, killed and restarted at will. Every daemon a test starts
dies with it: killed at teardown, and stopped by its stdin pipe closing if pytest
itself dies (tests.daemon_process.popen_pagetrackd)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagetrack import Client
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import let_go, popen_pagetrackd


@dataclass
class Daemon:
    """One ``pagetrackd`` process: its address, log, and stubs per tenant token."""

    proc: subprocess.Popen[bytes]
    address: str
    log: Path
    tokens: dict[str, str]
    metrics: str = ""  #: HOST:PORT of /metrics, when started with --metrics-port
    _channels: list[grpc.Channel] = field(default_factory=list, repr=False)

    def stub(self, service: str, tenant: str | None = None) -> Any:
        """A stub of ``service`` (e.g. "VmService") calling as ``tenant`` (needs the
        daemon started with that tenant; None = no token)."""
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        if tenant is not None:
            channel = grpc.intercept_channel(channel, _Token(self.tokens[tenant]))
        return getattr(pbg, f"{service}Stub")(channel)

    def client(self, tenant: str | None = None) -> Client:
        """The pagetrack client, calling as ``tenant``."""
        return Client(self.address, token=self.tokens[tenant] if tenant else None)

    def log_text(self) -> str:
        """What the daemon logged so far."""
        return self.log.read_text(errors="replace")

    def close_channels(self) -> None:
        """Close every channel the stubs opened."""
        for ch in self._channels:
            ch.close()
        self._channels.clear()

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        let_go(self.proc)
        self.close_channels()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM; returns the exit code."""
        self.close_channels()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            let_go(self.proc)


class _Token(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, cont: Any, details: Any, request: Any) -> Any:
        return cont(self._details(details), request)

    def intercept_unary_stream(self, cont: Any, details: Any, request: Any) -> Any:
        return cont(self._details(details), request)

    def intercept_stream_unary(self, cont: Any, details: Any, requests: Any) -> Any:
        return cont(self._details(details), requests)


@dataclass
class Daemons:
    """Starts daemons for one test and stops them all at its end."""

    tmp: Path
    started: list[Daemon] = field(default_factory=list)

    def start(
        self,
        *args: str,
        state_dir: Path | None = None,
        config: dict[str, Any] | None = None,
        tenants: tuple[str, ...] = (),
        expect_exit: bool = False,
    ) -> Daemon:
        """Start ``pagetrackd`` on 127.0.0.1:0 with ``args``, a state directory, a TOML
        config (``config`` as a dict of top-level keys and tables) and one token per
        tenant; wait until it serves. With ``expect_exit`` the process is expected to
        exit on its own: the Daemon is returned once it has (check ``proc.returncode``)."""
        n = len(self.started)
        log = self.tmp / f"pagetrackd-{n}.log"
        ready = self.tmp / f"ready-{n}.json"
        cmd = ["--listen", "127.0.0.1:0", "--ready-file", str(ready), "--log-format", "json",
               *args]
        if state_dir is not None:
            cmd += ["--state-dir", str(state_dir)]
        if config is not None:
            path = self.tmp / f"config-{n}.toml"
            path.write_text(_toml(config))
            cmd += ["--config", str(path)]
        tokens = {t: f"token-{t}-secret" for t in tenants}
        if tenants:
            path = self.tmp / f"tokens-{n}.toml"
            path.write_text("".join(
                f'[[token]]\nsha256 = "{_sha(tok)}"\ntenant = "{t}"\nrole = "tenant"\n\n'
                for t, tok in tokens.items()
            ))
            cmd += ["--tokens-file", str(path)]
        with open(log, "ab") as out:
            # No preexec_fn: forking with other threads running (a writer, grpc's) could
            # hang the child before its exec.
            proc = popen_pagetrackd(cmd, stdout=subprocess.DEVNULL, stderr=out)
        d = Daemon(proc, "", log, tokens)
        self.started.append(d)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None:
                let_go(proc)
                if expect_exit:
                    return d
                raise RuntimeError(f"pagetrackd exited {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"pagetrackd did not start:\n{log.read_text()}")
            time.sleep(0.01)
        doc = json.loads(ready.read_text())
        d.address = doc["addresses"][0]
        d.metrics = doc.get("metrics", "")
        return d

    def stop_all(self) -> None:
        """Kill whatever still runs."""
        for d in self.started:
            d.kill()


def _sha(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _toml(config: dict[str, Any], prefix: str = "") -> str:
    """``config`` as TOML: plain keys, then one table per dict (nested ones too)."""
    head = f"[{prefix}]\n" if prefix else ""
    plain = "".join(
        f"{k} = {_toml_value(v)}\n" for k, v in config.items() if not isinstance(v, dict)
    )
    tables = "".join(
        _toml(v, f"{prefix}.{k}" if prefix else k)
        for k, v in config.items() if isinstance(v, dict)
    )
    return head + plain + "\n" + tables


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """Start real daemons; all are killed when the test ends."""
    ds = Daemons(tmp_path)
    try:
        yield ds
    finally:
        ds.stop_all()


def wait_for(cond: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``cond()`` until it returns something truthy (returned); fail after
    ``timeout`` seconds (a bound on a hang, not a delay)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
