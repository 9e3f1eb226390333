"""The exporter's configuration, subjects and positions, without servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pagetrack import errors
from pagetrack.export import ExportConfig, load_config
from pagetrack.export.pump import batch_limits
from pagetrack.export.subjects import Position, position, subject, token


def test_names_with_dots_stay_one_subject_token() -> None:
    assert token("db.prod-1") == "db%2Eprod-1"
    assert token("a%2Eb") == "a%252Eb"  # escaping the escape keeps names apart
    assert subject("pagetrack", "team.a", "vm.1", "events") == \
        "pagetrack.team%2Ea.vm%2E1.events"


def test_position_is_the_newest_seq_of_events_and_gaps() -> None:
    assert position({"events": None, "gaps": None, "regions": None}) == Position()
    pos = position({
        "events": {"Pagetrack-Last-Seq": "90"}, "gaps": {"Pagetrack-Last-Seq": "120"},
        "regions": {"Pagetrack-At-Seq": "80", "Pagetrack-Region-Index": "1"},
    })
    assert pos == Position(120, 80, 1)
    assert pos.region_done(80, 1) and pos.region_done(79, 5)
    assert not pos.region_done(80, 2) and not pos.region_done(81, 0)


def test_config_file_and_flags(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    path = tmp_path / "export.toml"
    path.write_text(
        f'[daemon]\ntarget = "127.0.0.1:7000"\ntoken_file = "{token_file}"\n'
        '[vms]\npatterns = ["web-*"]\n'
        '[nats]\nservers = ["nats://127.0.0.1:4333"]\nformat = "jsonl"\n'
        '[stream]\nname = "PT"\ncreate = true\nstorage = "memory"\nmax_age_s = 3600\n'
        '[watch]\npolicy = "drop"\nqueue_limit = 4096\n'
        '[metrics]\nport = 9500\n'
    )
    c = load_config(path)
    assert (c.target, c.bearer_token(), c.patterns, c.nats_servers, c.format) == (
        "127.0.0.1:7000", "s3cret", ("web-*",), ("nats://127.0.0.1:4333",), "jsonl")
    assert (c.stream.name, c.stream.create, c.stream.storage, c.stream.max_age_s) == (
        "PT", True, "memory", 3600)
    assert (c.policy, c.queue_limit, c.metrics_port) == ("drop", 4096, 9500)
    assert c.wants("web-7") and not c.wants("db-1")
    o = c.with_overrides(stream_name="OTHER", vms=("db-1",), format=None)
    assert (o.stream.name, o.stream.storage, o.format) == ("OTHER", "memory", "jsonl")
    assert o.wants("db-1") and o.wants("web-2")


@pytest.mark.parametrize("text, message", [
    ("[nats]\nformat = 'xml'\n", "format 'xml'"),
    ("[watch]\npolicy = 'coalesce'\n", "coalesce would leave seqs"),
    ("[stream]\nretention = 'forever'\n", "stream.retention 'forever'"),
    ("[stream]\nsize = 1\n", "unknown key stream.size"),
    ("[nats]\nmax_inflight = 0\n", "max_inflight must be at least 1"),
    ("[cluster]\nx = 1\n", "unknown section [cluster]"),
    ("nats = 1\n", "'nats' must be a [section]"),
    ("[nats\n", "export.toml"),
])
def test_bad_config_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "export.toml"
    path.write_text(text)
    with pytest.raises(errors.InvalidArgument, match=message.replace("[", r"\[")):
        load_config(path)


def test_every_vm_by_default() -> None:
    assert ExportConfig().wants("anything")


def test_help_does_not_load_the_nats_client() -> None:
    code = (
        "import sys\n"
        "from pagetrack.cli import main\n"
        "assert main(['export', 'nats', '--help']) == 0\n"
        "assert 'nats' not in sys.modules, 'pagetrack --help imported nats'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--create-stream" in out.stdout


def test_cli_refuses_a_bad_config_with_exit_2_or_1(tmp_path: Path) -> None:
    path = tmp_path / "export.toml"
    path.write_text("[watch]\npolicy = 'coalesce'\n")
    exe = Path(sys.executable).parent / "pagetrack"
    out = subprocess.run([str(exe), "export", "nats", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("pagetrack: policy 'coalesce'")


@pytest.mark.parametrize("fmt", ["protobuf", "jsonl"])
@pytest.mark.parametrize("max_message", [1 << 20, 64 << 10, 8 << 20])
def test_batches_fit_one_nats_message(fmt: str, max_message: int) -> None:
    events, data = batch_limits(max_message, fmt, None, None)
    per_event = 48 if fmt == "protobuf" else 200
    factor = 4 / 3 if fmt == "jsonl" else 1
    assert 1 <= events <= 8192 and data >= 4096
    assert events * per_event + data * factor + 4096 <= max_message
    # a configured batch larger than a message is cut down to fit
    events, data = batch_limits(max_message, fmt, 65536, 1 << 30)
    assert events * per_event + data * factor + 4096 <= max_message and data >= 4096
    with pytest.raises(errors.InvalidArgument, match="cannot hold one 4096-byte write"):
        batch_limits(4096, fmt, None, None)
