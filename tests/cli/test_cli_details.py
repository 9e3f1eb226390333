"""CLI details a user trips on: help that matches what the daemon accepts, choices that can
be chosen, a --target port that exists, and several daemons' VMs told apart."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import pagetrack
from pagetrack.cli import StartableKind, main
from pagetrack.types import WorkloadKind
from tests.daemon_process import DaemonProcess, start_daemon


@pytest.fixture(scope="module")
def two() -> Iterator[list[DaemonProcess]]:
    """Two daemons; the first on a TCP port and a unix socket."""
    tmp = Path(tempfile.mkdtemp(prefix="ptcd-"))
    ds = [start_daemon(tmp, listen=("127.0.0.1:0", f"unix:{tmp}/a.sock")),
          start_daemon(tmp, log_name="b.log")]
    yield ds
    try:
        assert [d.stop() for d in ds] == [0, 0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


def test_vm_name_help_says_what_the_daemon_accepts(
    two: list[DaemonProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "vm", "create", "--help")
    assert code == 0 and "lowercase letters, digits" in " ".join(out.split())
    code, _, err = _cli(capsys, "--target", two[1].tcp, "vm", "create", "MyVM")
    assert code == 1 and "lowercase" in err
    assert _cli(capsys, "--target", two[1].tcp, "vm", "create", "my-vm.2")[0] == 0


def test_workload_start_offers_only_real_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert {k.value for k in StartableKind} == {
        k.value for k in WorkloadKind if k is not WorkloadKind.UNSPECIFIED}
    code, out, _ = _cli(capsys, "workload", "start", "--help")
    assert code == 0 and "unspecified" not in out and "random-writes" in out
    code, _, err = _cli(capsys, "workload", "start", "vm1", "unspecified")
    assert code == 2 and "unspecified" in err


@pytest.mark.parametrize("target", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:port",
                                    "127.0.0.1:1,localhost:70000"])
def test_a_target_port_that_cannot_exist_is_refused(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """grpc would take 99999 modulo 65536 and call another port; the CLI and the client
    refuse it, naming it."""
    code, out, err = _cli(capsys, "--target", target, "vm", "list")
    bad = target.split(",")[-1]
    assert code == 2 and out == "" and f"target '{bad}'" in err and "1 to 65535" in err
    if "," not in target:
        with pytest.raises(pagetrack.InvalidArgument, match="1 to 65535"):
            pagetrack.Client(target)


def test_vm_list_over_several_daemons_has_a_daemon_column_and_no_twins(
    two: list[DaemonProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each row says its daemon; a VM of the same name on two daemons is two rows, and a
    daemon listed twice (by TCP and by unix socket) does not double its VMs."""
    a, b = two
    a_unix = next(x for x in a.addresses if x.startswith("unix:"))
    with pagetrack.Client(a.tcp) as ca, pagetrack.Client(b.tcp) as cb:
        ca.create_vm("same")
        cb.create_vm("same")
        ca.create_vm("only-a")
    targets = f"{a.tcp},{a_unix},{b.tcp}"
    code, out, err = _cli(capsys, "--target", targets, "--json", "vm", "list")
    assert code == 0, err
    rows = sorted((r["name"], r["daemon"]) for r in json.loads(out))
    assert [r for r in rows if r[0] in ("same", "only-a")] == sorted(
        [("only-a", a.tcp), ("same", a.tcp), ("same", b.tcp)])
    code, out, _ = _cli(capsys, "--target", targets, "vm", "list")
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["daemon", "name"]
    assert sum(ln.split()[:2] == [a.tcp, "same"] for ln in lines) == 1
    assert sum(ln.split()[:2] == [b.tcp, "same"] for ln in lines) == 1
    code, out, _ = _cli(capsys, "--target", a.tcp, "vm", "list")  # one daemon: no column
    assert out.splitlines()[0].split()[0] == "name"
