"""Helpers for the "nobody starved" tests: a real daemon with two tenants (an attacker
and a victim), the victim's requests timed while the attacker works, the daemon's RSS.

Each test states its bounds next to the case. The machine running the suite is shared
and loaded, so latency bounds are generous: they tell a daemon that keeps serving from
one that stalls for seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.auth import hash_token
from tests.daemon_process import DaemonProcess, start_daemon
from tests.integration.support import Api, connect, new_name

ROOT = Path(__file__).resolve().parents[2]
ATTACKER = "attacker-token"
VICTIM = "victim-token"
SCRAPER = "scraper-token"  #: role metrics: may only scrape /metrics
MiB = 1 << 20


def write_tokens(tmp: Path) -> Path:
    """A tokens file: tenants ``attacker`` and ``victim``, and a Prometheus scraper."""
    path = tmp / "tokens.toml"
    path.write_text(
        "".join(
            f'[[token]]\nsha256 = "{hash_token(t)}"\ntenant = "{n}"\nrole = "{r}"\n\n'
            for t, n, r in (
                (ATTACKER, "attacker", "tenant"), (VICTIM, "victim", "tenant"),
                (SCRAPER, "prometheus", "metrics"),
            )
        )
    )
    return path


def start(tmp: Path, config: str = "", *args: str) -> DaemonProcess:
    """A daemon with the two tenants and ``config`` (TOML text) as its config file."""
    path = tmp / "pagetrackd.toml"
    path.write_text(config)
    return start_daemon(
        tmp, "--config", str(path), "--tokens-file", str(write_tokens(tmp)), *args
    )


@contextlib.contextmanager
def daemon(tmp: Path, config: str = "", *args: str) -> Iterator[DaemonProcess]:
    """:func:`start`, stopped (and checked to exit cleanly) afterwards."""
    d = start(tmp, config, *args)
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log.read_text()[-4000:]


class Tenant:
    """One tenant's channel: stubs that send its bearer token."""

    def __init__(self, target: str, token: str) -> None:
        # Large answers (a query over many gfns) need more than grpc's 4 MiB default.
        self.api: Api = connect(target, [("grpc.max_receive_message_length", 64 * MiB)])
        self.md = (("authorization", f"Bearer {token}"),)

    async def call(self, method: Any, request: Any) -> Any:
        """A unary call with the token (a minute at most: a hang fails the test)."""
        return await method(request, metadata=self.md, timeout=60)

    async def new_vm(
        self, npages: int = 4096, options: pb.VmOptions | None = None, base_gfn: int = 0
    ) -> str:
        """A VM with one memslot of ``npages`` pages at ``base_gfn``."""
        name = new_name("rb")
        await self.call(self.api.vm.CreateVm, pb.CreateVmRequest(name=name, options=options))
        await self.call(
            self.api.mem.SetMemoryRegion,
            pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=base_gfn, npages=npages),
        )
        return name

    async def close(self) -> None:
        await self.api.channel.close()


async def refused(call: Any, quota: str) -> str:
    """Await ``call``, which must fail with RESOURCE_EXHAUSTED naming ``quota``."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), details)
        assert quota in details, f"{quota!r} not named in {details!r}"
        return details
    raise AssertionError(f"expected RESOURCE_EXHAUSTED naming {quota}; the call succeeded")


@dataclass
class Latencies:
    """The victim's request latencies, seconds."""

    samples: list[float] = field(default_factory=list)
    #: when each request was answered (``time.time()``, the victim's clock)
    ends: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def served_between(self, start: float, end: float) -> int:
        """Requests answered between ``start`` and ``end`` (``time.time()``)."""
        return sum(1 for t in self.ends if start <= t <= end)

    def worst(self) -> float:
        return max(self.samples, default=float("inf"))

    def p99(self) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(len(s) * 0.99))] if s else float("inf")


@contextlib.asynccontextmanager
async def victim_meanwhile(target: str) -> AsyncIterator[Latencies]:
    """The victim tenant keeps writing to and reading its own VM (one request at a time,
    from its own process) while the body runs. The latencies are filled in when the
    body is done, so a request held up by the body is counted."""
    out = Latencies()
    with tempfile.TemporaryDirectory(prefix="victim-") as folder:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.robustness.starve_victim", target, VICTIM, folder,
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 30
            ready = Path(folder) / "ready"
            while not ready.exists():
                assert proc.returncode is None, "the victim ended before its first answer"
                assert time.monotonic() < deadline, "the victim got no answer in 30 s"
                await asyncio.sleep(0.01)  # polling a file another process writes
            yield out
        finally:
            (Path(folder) / "stop").write_text("")
            stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
        doc = json.loads(stdout)
        out.samples = doc["samples"]
        out.ends = doc.get("ends", [])
        out.errors = doc["errors"]
