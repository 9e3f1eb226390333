"""One VM's save failure is that VM's alone: on a full disk the daemon keeps saving what
fits, removes partial files, reports the VM it could not save, and exits non-zero when
its final save did not complete. Runs on a small tmpfs (needs mount, i.e. root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemon, Daemons, wait_for

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted at the end."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _vm(d: Daemon, tenant: str, name: str, pages: int) -> None:
    d.stub("VmService", tenant).CreateVm(pb.CreateVmRequest(name=name))
    d.stub("MemoryService", tenant).SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=0, npages=pages))


def _write(d: Daemon, tenant: str, name: str, gpa: int, data: bytes) -> None:
    d.stub("MemoryService", tenant).WriteGuest(pb.WriteGuestRequest(vm=name, gpa=gpa, data=data))


def _read(d: Daemon, tenant: str, name: str, gpa: int, n: int) -> bytes:
    r = d.stub("MemoryService", tenant).ReadGuest(pb.ReadGuestRequest(vm=name, gpa=gpa, length=n))
    data: bytes = r.data
    return data


def _problems(d: Daemon, tenant: str) -> list[str]:
    info = d.stub("AdminService", tenant).GetServerInfo(pb.GetServerInfoRequest())
    return list(info.problems)


def test_full_disk_stops_only_the_vm_that_does_not_fit(
    small_disk: Path, daemons: Daemons
) -> None:
    state = small_disk / "state"
    args = ("--save-interval", "0.2")
    d = daemons.start(*args, state_dir=state, tenants=("a", "b"))
    _vm(d, "b", "small", 16)
    _write(d, "b", "small", 0, b"first")
    # Tenant a (saved first: VMs are saved in tenant order) fills 6 MiB of guest memory:
    # its file can never fit on the 4 MiB disk.
    _vm(d, "a", "big", 2048)
    n = 1536
    d.stub("MemoryService", "a").WriteGuestBatch(pb.WriteGuestBatchRequest(
        vm="big", gpa=[i * PAGE for i in range(n)], vcpu=[0] * n, length=[PAGE] * n,
        data=os.urandom(n * PAGE)))
    # Tenant b keeps working: a change and a new VM, both acknowledged.
    _write(d, "b", "small", 0, b"second")
    _vm(d, "b", "small2", 8)
    _write(d, "b", "small2", 0, b"new vm")

    vms = state / "vms"
    wait_for(lambda: (vms / "b" / "small2.ptvm").exists(), what="b's new VM saved")
    wait_for(lambda: any("'big' not saved" in p for p in _problems(d, "a")),
             what="the failure reported to tenant a")
    assert not any("big" in p for p in _problems(d, "b")), "b sees a's problem"
    assert "No space left" in d.log_text() and "state.vm_save_failed" in d.log_text()
    wait_for(lambda: not list(vms.glob("*/.*.tmp")), what="partial files removed")

    code = d.stop()
    assert code != 0, "the final save did not complete, yet the daemon exited 0"
    assert not list(vms.glob("*/.*.tmp"))

    d = daemons.start(*args, state_dir=state, tenants=("a", "b"))
    assert _read(d, "b", "small", 0, 6) == b"second"
    assert _read(d, "b", "small2", 0, 6) == b"new vm"
    # The big VM was never saved (as reported); the rest fits, so this stop is clean.
    assert d.stop() == 0
