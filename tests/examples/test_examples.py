"""Every program in examples/ runs as a user would run it, against a real daemon, with a
bounded event count and deadline, and prints what its docstring promises."""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

import pagetrack
from tests.daemon_process import DaemonProcess, start_daemon
from tests.integration.support import new_name
from tests.node_tools import ROOT, npm_ci

EXAMPLES = ROOT / "examples"
BASE_GFN = 0x100
DEADLINE_S = 120  # bounds a hang only; each run takes a second or two


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("examples"))
    yield d
    assert d.stop() == 0


async def _tracked_vm(pt: pagetrack.AsyncClient, **options: object) -> str:
    """A VM with 16 pages at BASE_GFN, all write-tracked."""
    name = new_name("ex")
    await pt.create_vm(name, **options)  # type: ignore[arg-type]
    await pt.set_memory_region(name, 0, BASE_GFN, 16)
    await pt.add_tracking(name, ranges=[pagetrack.GfnRange(BASE_GFN, 16)])
    return name


def _gfn_of(i: int) -> int:
    """Write i's page: half the writes to page 0, a quarter to page 1, an eighth to page
    2, the rest spread over five more (no ties among the top three)."""
    k = i % 8
    if k < 4:
        return BASE_GFN
    if k < 6:
        return BASE_GFN + 1
    if k == 6:
        return BASE_GFN + 2
    return BASE_GFN + 3 + (i // 8) % 5


def _run(*args: str, timeout: float = DEADLINE_S) -> str:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _top_lines(out: str) -> list[tuple[int, int]]:
    return [(int(g, 16), int(n)) for g, n in re.findall(r"gfn (0x[0-9a-f]+)\s+(\d+)", out)]


async def test_top_pages_counts_pages_and_reports_lost_events(daemon: DaemonProcess) -> None:
    """top_pages.py replaying a history that lost its oldest events says how many were
    lost and why, and ranks the pages of the events it got, exactly."""
    async with pagetrack.AsyncClient(daemon.tcp) as pt:
        vm = await _tracked_vm(pt, history_events=100)
        gpas = [(_gfn_of(i) << 12) + 8 * (i % 512) for i in range(500)]
        await pt.write_batch(vm, gpas, [b"12345678"] * 500)
        oldest = (await pt.get_vm(vm)).oldest_seq
    assert 1 < oldest <= 401
    out = await asyncio.to_thread(
        _run, sys.executable, str(EXAMPLES / "top_pages.py"), vm, "--target", daemon.tcp,
        "--start-seq", "1", "--events", "500", "--top", "3",
    )
    lost = oldest - 1
    assert f"gap: lost {lost} events, seqs 1..{lost} (compacted)" in out, out
    assert f"events: {500 - lost}" in out and f"lost: {lost} events in 1 gaps" in out, out
    expected = collections.Counter(_gfn_of(i) for i in range(lost, 500)).most_common(3)
    assert _top_lines(out) == expected, out


async def test_top_pages_follows_live_writes(daemon: DaemonProcess) -> None:
    """Watching from now, top_pages.py sees the writes made after it registered and stops
    after --events of them."""
    async with pagetrack.AsyncClient(daemon.tcp) as pt:
        vm = await _tracked_vm(pt)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLES / "top_pages.py"), vm, "--target", daemon.tcp,
            "--events", "200", "--top", "2", "--seconds", str(DEADLINE_S),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            first = (await asyncio.wait_for(proc.stdout.readline(), DEADLINE_S)).decode()
            assert first.startswith(f"watching {vm} from seq 1"), first
            gpas = [(_gfn_of(i) << 12) + 8 * (i % 512) for i in range(200)]
            await pt.write_batch(vm, gpas, [b"abcdefgh"] * 200)
            rest, err = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
            out = rest.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err
        assert "events: 200" in out and "lost: 0 events" in out, out
        assert _top_lines(out) == [(BASE_GFN, 100), (BASE_GFN + 1, 50)], out
        await pt.delete_vm(vm)


async def test_to_arrow_table_holds_every_event(daemon: DaemonProcess, tmp_path: Path) -> None:
    """to_arrow.py writes an Arrow file whose rows are the VM's events: seqs, addresses,
    vCPUs (null for DMA), lengths and the written bytes."""
    async with pagetrack.AsyncClient(daemon.tcp) as pt:
        vm = await _tracked_vm(pt, dma_policy="notify")
        gpas = [(BASE_GFN << 12) + 16 * i for i in range(300)]
        datas = [i.to_bytes(8, "little") for i in range(300)]
        await pt.write_batch(vm, gpas, datas, vcpu=[i % 2 for i in range(300)])
        await pt.dma_write(vm, (BASE_GFN + 3) << 12, b"dma!")
    out_file = tmp_path / "events.arrow"
    out = await asyncio.to_thread(
        _run, sys.executable, str(EXAMPLES / "to_arrow.py"), vm, "--target", daemon.tcp,
        "--start-seq", "1", "--events", "301", "--out", str(out_file),
    )
    assert "rows: 301" in out and "lost: 0 events in 0 gaps" in out, out
    table = pa.ipc.open_file(str(out_file)).read_all()
    assert table.column("seq").to_pylist() == list(range(1, 302))
    assert table.column("gpa").to_pylist() == [*gpas, (BASE_GFN + 3) << 12]
    assert table.column("data").to_pylist() == [*datas, b"dma!"]
    assert table.column("vcpu").to_pylist() == [*(i % 2 for i in range(300)), None]
    assert table.column("dma").to_pylist() == [False] * 300 + [True]
    assert table.column("gfn").to_pylist() == [g >> 12 for g in gpas] + [BASE_GFN + 3]
    async with pagetrack.AsyncClient(daemon.tcp) as pt:
        await pt.delete_vm(vm)


def test_node_client_from_the_proto(daemon: DaemonProcess) -> None:
    """examples/node (grpc-js + proto-loader, installed from its lockfile) creates a VM,
    tracks, watches, writes and sees each write as an event with its bytes, reads memory
    back, and deletes the VM."""
    npm_ci(EXAMPLES / "node")
    node = shutil.which("node")
    assert node is not None
    vm = new_name("node")
    out = _run(node, str(EXAMPLES / "node" / "watch_writes.js"), "--target", daemon.tcp,
               "--vm", vm, "--writes", "6", "--timeout", str(DEADLINE_S))
    events = re.findall(r"event seq=(\d+) gpa=0x([0-9a-f]+) length=8 vcpu=0 data=([0-9a-f]+)",
                        out)
    assert events == [
        (str(i + 1), f"{((BASE_GFN + i % 2) << 12) + 8 * i:x}",
         (0x1000 + i).to_bytes(8, "little").hex())
        for i in range(6)
    ], out
    assert f"read back gpa 0x{BASE_GFN << 12:x}: {(0x1000).to_bytes(8, 'little').hex()}" in out
    assert "done: 6 events for 6 writes" in out and f"deleted VM {vm}" in out, out
    with pagetrack.Client(daemon.tcp) as pt, pytest.raises(pagetrack.NotFound):
        pt.get_vm(vm)


def test_examples_readme_names_every_example() -> None:
    """examples/README.md says how to run each program in examples/."""
    readme = (EXAMPLES / "README.md").read_text()
    for path in [*EXAMPLES.glob("*.py"), EXAMPLES / "node" / "watch_writes.js"]:
        assert path.name in readme, path.name
