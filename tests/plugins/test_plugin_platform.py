"""Third-party plugins end to end: examples/integrity-monitor installed with pip, attached
by name through the API and the CLI, its findings on a Watch stream, resumed across a
restart with --state-dir, and a plugin that raises detached while the daemon serves on.

The packages are installed with ``pip install --target`` into a directory of the test's
own and the daemon sees them through PYTHONPATH, exactly as it would see them in an
operator's venv (importlib.metadata reads the entry points from the installed
``.dist-info``). ``--no-deps --no-build-isolation --no-index`` builds a copy of the
package with the setuptools of the project's venv (a dev dependency): no network,
nothing written into the repository, and nothing leaks into .venv for other tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pagetrack import AsyncClient, errors
from pagetrack.types import EventBatch, Finding, Registered
from tests.daemon_process import BIN, DaemonProcess, let_go, popen_pagetrackd
from tests.waiting import HANG_S

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "integrity-monitor"
PAGE = 4096
KTEXT, IDT, FAULTY_GFN = 0x100, 0x200, 0x300

FAULTY_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "faulty-plugin"
version = "0.1.0"

[project.entry-points."pagetrackd.plugins"]
faulty = "faulty_plugin:Faulty"
"""

FAULTY_MODULE = '''
from pagetrackd.plugins.api import BasePlugin


class Faulty(BasePlugin):
    """Tracks one gfn and raises on every write to it."""

    def attach(self, handle, options):
        self.handle = handle
        handle.track(int(options["gfn"]))

    def on_write(self, piece):
        raise RuntimeError(f"faulty plugin saw seq {piece.seq}")
'''


def _pip_install(package: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", "--disable-pip-version-check",
         "--target", str(target), str(package)],
        check=True, timeout=300, capture_output=True,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the integrity monitor and a faulty plugin pip-installed in it."""
    root = tmp_path_factory.mktemp("plugins")
    faulty = root / "faulty"
    (faulty / "faulty_plugin").mkdir(parents=True)
    (faulty / "pyproject.toml").write_text(FAULTY_PYPROJECT)
    (faulty / "faulty_plugin" / "__init__.py").write_text(textwrap.dedent(FAULTY_MODULE))
    target = root / "site"
    # setuptools builds in the source tree (build/, *.egg-info): build a copy.
    example = shutil.copytree(EXAMPLE, root / "integrity-monitor")
    _pip_install(example, target)
    _pip_install(faulty, target)
    assert (target / "pagetrack_integrity_monitor" / "__init__.py").is_file()
    return target


def start(tmp: Path, site: Path, state: Path) -> DaemonProcess:
    """pagetrackd seeing ``site``, allowing both plugins, failure limit 3."""
    config = tmp / "pagetrackd.toml"
    config.write_text(
        'plugins_allow = ["integrity-monitor", "faulty"]\nplugin_failure_limit = 3\n'
    )
    ready = tmp / f"ready-{time.monotonic_ns()}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    with open(tmp / "daemon.log", "ab") as out:
        proc = popen_pagetrackd(
            ["--listen", "127.0.0.1:0", "--ready-file", str(ready), "--log-format", "json",
             "--config", str(config), "--state-dir", str(state), "--save-interval", "3600"],
            stdout=subprocess.DEVNULL, stderr=out, env=env,
        )
    deadline = time.monotonic() + HANG_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            let_go(proc)
            raise RuntimeError(f"pagetrackd did not start:\n{(tmp / 'daemon.log').read_text()}")
        time.sleep(0.02)
    return DaemonProcess(proc, json.loads(ready.read_text())["addresses"], tmp / "daemon.log")


@pytest.fixture
def daemon(tmp_path: Path, site: Path) -> Iterator[tuple[DaemonProcess, Path]]:
    state = tmp_path / "state"
    d = start(tmp_path, site, state)
    try:
        yield d, state
    finally:
        d.stop()


@pytest.fixture
async def client(daemon: tuple[DaemonProcess, Path]) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(daemon[0].tcp) as c:
        yield c


async def findings_until(stream: Any, n: int) -> tuple[list[Finding], list[int]]:
    """Read ``stream`` until ``n`` findings came; returns them and the event seqs seen."""
    found: list[Finding] = []
    seqs: list[int] = []

    async def read() -> None:
        async for msg in stream:
            if isinstance(msg, Finding):
                found.append(msg)
                if len(found) == n:
                    return
            elif isinstance(msg, EventBatch):
                seqs.extend(int(s) for s in msg.seq)

    await asyncio.wait_for(read(), HANG_S)  # the deadline only bounds a hang
    return found, seqs


async def registered(stream: Any) -> None:
    """Wait for the stream's Registered: from then on it misses nothing."""
    msg = await asyncio.wait_for(anext(stream), HANG_S)
    assert isinstance(msg, Registered), msg


async def setup_vm(c: AsyncClient, name: str = "guest") -> None:
    await c.create_vm(name, vcpus=2)
    await c.set_memory_region(name, 0, 0, 1024)


async def test_refused_attach_says_why(client: AsyncClient) -> None:
    """A plugin not in plugins_allow is PermissionDenied naming the setting; a bad option
    is InvalidArgument and a range outside memory FailedPrecondition, each leaving
    nothing attached or tracked."""
    await setup_vm(client)
    with pytest.raises(errors.PermissionDenied, match="plugins_allow"):
        await client.attach_plugin("guest", "not-listed")
    with pytest.raises(errors.InvalidArgument, match="ranges"):
        await client.attach_plugin("guest", "integrity-monitor", {"ranges": "nonsense"})
    with pytest.raises(errors.FailedPrecondition):  # a gfn outside every memslot
        await client.attach_plugin("guest", "integrity-monitor", {"ranges": "0x99999"})
    assert await client.list_plugins("guest") == []
    assert (await client.query_tracking("guest", [0x99999]))[0].counter == 0


async def test_integrity_monitor_findings_resume_across_restart(
    tmp_path: Path, site: Path, daemon: tuple[DaemonProcess, Path], client: AsyncClient
) -> None:
    """Attached by name, the monitor tracks its ranges under its own owner and publishes
    a finding per write into them, each with its own seq after the write's; after a
    restart the plugin is attached again and a stream resumes over the old findings."""
    d, state = daemon
    await setup_vm(client)
    st = await client.attach_plugin(
        "guest", "integrity-monitor", {"ranges": f"ktext={KTEXT:#x}+4,idt={IDT:#x}"}
    )
    assert (st.name, st.kind, st.tracked_gfns) == ("integrity-monitor", None, 5)
    async with client.watch("guest", plugins=["integrity-monitor"]) as stream:
        await registered(stream)
        w1 = await client.write("guest", (KTEXT + 1) * PAGE + 8, b"\x90\x90", vcpu=1)
        await client.write("guest", 0x50 * PAGE, b"untracked")  # outside: no finding
        w2 = await client.write("guest", IDT * PAGE, b"\xcc" * 16)
        found, seqs = await findings_until(stream, 2)
    assert [(f.plugin, f.kind, f.first_gfn, f.details["range"]) for f in found] == [
        ("integrity-monitor", "integrity.write", KTEXT + 1, "ktext"),
        ("integrity-monitor", "integrity.write", IDT, "idt"),
    ]
    assert [f.seq - 1 for f in found] == [w1.pieces[0].seq, w2.pieces[0].seq]
    assert found[0].details["vcpu"] == "1" and found[1].details["bytes"] == "cc" * 16
    plugin = (await client.list_plugins("guest"))[0]
    assert (plugin.findings, plugin.counters["writes"]) == (2, 2)
    head = found[1].seq

    await client.close()
    assert d.stop() == 0
    d2 = start(tmp_path, site, state)
    try:
        async with AsyncClient(d2.tcp) as c2:
            plugin = (await c2.list_plugins("guest"))[0]
            assert (plugin.name, plugin.tracked_gfns) == ("integrity-monitor", 5)
            async with c2.watch("guest", start_seq=1, only_findings=True) as stream:
                await registered(stream)
                w3 = await c2.write("guest", (KTEXT + 3) * PAGE, b"\x0f\x0b")
                again, event_seqs = await findings_until(stream, 3)
            assert not event_seqs  # only_findings
            assert [f.seq for f in again[:2]] == [f.seq for f in found]
            assert again[2].seq - 1 == w3.pieces[0].seq and again[2].seq > head
            assert again[2].first_gfn == KTEXT + 3
    finally:
        d2.stop()


async def test_raising_plugin_is_detached_and_daemon_serves_on(client: AsyncClient) -> None:
    """A plugin whose hook raises is counted; the writes still land; at the third
    failure it is detached (a plugin.detached finding says so), its tracking released,
    and the daemon and the other plugins carry on."""
    await setup_vm(client)
    await client.attach_plugin("guest", "integrity-monitor", {"ranges": f"{KTEXT:#x}"})
    await client.attach_plugin("guest", "faulty", {"gfn": FAULTY_GFN})
    assert (await client.query_tracking("guest", [FAULTY_GFN]))[0].counter == 1
    async with client.watch("guest", only_findings=True) as stream:
        await registered(stream)
        for i in range(2):
            await client.write("guest", FAULTY_GFN * PAGE, bytes([i]))
        faulty = next(p for p in await client.list_plugins("guest") if p.name == "faulty")
        assert faulty.failures == 2
        await client.write("guest", FAULTY_GFN * PAGE, b"\x02")
        assert await client.read("guest", FAULTY_GFN * PAGE, 1) == b"\x02"
        await client.write("guest", KTEXT * PAGE, b"still watched")
        found, _ = await findings_until(stream, 2)
    assert [(f.plugin, f.kind) for f in found] == [
        ("faulty", "plugin.detached"), ("integrity-monitor", "integrity.write"),
    ]
    assert found[0].details["failures"] == "3"
    assert "faulty plugin saw seq" in found[0].details["last_error"]
    assert [p.name for p in await client.list_plugins("guest")] == ["integrity-monitor"]
    assert (await client.query_tracking("guest", [FAULTY_GFN]))[0].counter == 0
    with pytest.raises(errors.NotFound):
        await client.detach_plugin("guest", "faulty")
    assert (await client.write("guest", 0x10 * PAGE, b"serving")).pieces


def test_cli_attaches_by_name_and_watch_prints_findings(
    daemon: tuple[DaemonProcess, Path],
) -> None:
    """`pagetrack plugin attach VM integrity-monitor -o ranges=...` attaches it and
    `pagetrack watch --findings-only --format jsonl` prints its findings."""
    d, _ = daemon
    env = {**os.environ, "PAGETRACK_TARGET": d.tcp}
    cli = str(BIN / "pagetrack")

    def run(*args: str) -> str:
        return subprocess.run(
            [cli, *args], env=env, check=True, capture_output=True, text=True, timeout=HANG_S
        ).stdout

    run("vm", "create", "cli-vm")
    run("slot", "set", "cli-vm", "0", "0", "1024", "--pages")
    assert "attached integrity-monitor" in run(
        "plugin", "attach", "cli-vm", "integrity-monitor", "-o", f"ranges=idt={IDT:#x}"
    )
    assert "integrity-monitor: tracked gfns 1" in run("plugin", "status", "cli-vm")
    run("write", "cli-vm", hex(IDT * PAGE), "0xcc")
    out = run("watch", "cli-vm", "--from-seq", "1", "--findings-only", "--format", "jsonl",
              "--count", "1")
    rec = json.loads(out.splitlines()[-1])
    assert (rec["type"], rec["plugin"], rec["kind"], rec["first_gfn"]) == (
        "finding", "integrity-monitor", "integrity.write", IDT
    )
    text = run("watch", "cli-vm", "--from-seq", "1", "--findings-only", "--count", "1")
    assert "** finding #2 integrity-monitor integrity.write" in text
