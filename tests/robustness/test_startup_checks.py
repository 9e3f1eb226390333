"""Settings and state files are checked at start: a bad value is one line on stderr and
exit status 4 (a wrong setting), never a spinning core, another port, or a start that hangs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.conftest import Daemons

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(("args", "word"), [
    (("--save-interval", "0"), "save_interval_s"),
    (("--save-interval", "-5"), "save_interval_s"),
    (("--save-interval", "nan"), "save_interval_s"),
    (("--metrics-port", "99999"), "metrics_port"),
    (("--metrics-port", "-1"), "metrics_port"),
    (("--grace", "-1"), "grace_s"),
    (("--history-events", "-1"), "history_events"),
])
def test_bad_setting_is_one_line_and_exit_4(tmp_path: Path, args: tuple[str, ...],
                                            word: str) -> None:
    res = subprocess.run(
        [str(BIN / "pagetrackd"), "--listen", "127.0.0.1:0", "--state-dir",
         str(tmp_path / "state"), *args],
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 4, res.stderr  # a setting has a wrong value
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], res.stderr


def test_fifo_named_like_a_state_file_does_not_hang_start(
    daemons: Daemons, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    d = daemons.start(state_dir=state)
    d.stub("VmService").CreateVm(pb.CreateVmRequest(name="good"))
    assert d.stop() == 0
    os.mkfifo(state / "vms" / "default" / "evil.ptvm")
    d = daemons.start(state_dir=state)  # bounded by the start deadline
    names = [v.name for v in d.stub("VmService").ListVms(pb.ListVmsRequest()).vms]
    assert names == ["good"]
    assert "not a regular file" in d.log_text()


def test_damaged_seq_reservations_stop_the_start(daemons: Daemons, tmp_path: Path) -> None:
    """Starting without them could hand out seqs twice: refuse, and say which file."""
    state = tmp_path / "state"
    d = daemons.start(state_dir=state)
    d.stub("VmService").CreateVm(pb.CreateVmRequest(name="vm1"))
    assert d.stop() == 0
    (state / "seqs.json").write_text('{"marks": [], "sha256": "00"}')
    d = daemons.start(state_dir=state, expect_exit=True)
    assert d.proc.wait(30) != 0
    assert "seqs.json" in d.log_text()
