"""A real nats-server with JetStream, the exporter as a child process, and readers that
check what JetStream holds. Every child gets SIGKILL when the test process dies."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from pagetrack.export.subjects import subject
from pagetrack.v1 import pagetrack_pb2 as pb

BIN = Path(sys.executable).parent
STREAM = "PAGETRACK"


def dies_with_us(cmd: list[str]) -> list[str]:
    """``cmd`` under setpriv --pdeathsig: it gets SIGKILL when this process dies, even by
    SIGKILL (no preexec_fn: forking a process that runs gRPC threads is not safe)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"nothing listens on {port}:\n{log.read_text()}") from None
            time.sleep(0.02)


class NatsServer:
    """``nats-server -js`` on a fixed free port with its store under ``dir``; it can be
    killed and started again on the same port and store."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.port = free_port()
        self.log = dir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                dies_with_us([str(BIN / "nats-server"), "-js", "-a", "127.0.0.1",
                              "-p", str(self.port), "-sd", str(self.dir / "store")]),
                stdout=out, stderr=subprocess.STDOUT,
            )
        wait_port(self.port, self.proc, self.log)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ExporterProcess:
    """``pagetrack export nats`` as a child process (so it can be SIGKILLed)."""

    def __init__(self, dir: Path, target: str, nats_url: str, *args: str,
                 token: str | None = None) -> None:
        self.dir = dir
        self.cmd = [str(BIN / "pagetrack"), "--target", target,
                    *(["--token", token] if token else []),
                    "export", "nats", "--nats", nats_url, "--create-stream", *args]
        self.log = dir / "exporter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAGETRACK_")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(dies_with_us(self.cmd), stdout=out,
                                         stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"exporter ignored SIGTERM:\n{self.log.read_text()}") from None
        return self.proc.returncode


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, bound_s: float = 60
) -> None:
    """Poll ``check`` until it is true; the deadline only bounds a hang."""
    deadline = time.monotonic() + bound_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Record:
    """One message of a VM, in stream order."""

    kind: str
    first: int
    last: int
    headers: dict[str, str]
    data: bytes
    stream_seq: int


async def connect(url: str) -> tuple[Nats, JetStreamContext]:
    nc = await nats.connect(url, allow_reconnect=False)
    return nc, nc.jetstream()


async def read_vm(js: JetStreamContext, tenant: str, vm: str,
                  prefix: str = "pagetrack") -> list[Record]:
    """Every message of one VM, in stream order, through an ephemeral consumer."""
    filt = subject(prefix, tenant, vm, "*")
    try:
        info = await js.stream_info(STREAM, subjects_filter=filt)
    except nats.js.errors.NotFoundError:
        return []
    total = sum((info.state.subjects or {}).values())
    if total == 0:
        return []
    sub = await js.pull_subscribe(
        filt, stream=STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
                              inactive_threshold=30.0),
    )
    out: list[Record] = []
    try:
        while len(out) < total:
            for msg in await sub.fetch(min(100, total - len(out)), timeout=10):
                h = dict(msg.headers or {})
                out.append(Record(
                    h["Pagetrack-Kind"], int(h["Pagetrack-First-Seq"]),
                    int(h["Pagetrack-Last-Seq"]), h, msg.data, msg.metadata.sequence.stream,
                ))
    finally:
        await sub.unsubscribe()
    return out


@dataclass
class Tiling:
    """What the events and gaps of a VM cover."""

    next_seq: int = 1  #: the seq after the last one covered
    events: int = 0
    gaps: list[tuple[int, int, str]] = field(default_factory=list)


def tiling(records: list[Record]) -> Tiling:
    """Check that events and gaps cover 1..n once each, in order, and that each batch
    holds exactly the seqs its headers name."""
    t = Tiling()
    for rec in records:
        if rec.kind == "regions":
            continue
        assert rec.first == t.next_seq, (
            f"stream seq {rec.stream_seq}: {rec.kind} {rec.first}..{rec.last} after"
            f" {t.next_seq - 1}"
        )
        assert rec.last >= rec.first
        if rec.kind == "events":
            seqs = _event_seqs(rec)
            assert seqs == list(range(rec.first, rec.last + 1)), rec.headers
            t.events += len(seqs)
        else:
            assert rec.kind == "gaps"
            t.gaps.append((rec.first, rec.last, rec.headers["Pagetrack-Gap-Reason"]))
        t.next_seq = rec.last + 1
    return t


def _event_seqs(rec: Record) -> list[int]:
    if rec.headers["Content-Type"].startswith("application/x-protobuf"):
        batch = pb.EventBatch()
        batch.ParseFromString(rec.data)
        return list(batch.seq)
    return [json.loads(line)["seq"] for line in rec.data.decode().splitlines()]


def json_dumps(value: Any) -> str:
    return json.dumps(value)
