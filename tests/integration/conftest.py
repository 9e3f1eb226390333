"""Integration fixtures: a real ``pagetrackd`` subprocess on 127.0.0.1:0 and a unix socket.

One daemon serves the whole session (each test makes its own uniquely named VMs and
deletes them); tests that stop a daemon start their own with :class:`DaemonProcess`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.daemon_process import let_go, popen_pagetrackd
from tests.integration.support import Api, connect, new_name
from tests.waiting import HANG_S

ROOT = Path(__file__).resolve().parents[2]
PAGETRACKD = Path(sys.executable).with_name("pagetrackd")


class DaemonProcess:
    """A ``pagetrackd`` child process listening on a free TCP port and a unix socket."""

    def __init__(self, *extra: str) -> None:
        # mkdtemp under /tmp keeps the socket path far below the 108-byte sun_path limit.
        self.dir = Path(tempfile.mkdtemp(prefix="ptd-"))
        self.ready = self.dir / "ready.json"
        self.log_path = self.dir / "pagetrackd.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.addresses: list[str] = []

    @property
    def tcp(self) -> str:
        """The bound ``127.0.0.1:PORT`` address."""
        return next(a for a in self.addresses if not a.startswith("unix:"))

    @property
    def unix(self) -> str:
        """The ``unix:PATH`` address."""
        return next(a for a in self.addresses if a.startswith("unix:"))

    def start(self, timeout: float = HANG_S) -> list[str]:
        """Start the process and wait for its ready file."""
        cmd = [
            "--listen", "127.0.0.1:0", "--listen", f"unix:{self.dir}/pt.sock",
            "--ready-file", str(self.ready), "--log-format", "json", *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAGETRACK_")}
        with self.log_path.open("wb") as log:
            self.proc = popen_pagetrackd(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"pagetrackd exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"pagetrackd did not get ready in {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        self.addresses = list(json.loads(self.ready.read_text())["addresses"])
        return self.addresses

    def terminate(self) -> None:
        """Send SIGTERM."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = HANG_S) -> int:
        """Wait for the exit code (kill after ``timeout``)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"pagetrackd did not exit in {timeout}s:\n{self.log()}") from None
        finally:
            let_go(self.proc)

    def stop(self, timeout: float = HANG_S) -> int:
        """SIGTERM, then the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.terminate()
        return self.wait(timeout)

    def cleanup(self) -> None:
        """Remove the socket, ready file and log."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        """Everything the daemon printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, object]]:
        """The daemon's JSON log records."""
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


@pytest.fixture(scope="session")
def daemon() -> Iterator[DaemonProcess]:
    """A pagetrackd shared by the session; stopped with SIGTERM, which must exit 0."""
    d = DaemonProcess("--grace", "1")
    d.start()
    yield d
    code = d.stop()
    assert code == 0, f"pagetrackd exited with {code}:\n{d.log()[-4000:]}"
    unmapped = [r for r in d.log_records() if r.get("event") == "rpc.unmapped_exception"]
    assert not unmapped, f"client input reached INTERNAL: {unmapped[:3]}"
    d.cleanup()  # kept when an assertion above failed, for its log


@pytest.fixture
async def api(daemon: DaemonProcess) -> AsyncIterator[Api]:
    """Raw grpc.aio stubs over TCP."""
    a = connect(daemon.tcp)
    try:
        yield a
    finally:
        await a.channel.close()


@pytest.fixture
async def unix_api(daemon: DaemonProcess) -> AsyncIterator[Api]:
    """Raw grpc.aio stubs over the unix socket."""
    a = connect(daemon.unix)
    try:
        yield a
    finally:
        await a.channel.close()


@pytest.fixture
async def vm(api: Api) -> AsyncIterator[str]:
    """A fresh VM with slot 0 = gfns 0x100..0x13f (dirty-logged) and slot 1 = gfns
    0x200..0x20f (read-only); deleted afterwards."""
    name = new_name()
    await api.vm.CreateVm(pb.CreateVmRequest(name=name))
    await api.mem.SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=0x100, npages=64,
                                  log_dirty_pages=True)
    )
    await api.mem.SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=name, slot=1, base_gfn=0x200, npages=16, readonly=True)
    )
    yield name
    try:
        await api.vm.DeleteVm(pb.DeleteVmRequest(vm=name))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:  # the test may have deleted it
            raise
