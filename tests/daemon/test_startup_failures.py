"""Every way pagetrackd can fail to start: one line on stderr naming the problem and the
fix, no traceback, and an exit status of its own (``pagetrackd --help`` lists them)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagetrackd.startup import EXIT_STATUS_HELP, ExitStatus
from tests.daemon_process import start_daemon

PAGETRACKD = Path(sys.executable).with_name("pagetrackd")
ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict[str, str] | None = None,
         stdin: int | None = subprocess.DEVNULL) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAGETRACK_")}
    done = subprocess.run(
        [str(PAGETRACKD), "--log-format", "json", *args], stdin=stdin, capture_output=True,
        text=True, timeout=60, env={**clean, **(env or {})},
    )
    return done.returncode, done.stderr


def _one_line(stderr: str, *words: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagetrackd: "), stderr
    assert "Traceback" not in stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other process is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_port_in_use(busy_port: int) -> None:
    code, err = _run("--listen", f"127.0.0.1:{busy_port}")
    assert code == ExitStatus.LISTEN
    _one_line(err, f"127.0.0.1:{busy_port}", "in use", "choose another port")


def test_metrics_port_in_use(busy_port: int) -> None:
    code, err = _run("--listen", "127.0.0.1:0", "--metrics-port", str(busy_port))
    assert code == ExitStatus.LISTEN
    _one_line(err, "metrics", "in use")


def test_unix_socket_of_a_running_daemon(tmp_path: Path) -> None:
    """A second daemon on a live daemon's socket is refused (and leaves it alone); a stale
    socket file, left by a killed daemon, is taken over."""
    sock = Path("/tmp") / f"pt-{os.getpid()}-{tmp_path.name[-8:]}.sock"
    first = start_daemon(tmp_path, listen=(f"unix:{sock}",))
    try:
        code, err = _run("--listen", f"unix:{sock}")
        assert code == ExitStatus.LISTEN
        _one_line(err, f"unix:{sock}", "in use")
        assert sock.is_socket() and first.proc.poll() is None
    finally:
        first.proc.kill()
        first.proc.wait()
    assert sock.is_socket()  # stale now
    second = start_daemon(tmp_path, listen=(f"unix:{sock}",))
    assert second.stop() == 0
    sock.unlink(missing_ok=True)


def test_unreadable_config_file(tmp_path: Path) -> None:
    code, err = _run("--config", str(tmp_path / "missing.toml"))
    assert code == ExitStatus.CONFIG_FILE
    _one_line(err, "missing.toml", "no such file", "--config")
    code, err = _run("--config", str(tmp_path))  # a directory
    assert code == ExitStatus.CONFIG_FILE
    _one_line(err, "cannot read config file")


def test_malformed_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = ["127.0.0.1:0"\nlog_level = "info"\n')
    code, err = _run("--config", str(bad))
    assert code == ExitStatus.CONFIG_FILE
    _one_line(err, "bad.toml", "not valid TOML", "line")


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("file", ("unknown setting 'no_such_setting'",)),
        ("env", ("grace_s must be a float",)),
        ("flag", ("listen address 'nowhere'",)),
    ],
)
def test_wrong_setting(tmp_path: Path, where: str, words: tuple[str, ...]) -> None:
    args: list[str] = ["--listen", "127.0.0.1:0"]
    env: dict[str, str] = {}
    if where == "file":
        cfg = tmp_path / "c.toml"
        cfg.write_text("no_such_setting = 1\n")
        args += ["--config", str(cfg)]
    elif where == "env":
        env["PAGETRACK_GRACE_S"] = "soon"
    else:
        args = ["--listen", "nowhere"]
    code, err = _run(*args, env=env)
    assert code == ExitStatus.SETTING
    _one_line(err, *words, "correct it")


def test_tokens_file(tmp_path: Path) -> None:
    code, err = _run("--listen", "127.0.0.1:0", "--tokens-file", str(tmp_path / "none.toml"))
    assert code == ExitStatus.TOKENS_FILE
    _one_line(err, "cannot read tokens file", "none.toml")
    bad = tmp_path / "tokens.toml"
    for text in ('[[token]]\nsha256 = "nothex"\ntenant = "a"\n', "[[token\n"):
        bad.write_text(text)
        code, err = _run("--listen", "127.0.0.1:0", "--tokens-file", str(bad))
        assert code == ExitStatus.TOKENS_FILE
        _one_line(err, "tokens.toml", "[[token]] needs sha256")


def test_tls_files(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    code, err = _run("--listen", "127.0.0.1:0", "--tls-cert", str(tmp_path / "no.pem"),
                     "--tls-key", str(key))
    assert code == ExitStatus.TLS_FILES
    _one_line(err, "cannot read TLS certificate", "no.pem")
    code, err = _run("--listen", "127.0.0.1:0", "--tls-cert", str(key), "--tls-key", str(key))
    assert code == ExitStatus.TLS_FILES
    _one_line(err, "not a usable PEM pair", "--tls-cert")
    code, err = _run("--listen", "127.0.0.1:0", "--tls-cert", str(key))
    assert code == ExitStatus.SETTING
    _one_line(err, "tls_cert and tls_key go together")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--no-such-flag"], ("unrecognized arguments: --no-such-flag",)),
        (["--grace", "soon"], ("--grace", "invalid float value")),
        (["--listen"], ("--listen", "expected one argument")),
    ],
)
def test_bad_flags(args: list[str], words: tuple[str, ...]) -> None:
    code, err = _run(*args)
    assert code == ExitStatus.USAGE
    _one_line(err, *words, "pagetrackd --help")


def test_stop_on_stdin_eof_needs_a_pipe() -> None:
    code, err = _run("--listen", "127.0.0.1:0", "--stop-on-stdin-eof")  # stdin /dev/null
    assert code == ExitStatus.SETTING
    _one_line(err, "--stop-on-stdin-eof", "pipe")


def test_exit_statuses_are_documented() -> None:
    """--help and docs/operations.md list every exit status, each once."""
    helptext = subprocess.run([str(PAGETRACKD), "--help"], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    assert EXIT_STATUS_HELP in helptext
    ops = (ROOT / "docs" / "operations.md").read_text()
    for status in ExitStatus:
        assert len(re.findall(rf"^\s*{int(status)}\s", EXIT_STATUS_HELP, re.M)) == 1, status
        assert re.search(rf"^\| {int(status)} \|", ops, re.M), f"exit status {status} in docs"
