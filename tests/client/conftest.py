"""Client test fixtures: one real ``pagetrackd`` on 127.0.0.1:0 and a unix socket for the
session, fresh VM names per test, and an AsyncClient over either address."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pagetrack import AsyncClient
from tests.daemon_process import DaemonProcess, start_daemon


def short_tmp() -> Path:
    """A directory under /tmp: unix socket paths must stay below 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="ptc-"))


@pytest.fixture(scope="session")
def daemon() -> Iterator[DaemonProcess]:
    """A daemon shared by the client tests (each test uses its own VMs)."""
    tmp = short_tmp()
    d = start_daemon(tmp, listen=("127.0.0.1:0", f"unix:{tmp}/pt.sock"))
    yield d
    try:
        assert d.stop() == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=["tcp", "unix"])
def address(request: pytest.FixtureRequest, daemon: DaemonProcess) -> str:
    """The shared daemon's TCP address, then its unix socket."""
    want_unix = request.param == "unix"
    return next(a for a in daemon.addresses if a.startswith("unix:") == want_unix)


@pytest.fixture
async def client(address: str) -> AsyncIterator[AsyncClient]:
    """An AsyncClient on the shared daemon (over TCP and over the unix socket)."""
    async with AsyncClient(address, timeout=10) as c:
        yield c


@pytest.fixture
async def tcp_client(daemon: DaemonProcess) -> AsyncIterator[AsyncClient]:
    """An AsyncClient on the shared daemon's TCP address."""
    async with AsyncClient(daemon.tcp, timeout=10) as c:
        yield c


@pytest.fixture
def vm_name() -> str:
    """A VM name no other test uses."""
    return f"c-{uuid.uuid4().hex[:10]}"
