"""docker-compose.yml, deploy/prometheus.yml, the Dockerfile and the scripts they run fit
together: files parse, ports agree with EXPOSE and the daemon's config, and every command
and flag they use exists in ``pagetrackd --help`` and the ``pagetrack`` CLI."""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pagetrack.cli import app as cli_app
from pagetrackd.auth import Authenticator
from pagetrackd.config import load
from pagetrackd.domain import PermissionDenied
from tests.deploy.conftest import (
    DEPLOY,
    ROOT,
    dockerfile_instructions,
    load_yaml_docs,
    port_of,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"
PAGETRACKD = Path(sys.executable).with_name("pagetrackd")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(COMPOSE_FILE)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    s: dict[str, dict[str, Any]] = compose["services"]
    return s


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    (doc,) = load_yaml_docs(DEPLOY / "prometheus.yml")
    return doc


@pytest.fixture(scope="module")
def daemon_flags() -> set[str]:
    """Every --flag in ``pagetrackd --help``."""
    out = subprocess.run(
        [str(PAGETRACKD), "--help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return set(re.findall(r"(--[a-z][a-z-]*)", out))


def _expose() -> set[int]:
    return {
        int(p.split("/")[0])
        for word, args in dockerfile_instructions()
        if word == "EXPOSE"
        for p in args.split()
    }


def _container_port(mapping: str) -> int:
    """The container side of a compose port mapping like "${X:-1.2.3.4}:${Y:-5}:50051"."""
    return int(re.sub(r"\$\{[^}]*\}", "", mapping).rpartition(":")[2].split("/")[0])


def _default(value: str) -> str:
    """A compose value with every ${VAR:-default} replaced by its default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


# ------------------------------------------------------------------- services and ports


def test_services_and_profiles(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"pagetrackd", "prometheus", "consumer", "demo", "nats", "exporter"}
    assert services["demo"]["profiles"] == ["demo"]
    for name in ("pagetrackd", "prometheus", "consumer", "nats", "exporter"):
        assert "profiles" not in services[name], f"{name} must start without a profile"


def test_daemon_is_built_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    daemon = services["pagetrackd"]
    assert (ROOT / daemon["build"]["context"] / daemon["build"]["dockerfile"]).is_file()
    assert _default(daemon["build"]["args"]["BASE"]) == "python:3.12-slim"
    for name in ("consumer", "demo", "exporter"):  # the bundled CLI runs from the same image
        assert services[name]["image"] == daemon["image"]


def test_ports_match_expose_and_the_daemons_config(
    services: dict[str, dict[str, Any]], image_config: dict[str, Any]
) -> None:
    api = port_of(image_config["listen"][0])
    metrics = image_config["metrics_port"]
    assert _expose() == {api, metrics} == {50051, 9090}
    assert {_container_port(p) for p in services["pagetrackd"]["ports"]} == {api, metrics}
    # published on loopback unless PAGETRACK_PUBLISH says otherwise
    for p in services["pagetrackd"]["ports"] + services["prometheus"]["ports"]:
        assert _default(p).startswith("127.0.0.1:")


def test_image_config_is_valid_and_needs_tokens_or_insecure(tmp_path: Path) -> None:
    path = str(DEPLOY / "pagetrack.toml")
    with pytest.raises(Exception, match="without a tokens file"):
        load(path, env={})
    assert load(path, env={}, flags={"insecure": True}).listen == ("0.0.0.0:50051",)
    tokens = DEPLOY / "compose" / "tokens.toml"
    config = load(path, env={"PAGETRACK_TOKENS_FILE": str(tokens)})
    assert config.state_dir == "/var/lib/pagetrack"
    assert config.metrics_host == "0.0.0.0"


def test_daemon_command_uses_real_flags(
    services: dict[str, dict[str, Any]], daemon_flags: set[str]
) -> None:
    command = services["pagetrackd"]["command"]
    used = {a.split("=")[0] for a in command if a.startswith("--")}
    assert used and used <= daemon_flags
    # the flags the entrypoint and the docs rely on
    assert {"--config", "--insecure", "--tokens-file", "--listen", "--metrics-port",
            "--metrics-host", "--state-dir"} <= daemon_flags


def test_image_config_keys_are_daemon_flags(
    image_config: dict[str, Any], daemon_flags: set[str]
) -> None:
    for key in image_config:
        flag = "--" + key.removesuffix("_s").replace("_", "-")
        assert flag in daemon_flags, key


def test_state_and_secrets(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], image_config: dict[str, Any]
) -> None:
    daemon = services["pagetrackd"]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in daemon["volumes"]}
    assert volumes[image_config["state_dir"]] in compose["volumes"]
    # the tokens secret lands where the entrypoint looks for it
    assert daemon["secrets"] == ["pagetrack-tokens"]
    assert "/run/secrets/pagetrack-tokens" in (DEPLOY / "docker-entrypoint.sh").read_text()
    for secret in compose["secrets"].values():
        assert (ROOT / _default(secret["file"])).is_file()


def test_example_tokens_match(tmp_path: Path) -> None:
    compose_dir = DEPLOY / "compose"
    auth = Authenticator.from_file(compose_dir / "tokens.toml")
    demo = auth.authenticate("Bearer " + (compose_dir / "demo.token").read_text().strip())
    admin = auth.authenticate("Bearer " + (compose_dir / "admin.token").read_text().strip())
    assert (demo.tenant, demo.role) == ("demo", "tenant")
    assert admin.admin
    assert hashlib.sha256(b"x").hexdigest() not in (compose_dir / "tokens.toml").read_text()
    # Prometheus' token scrapes /metrics and nothing else; a tenant's does not scrape
    metrics = "Bearer " + (compose_dir / "metrics.token").read_text().strip()
    assert auth.may_scrape(metrics) and auth.may_scrape("Bearer " + (
        compose_dir / "admin.token").read_text().strip())
    assert not auth.may_scrape("Bearer " + (compose_dir / "demo.token").read_text().strip())
    with pytest.raises(PermissionDenied):
        auth.authenticate(metrics)


# ------------------------------------------------------------------- prometheus


def test_prometheus_scrapes_the_daemons_metrics_port(
    services: dict[str, dict[str, Any]],
    prometheus_config: dict[str, Any],
    image_config: dict[str, Any],
) -> None:
    jobs = {j["job_name"]: j for j in prometheus_config["scrape_configs"]}
    (static,) = jobs["pagetrackd"]["static_configs"]
    assert static["targets"] == [f"pagetrackd:{image_config['metrics_port']}"]
    assert jobs["pagetrackd"].get("metrics_path", "/metrics") == "/metrics"
    assert "pagetrackd" in services

    prom = services["prometheus"]
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    mounted = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    source = mounted[config_flag.partition("=")[2]]
    assert (ROOT / source).resolve() == (DEPLOY / "prometheus.yml").resolve()
    assert {_container_port(p) for p in prom["ports"]} == {9090}  # Prometheus' own port


def test_prometheus_sends_the_metrics_token(
    compose: dict[str, Any],
    services: dict[str, dict[str, Any]],
    prometheus_config: dict[str, Any],
) -> None:
    """The daemon has a tokens file, so /metrics wants a bearer token: Prometheus reads
    one from the secret the stack mounts, and the tokens file gives it role metrics."""
    jobs = {j["job_name"]: j for j in prometheus_config["scrape_configs"]}
    auth = jobs["pagetrackd"]["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"
    (secret,) = services["prometheus"]["secrets"]
    assert auth["credentials_file"] == f"/run/secrets/{secret}"
    token = (ROOT / _default(compose["secrets"][secret]["file"])).read_text().strip()
    tokens = Authenticator.from_file(DEPLOY / "compose" / "tokens.toml")
    assert tokens.may_scrape(f"Bearer {token}")


# ------------------------------------------------------------------- the CLI's commands


def _cli_tree() -> Any:
    """The CLI's command tree (typer's click-style objects; only .commands, .params and
    their .opts are used)."""
    return typer.main.get_command(cli_app)


def _opts(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (getattr(p, "opts", None) or ()) if o.startswith("-")}


def _check_cli_call(words: list[str]) -> None:
    """Raise AssertionError unless ``pagetrack WORDS...`` names a real command and options."""
    root = _cli_tree()
    cmd = root
    used: list[str] = []
    path: list[str] = []
    for word in words:
        if word.startswith("-"):
            used.append(word.split("=")[0])
        elif hasattr(cmd, "commands") and word in cmd.commands:
            cmd = cmd.commands[word]
            path.append(word)
    assert not hasattr(cmd, "commands"), f"pagetrack {' '.join(words)}: no such command"
    unknown = set(used) - _opts(root) - _opts(cmd)
    assert not unknown, f"pagetrack {' '.join(path)}: unknown options {unknown}"


def _shell_calls(path: Path, prefix: str) -> list[list[str]]:
    """The words after each ``prefix`` in command position in a shell script (continuation
    lines joined; each call ends at ; & | or a parenthesis)."""
    text = path.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        for m in re.finditer(rf"(?:^|[;&|(]|\s){re.escape(prefix)}\s+(.*)", line):
            lexer = shlex.shlex(m.group(1), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words: list[str] = []
            try:
                for word in lexer:
                    if word and set(word) <= set(";&|()<>"):
                        break
                    words.append(word)
            except ValueError:  # a quote that closes on a later line: not a call
                continue
            if words and not words[0].startswith("$"):
                calls.append(words)
    return calls


def test_cli_calls_check_themselves() -> None:
    _check_cli_call(["--json", "workload", "list", "demo"])
    with pytest.raises(AssertionError, match="unknown options"):
        _check_cli_call(["watch", "demo", "--no-such-flag"])
    with pytest.raises(AssertionError, match="no such command"):
        _check_cli_call(["vm"])


@pytest.mark.parametrize(
    ("script", "prefix"),
    [("compose/demo.sh", "pagetrack"), ("smoke.sh", "cli")],
)
def test_scripts_call_real_cli_commands(script: str, prefix: str) -> None:
    calls = _shell_calls(DEPLOY / script, prefix)
    assert len(calls) >= 5
    for words in calls:
        _check_cli_call(words)


def test_consumer_runs_a_real_watch_command(services: dict[str, dict[str, Any]]) -> None:
    consumer = services["consumer"]
    script = consumer["command"][-1]
    mount_dir, _, name = script.rpartition("/")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in consumer["volumes"]}
    local = ROOT / mounts[mount_dir] / name
    assert local == DEPLOY / "compose" / "consumer.py"
    argv = re.search(r'\["pagetrack", ([^\]]*)\]', local.read_text())
    assert argv is not None
    words = [w.strip().strip('"') for w in argv.group(1).split(",")]
    assert words[:1] == ["watch"]
    _check_cli_call([w for w in words if w.startswith("-") or w == "watch"])
    help_text = CliRunner().invoke(cli_app, ["watch", "--help"], env={"COLUMNS": "200"}).output
    assert "jsonl" in help_text


def test_clients_reach_the_daemon_by_service_name(
    services: dict[str, dict[str, Any]], image_config: dict[str, Any]
) -> None:
    envvars = {getattr(p, "envvar", None) for p in _cli_tree().params}
    assert {"PAGETRACK_TARGET", "PAGETRACK_TOKEN"} <= envvars
    for name in ("consumer", "demo"):
        target = services[name]["environment"]["PAGETRACK_TARGET"]
        host, _, port = target.rpartition(":")
        assert host in services and int(port) == port_of(image_config["listen"][0])
        assert services[name]["secrets"] == ["pagetrack-client-token"]
        assert services[name]["healthcheck"] == {"disable": True}


# ------------------------------------------------------------------- the Dockerfile


def test_dockerfile_shape(image_config: dict[str, Any]) -> None:
    instr = dockerfile_instructions()
    words = [w for w, _ in instr]
    assert instr[0] == ("ARG", "BASE=python:3.12-slim")
    froms = [a for w, a in instr if w == "FROM"]
    assert len(froms) == 2 and all(f.split()[0] == "${BASE}" for f in froms)
    user = next(a for w, a in instr if w == "USER")
    assert user.split(":")[0] not in ("0", "root")
    volume = next(a for w, a in instr if w == "VOLUME")
    assert volume == f'["{image_config["state_dir"]}"]'
    assert words.count("HEALTHCHECK") == 1 and words.count("ENTRYPOINT") == 1
    assert "--from=builder" in next(a for w, a in instr if w == "COPY" and "/opt/pagetrack" in a)


def test_dockerfile_copies_what_dockerignore_lets_through() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    copied: dict[str, str] = {}
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from=" not in args:
            parts = [p for p in args.split() if not p.startswith("--")]
            for src in parts[:-1]:
                copied[src.rstrip("/")] = parts[-1]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert any(src == a or src.startswith(a + "/") for a in allowed), src
    # the healthcheck and entrypoint commands are the scripts copied in
    instr = dict(dockerfile_instructions())
    assert copied["deploy/healthcheck.py"].rsplit("/", 1)[1] in instr["HEALTHCHECK"]
    assert copied["deploy/docker-entrypoint.sh"].rsplit("/", 1)[1] in instr["ENTRYPOINT"]


def test_no_build_time_workarounds_in_the_dockerfile() -> None:
    """This machine's build flags (CA mounts, proxies) are passed on the command line."""
    text = (DEPLOY / "Dockerfile").read_text()
    for word in ("PIP_CERT", "ca-certificates.crt", "debian-python", "proxy"):
        assert word not in text


def test_shell_scripts_are_posix_sh_or_bash() -> None:
    for path in [DEPLOY / "docker-entrypoint.sh", DEPLOY / "compose" / "demo.sh"]:
        assert path.read_text().startswith("#!/bin/sh\n"), path
        subprocess.run(["sh", "-n", str(path)], check=True, timeout=10)
    smoke = DEPLOY / "smoke.sh"
    assert smoke.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(smoke)], check=True, timeout=10)
    for path in DEPLOY.rglob("*"):
        if path.suffix in (".sh", ".py") and path.read_text().startswith("#!"):
            assert path.stat().st_mode & 0o111, f"{path} is not executable"
