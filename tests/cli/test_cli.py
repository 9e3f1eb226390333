"""The ``pagetrack`` command end to end: real subprocesses against a real daemon, plus the
argument parsers and the help text in-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from pagetrack import Client
from pagetrack import _cliparse as cp
from pagetrack.cli import app, main
from pagetrack.types import GfnRange
from tests.daemon_process import DaemonProcess, start_daemon, with_parent
from tests.waiting import HANG_S

PAGETRACK = Path(sys.executable).with_name("pagetrack")


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """A daemon on a unix socket and a TCP port for this module."""
    tmp = Path(tempfile.mkdtemp(prefix="ptcli-"))
    d = start_daemon(tmp, listen=("127.0.0.1:0", f"unix:{tmp}/pt.sock"))
    yield d
    try:
        assert d.stop() == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _env(target: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGETRACK_")}
    env["PAGETRACK_TARGET"] = target
    return env


def run(target: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``pagetrack ARGS`` with PAGETRACK_TARGET set."""
    return subprocess.run(
        [str(PAGETRACK), *args], env=_env(target), capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def ok(target: str, *args: str) -> str:
    """Run and require success; the stdout."""
    res = run(target, *args)
    assert res.returncode == 0, res.stderr
    return res.stdout


def cli(capsys: pytest.CaptureFixture[str], target: str, *args: str) -> tuple[int, str, str]:
    """``pagetrack --target TARGET ARGS`` in this process: (status, stdout, stderr)."""
    code = main(["--target", target, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_end_to_end_session(daemon: DaemonProcess) -> None:
    """As separate processes over the unix socket: vm create, slot set 16M, track add a
    range, watch --format jsonl --count 3 while writes happen, read back as a hexdump."""
    target = next(a for a in daemon.addresses if a.startswith("unix:"))
    assert "created VM e2e" in ok(target, "vm", "create", "e2e", "--dma-policy", "notify",
                                  "--vcpus", "2")
    assert "4096 pages" in ok(target, "slot", "set", "e2e", "0", "0", "16M", "--log-dirty")
    assert "16 gfns newly tracked" in ok(target, "track", "add", "e2e", "0x10-0x1f")
    watcher = subprocess.Popen(
        with_parent([str(PAGETRACK), "watch", "e2e", "--format", "jsonl", "--count", "3"]),
        env=_env(target), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())  # registered before any write
        assert first["type"] == "registered" and first["vm"] == "e2e"
        assert "emulated seq 1" in ok(target, "write", "e2e", "0x10000", "hello", "--vcpu", "1")
        with Client(target) as c:  # the other two writes without starting more processes
            c.write("e2e", 0x20000, b"\xde\xad")
            c.dma_write("e2e", 0x11000, b"\x01\x02")
            c.write("e2e", 0x12008, b"third")
        rest, err = watcher.communicate(timeout=HANG_S)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, err
    events = [json.loads(line) for line in rest.splitlines()]
    events = [e for e in events if e["type"] == "event"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[0] == {
        "type": "event", "seq": 1, "vm": "e2e", "vcpu": 1, "gpa": 0x10000, "gpa_hex": "0x10000",
        "gfn": 16, "length": 5, "data": b"hello".hex(), "source": "guest",
        "ts_ns": events[0]["ts_ns"],
    }
    assert events[1]["source"] == "dma" and events[1]["vcpu"] is None
    assert events[2]["data"] == b"third".hex()
    dump = ok(target, "read", "e2e", "0x10000", "16")
    assert dump.startswith("000000010000: 6865 6c6c 6f") and "hello" in dump


def test_watch_events_only_and_integer_stores(daemon: DaemonProcess) -> None:
    """--events-only prints nothing but event lines (numbers as numbers); write's DATA is
    bytes in order, and --u16/--u32/--u64 store integers little-endian as x86 does."""
    t = daemon.tcp
    ok(t, "vm", "create", "eo")
    ok(t, "slot", "set", "eo", "0", "0", "1M")
    ok(t, "track", "add", "eo", "0x10")
    for args in (["0x10000", "0x1122334455667788"], ["0x10008", "--u64", "0x1122334455667788"],
                 ["0x10010", "--u32", "0x11223344"], ["0x10014", "--u16", "4660"],
                 ["0x10016", "--u8", "0xff"]):
        ok(t, "write", "eo", *args)
    out = ok(t, "watch", "eo", "--from-seq", "1", "--format", "jsonl", "--events-only",
             "--count", "5")
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["type"] for x in lines] == ["event"] * 5
    assert [x["gpa"] for x in lines] == [0x10000, 0x10008, 0x10010, 0x10014, 0x10016]
    assert all(isinstance(x[k], int) for x in lines for k in ("seq", "gpa", "gfn", "length"))
    assert [x["data"] for x in lines] == [
        "1122334455667788", "8877665544332211", "44332211", "3412", "ff"]
    assert ok(t, "read", "eo", "0x10000", "16").startswith(
        "000000010000: 1122 3344 5566 7788 8877 6655 4433 2211")
    for args, text in ((["--u16", "0x10000"], "does not fit in 2 bytes"),
                       (["--u32", "lots"], "not an integer"),
                       (["--u8", "--u16", "1"], "at most one of"),
                       (["--u32", "--hex", "1"], "do not go with")):
        res = run(t, "write", "eo", "0x10000", *args)
        assert res.returncode == 2 and text in res.stderr, res.stderr


def test_errors_are_one_line_with_exit_codes(daemon: DaemonProcess) -> None:
    """As processes: a daemon error exits 1, a usage error 2, an unreachable daemon 1, each
    with one 'pagetrack: ' line on stderr and no traceback."""
    cases = [
        (daemon.tcp, ("vm", "show", "nope"), 1, "pagetrack: VM 'nope' not found\n"),
        (daemon.tcp, ("slot", "set", "nope", "0", "0", "16X"), 2, "unknown unit"),
        ("unix:/tmp/pagetrack-nobody-listens.sock", ("vm", "list"), 1,
         "pagetrack: cannot reach pagetrackd at unix:/tmp/pagetrack-nobody-listens.sock"),
    ]
    for target, args, code, text in cases:
        res = run(target, *args)
        assert res.returncode == code, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("pagetrack: "), res.stderr
        assert text in res.stderr
        assert res.stdout == ""


def test_ctrl_c_ends_watch_quietly(daemon: DaemonProcess) -> None:
    """Ctrl-C (SIGINT) ends `pagetrack watch` with status 130 and no traceback."""
    ok(daemon.tcp, "vm", "create", "sig")
    watcher = subprocess.Popen(
        with_parent([str(PAGETRACK), "watch", "sig", "--format", "jsonl"]), env=_env(daemon.tcp),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert watcher.stdout is not None
        assert json.loads(watcher.stdout.readline())["type"] == "registered"
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=HANG_S)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 130
    assert "Traceback" not in err


def test_more_errors_in_process(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad gfn ranges, bad hex, unknown commands and options exit 2; a name the daemon
    refuses exits 1; always one line."""
    cases = [
        (("track", "add", "nope", "0x20-0x10"), 2, "ends before it starts"),
        (("write", "nope", "0", "0xabc"), 2, "valid hex"),
        (("frobnicate",), 2, "No such command"),
        (("vm", "list", "--bogus"), 2, "No such option"),
        (("vm", "create", "bad name!"), 1, "pagetrack: "),
        (("watch", "nope"), 1, "not found"),
    ]
    for args, code, text in cases:
        status, out, err = cli(capsys, daemon.tcp, *args)
        assert status == code, (args, err)
        assert err.count("\n") == 1 and err.startswith("pagetrack: "), err
        assert text in err


def test_memory_tracking_and_listing_commands(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """dma, cmpxchg, dirty-log, track show/remove, slot list, vm show/list, stats and vm
    delete."""
    t = daemon.tcp
    assert cli(capsys, t, "vm", "create", "mem", "--dma-policy", "notify")[0] == 0
    assert cli(capsys, t, "slot", "set", "mem", "0", "0", "256", "--pages", "--log-dirty")[0] == 0
    assert cli(capsys, t, "slot", "set", "mem", "1", "4G", "64K", "--readonly")[0] == 0
    assert cli(capsys, t, "track", "add", "mem", "0x10+2", "0x40")[0] == 0
    assert cli(capsys, t, "write", "mem", "0x10000", "0x0102")[0] == 0
    code, out, _ = cli(capsys, t, "dma", "mem", "0x11000", "dma")
    assert code == 0 and "notified seq 2" in out
    code, out, _ = cli(capsys, t, "cmpxchg", "mem", "0x10000", "0x0000", "0x0304")
    assert code == 0 and "not exchanged: memory holds 0x0102" in out and "seq" not in out
    code, out, _ = cli(capsys, t, "cmpxchg", "mem", "0x10000", "0x0102", "0x0304")
    assert code == 0 and "emulated seq 3" in out and "exchanged (memory held 0x0102)" in out
    code, _, err = cli(capsys, t, "cmpxchg", "mem", "0x10000", "0x01", "0x0304")
    assert code == 1 and "same number of bytes" in err
    code, out, _ = cli(capsys, t, "--json", "dirty-log", "mem", "0")
    assert code == 0 and 0x10 in json.loads(out)["dirty_gfns"]
    assert "0 of 256 pages dirty" in cli(capsys, t, "dirty-log", "mem", "0")[1]  # cleared
    code, out, _ = cli(capsys, t, "--json", "track", "show", "mem", "0x10-0x11", "0x41")
    assert [(s["gfn"], s["counter"]) for s in json.loads(out)] == [(16, 1), (17, 1), (65, 0)]
    assert "3 of 3 gfns tracked" in cli(capsys, t, "track", "show", "mem", "--owners")[1]
    assert "1 gfns no longer tracked" in cli(capsys, t, "track", "remove", "mem", "0x40")[1]
    code, out, _ = cli(capsys, t, "slot", "list", "mem")
    assert "0x100000000-0x10000ffff" in out and "ro" in out
    assert "dma policy notify" in cli(capsys, t, "vm", "show", "mem")[1]
    assert "mem" in cli(capsys, t, "vm", "list")[1]
    assert "mem" in cli(capsys, t, "stats")[1]
    assert "deleted" in cli(capsys, t, "slot", "set", "mem", "1", "--delete")[1]
    assert "deleted VM mem" in cli(capsys, t, "vm", "delete", "mem")[1]


def test_watch_text_filter_and_replay(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """watch --from-seq replays history, --filter keeps only those gfns, text lines show
    seq, vCPU, address and data."""
    t = daemon.tcp
    cli(capsys, t, "vm", "create", "txt")
    cli(capsys, t, "slot", "set", "txt", "0", "0", "256", "--pages")
    cli(capsys, t, "track", "add", "txt", "0,1,2")
    for gpa in ("0x0", "0x1000", "0x2000", "0x1008"):
        assert cli(capsys, t, "write", "txt", gpa, "0xaa")[0] == 0
    code, out, err = cli(capsys, t, "watch", "txt", "--from-seq", "1", "--filter", "1",
                         "-n", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("#2 ") and "gpa 0x000000001000" in lines[0] and "aa" in lines[0]
    assert lines[1].startswith("#4 ")
    assert "watching txt from seq 1" in err
    cli(capsys, t, "vm", "delete", "txt")


def _walk(cmd: object, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _walk(sub, (*path, name))


def test_every_command_and_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Every command, option and argument has help text, and --help exits 0."""
    root = typer.main.get_command(app)
    names = set()
    for path, cmd in _walk(root):
        names.add(" ".join(path))
        assert getattr(cmd, "help", None), f"no help for {path}"
        for param in getattr(cmd, "params", []):
            if param.name in ("help",):
                continue
            assert getattr(param, "help", None), f"no help for {path} {param.name}"
        assert main([*path, "--help"]) == 0
        assert "Usage:" in capsys.readouterr().out
    for expected in ("vm create", "vm list", "vm show", "vm delete", "slot set", "slot list",
                     "track add", "track remove", "track show", "write", "read", "dma", "cmpxchg",
                     "dirty-log", "watch", "stats", "workload start", "workload stop",
                     "workload list", "workload show", "plugin attach", "plugin detach",
                     "plugin status", "plugin audit", "lease create", "lease keep-alive",
                     "lease revoke", "lease list", "top"):
        assert expected in names


def test_parsers() -> None:
    """Sizes, gfn lists, data, durations and options parse as documented."""
    assert cp.parse_size("4G") == 4 << 30
    assert cp.parse_size("256M") == 256 << 20
    assert cp.parse_size("0x1000") == 4096 and cp.parse_size("1.5K") == 1536
    assert cp.size_to_pages("16M", "SIZE") == 4096
    with pytest.raises(ValueError, match="multiple"):
        cp.size_to_pages("100", "SIZE")
    with pytest.raises(ValueError):
        cp.parse_size("12Q")
    ranges, gfns = cp.parse_gfn_specs(["0x1000-0x1fff", "5,7", "0x10+4"])
    assert ranges == [GfnRange(0x1000, 0x1000), GfnRange(0x10, 4)] and gfns == [5, 7]
    with pytest.raises(ValueError):
        cp.parse_gfn_specs(["9-1"])
    assert cp.parse_data("0xdead beef") == b"\xde\xad\xbe\xef"
    assert cp.parse_data("hello") == b"hello"
    assert cp.parse_data("cafe", force_hex=True) == b"\xca\xfe"
    assert cp.parse_data("0x12", force_text=True) == b"0x12"
    assert cp.parse_duration_ms("500ms") == 500 and cp.parse_duration_ms("2m") == 120_000
    assert cp.parse_duration_ms("1.5") == 1500
    assert cp.parse_options(["pages=64", "x = y"]) == {"pages": "64", "x": "y"}
    assert cp.format_runs(cp.compress_ranges([1, 2, 3, 7])) == "0x1-0x3, 0x7"


def test_workload_and_lease_commands(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """workload start/show/list/stop and lease create/list/keep-alive/revoke."""
    t = daemon.tcp
    cli(capsys, t, "vm", "create", "wl")
    code, out, err = cli(capsys, t, "--json", "workload", "start", "wl", "random-writes",
                         "--rate", "1000", "--duration", "1h", "--seed", "7", "-o", "pages=64")
    assert code == 0, err
    started = json.loads(out)
    wid = started["id"]
    assert started["kind"] == "random-writes" and started["state"] == "running"
    assert wid in cli(capsys, t, "workload", "list", "wl")[1]
    assert "random-writes on wl" in cli(capsys, t, "workload", "show", wid)[1]
    assert "stopped" in cli(capsys, t, "workload", "stop", wid)[1]
    lease = cli(capsys, t, "lease", "create", "--ttl", "30s", "--label", "cli")[1].strip()
    assert lease in cli(capsys, t, "lease", "list")[1]
    assert "expires" in cli(capsys, t, "lease", "keep-alive", lease)[1]
    assert f"revoked {lease}" in cli(capsys, t, "lease", "revoke", lease)[1]
    cli(capsys, t, "vm", "delete", "wl")


def test_record_and_replay_commands(daemon: DaemonProcess, tmp_path: Path) -> None:
    """vm create --record, recording and replay --as rebuild a VM through the CLI; a
    missing file is one line and exit 1."""
    t = daemon.addresses[0]
    ok(t, "vm", "create", "taped", "--record")
    ok(t, "slot", "set", "taped", "0", "0", "16M")
    ok(t, "track", "add", "taped", "0x10-0x1f")
    ok(t, "write", "taped", "0x10008", "hello")
    ok(t, "recording", "taped", str(tmp_path / "taped.jsonl"))
    tape = str(tmp_path / "taped.jsonl")
    assert "replayed 3 operations" in ok(t, "replay", tape, "--as", "tape2")
    assert "hello" in ok(t, "read", "tape2", "0x10008", "5")
    bad = run(t, "replay", str(tmp_path / "missing.jsonl"), "--as", "tape3")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "missing.jsonl" in bad.stderr


def test_r4_3_watch_jsonl_marks_the_untracked_piece_and_track_show_names_owners(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """R4.3: a write crossing from tracked gfn 1 into untracked gfn 2 gives two events;
    jsonl marks the second "untracked": true (arch/x86/kvm/x86.c emulator_write_phys
    notifies every piece). track show --owners names the tenant."""
    t = daemon.tcp
    cli(capsys, t, "vm", "create", "cross")
    cli(capsys, t, "slot", "set", "cross", "0", "0", "16", "--pages")
    cli(capsys, t, "track", "add", "cross", "1")
    assert cli(capsys, t, "write", "cross", "0x1ffc", "0x0102030405060708")[0] == 0
    code, out, err = cli(capsys, t, "watch", "cross", "--from-seq", "1", "-n", "2",
                         "--format", "jsonl")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines() if '"event"' in line]
    assert [(e["seq"], e["gpa"], e.get("untracked", False)) for e in events] == [
        (1, 0x1FFC, False), (2, 0x2000, True)
    ]
    code, out, _ = cli(capsys, t, "track", "show", "cross", "--owners")
    assert code == 0 and "tenant:-x1" not in out and "tenant:" in out
    cli(capsys, t, "vm", "delete", "cross")
