"""The JetStream exporter in docker-compose.yml and deploy/k8s: a real CLI command, a config
the exporter accepts, and addresses that reach the daemon, NATS and Prometheus."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pagetrack.export import load_config
from tests.deploy.conftest import DEPLOY, K8S, ROOT, load_yaml_docs, port_of
from tests.deploy.test_compose import _check_cli_call, _default


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    (doc,) = load_yaml_docs(ROOT / "docker-compose.yml")
    s: dict[str, dict[str, Any]] = doc["services"]
    return s


def _mounted(service: dict[str, Any], path: str) -> Path:
    """The host file behind ``path`` in a service's bind mounts."""
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    for inside, outside in mounts.items():
        if path.startswith(inside + "/"):
            return Path(ROOT, outside, path.removeprefix(inside + "/"))
    raise AssertionError(f"{path} is not mounted")


def test_compose_exporter_runs_a_real_command_with_a_valid_config(
    services: dict[str, dict[str, Any]], image_config: dict[str, Any]
) -> None:
    exporter = services["exporter"]
    command = exporter["command"]
    assert command[:3] == ["pagetrack", "export", "nats"]
    _check_cli_call(command[1:])
    config = load_config(_mounted(exporter, command[command.index("--config") + 1]))
    host, _, port = config.target.rpartition(":")
    assert host in services and int(port) == port_of(image_config["listen"][0])
    assert config.stream.create and config.stream.name == "PAGETRACK"
    assert config.metrics_host == "0.0.0.0" and config.metrics_port is not None
    assert exporter["secrets"] == ["pagetrack-client-token"]
    text = _mounted(exporter, command[command.index("--config") + 1]).read_text()
    assert 'token_file = "/run/secrets/pagetrack-client-token"' in text


def test_compose_exporter_reaches_nats_with_jetstream(
    services: dict[str, dict[str, Any]]
) -> None:
    exporter = services["exporter"]
    command = exporter["command"]
    config = load_config(_mounted(exporter, command[command.index("--config") + 1]))
    (server,) = config.nats_servers
    m = re.fullmatch(r"nats://([a-z-]+):(\d+)", server)
    assert m is not None and m.group(1) == "nats"
    nats = services["nats"]
    assert "-js" in nats["command"]
    port = int(nats["command"][nats["command"].index("-p") + 1])
    assert int(m.group(2)) == port
    assert {int(_default(p).rpartition(":")[2]) for p in nats["ports"]} == {port}
    assert all(_default(p).startswith("127.0.0.1:") for p in nats["ports"])
    store = nats["command"][nats["command"].index("-sd") + 1]
    assert any(v.split(":")[1] == store for v in nats["volumes"])
    assert set(exporter["depends_on"]) == {"pagetrackd", "nats"}


def test_prometheus_scrapes_the_exporter(services: dict[str, dict[str, Any]]) -> None:
    (prom,) = load_yaml_docs(DEPLOY / "prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    (static,) = jobs["pagetrack-exporter"]["static_configs"]
    exporter = services["exporter"]
    command = exporter["command"]
    config = load_config(_mounted(exporter, command[command.index("--config") + 1]))
    assert static["targets"] == [f"exporter:{config.metrics_port}"]


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in load_yaml_docs(K8S / "exporter.yaml")}


def test_k8s_exporter_deployment_fits_its_config(tmp_path: Path) -> None:
    res = _k8s()
    deploy = res[("Deployment", "pagetrack-exporter")]
    assert deploy["spec"]["replicas"] == 1  # one exporter per VM: several would race
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    assert args[:3] == ["pagetrack", "export", "nats"]
    _check_cli_call(args[1:])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_path = Path(args[args.index("--config") + 1])
    assert str(config_path.parent) == mounts["config"]
    cm = res[("ConfigMap", volumes["config"]["configMap"]["name"])]
    (tmp_path / config_path.name).write_text(cm["data"][config_path.name])
    token_dir = mounts["token"]
    secret = res[("Secret", volumes["token"]["secret"]["secretName"])]
    (token, value), = secret["stringData"].items()
    token_path = Path(token_dir) / token
    config = load_config(tmp_path / config_path.name)
    assert config.token_file == str(token_path) and value
    # every daemon of the StatefulSet, by its stable name
    (sts,) = [d for d in load_yaml_docs(K8S / "statefulset.yaml") if d["kind"] == "StatefulSet"]
    targets = config.target.split(",")
    assert len(targets) == sts["spec"]["replicas"]
    for i, t in enumerate(targets):
        assert t == f"pagetrackd-{i}.{sts['spec']['serviceName']}:50051"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == config.metrics_port
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    assert pod["securityContext"]["runAsNonRoot"] is True
