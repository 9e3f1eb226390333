"""The scripts the image runs: the health check (against a real pagetrackd) and the
entrypoint (with a stand-in pagetrackd, so no container is needed)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.daemon_process import start_daemon
from tests.deploy.conftest import DEPLOY

PAGETRACKD = Path(sys.executable).with_name("pagetrackd")


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load_healthcheck()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real pagetrackd on a free loopback port; yields HOST:PORT."""
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    try:
        yield d.tcp
    finally:
        d.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_healthcheck_passes_against_a_serving_daemon(
    daemon: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert healthcheck.main(["pagetrack-healthcheck", daemon]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_healthcheck_fails_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{_closed_port()}"
    assert healthcheck.check(target, timeout=1.0) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_healthcheck_as_the_image_runs_it(daemon: str) -> None:
    """As a script, with the target taken from PAGETRACK_LISTEN."""
    port = daemon.rpartition(":")[2]
    env = {**os.environ, "PAGETRACK_LISTEN": f"0.0.0.0:{port}"}
    env.pop("PAGETRACK_HEALTH_TARGET", None)
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")], env=env,
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert f"127.0.0.1:{port}: SERVING" in done.stdout


@pytest.mark.parametrize(
    ("env", "target"),
    [
        ({}, "127.0.0.1:50051"),  # the image's config file (or the default without it)
        ({"PAGETRACK_LISTEN": "0.0.0.0:6000"}, "127.0.0.1:6000"),
        ({"PAGETRACK_LISTEN": "[::]:6000,unix:/x"}, "[::1]:6000"),
        ({"PAGETRACK_LISTEN": "unix:/run/pt.sock"}, "unix:/run/pt.sock"),
        ({"PAGETRACK_LISTEN": "10.0.0.5:7"}, "10.0.0.5:7"),
        ({"PAGETRACK_HEALTH_TARGET": "h:1", "PAGETRACK_LISTEN": "0.0.0.0:2"}, "h:1"),
    ],
)
def test_healthcheck_target(env: dict[str, str], target: str) -> None:
    env = {"PAGETRACK_CONFIG": str(DEPLOY / "pagetrack.toml"), **env}
    assert healthcheck.target_from_env(env) == target


def test_healthcheck_target_from_a_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('listen = ["0.0.0.0:7777"]\n')
    assert healthcheck.target_from_env({"PAGETRACK_CONFIG": str(tmp_path / "c.toml")}) == (
        "127.0.0.1:7777"
    )


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A PATH directory whose pagetrackd and other-tool print their argv and token env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("pagetrackd", "other-tool"):
        script = bin_dir / name
        script.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $*"\n'
            'echo "tokens=${PAGETRACK_TOKENS_FILE-unset}"\n'
        )
        script.chmod(0o755)
    return bin_dir


def _entrypoint(fake_bin: Path, *args: str, **env: str) -> list[str]:
    sh = shutil.which("sh")
    assert sh is not None
    base = {"PATH": f"{fake_bin}:/usr/bin:/bin", **env}
    done = subprocess.run(
        [sh, str(DEPLOY / "docker-entrypoint.sh"), *args], env=base,
        capture_output=True, text=True, timeout=10, check=True,
    )
    return done.stdout.splitlines()


def test_entrypoint_starts_the_daemon_with_the_image_config(fake_bin: Path) -> None:
    assert _entrypoint(fake_bin) == [
        "pagetrackd --config /etc/pagetrack/pagetrack.toml", "tokens=unset",
    ]
    assert _entrypoint(fake_bin, "--insecure", "--demo")[0] == (
        "pagetrackd --config /etc/pagetrack/pagetrack.toml --insecure --demo"
    )


def test_entrypoint_respects_a_given_config(fake_bin: Path) -> None:
    assert _entrypoint(fake_bin, "--config", "/c.toml")[0] == "pagetrackd --config /c.toml"
    assert _entrypoint(fake_bin, PAGETRACK_CONFIG="/k.toml")[0] == (
        "pagetrackd --config /k.toml"
    )


def test_entrypoint_runs_other_commands(fake_bin: Path) -> None:
    assert _entrypoint(fake_bin, "other-tool", "watch", "demo")[0] == "other-tool watch demo"


def test_entrypoint_keeps_an_explicit_tokens_file(fake_bin: Path) -> None:
    out = _entrypoint(fake_bin, PAGETRACK_TOKENS_FILE="/etc/t.toml")
    assert out[1] == "tokens=/etc/t.toml"
    # an empty value counts as unset (compose passes "" for an unset variable)
    assert _entrypoint(fake_bin, PAGETRACK_TOKENS_FILE="")[1] == "tokens=unset"
