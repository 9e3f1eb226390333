"""deploy/k8s: every manifest is valid for a pinned Kubernetes version, and the pieces fit
together (ports, probes, config keys, the tokens file, the state volume)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from pagetrackd.auth import Authenticator
from pagetrackd.config import load
from tests.deploy.conftest import K8S, load_yaml_docs, port_of

#: the Kubernetes version the manifests are checked against (gRPC probes are GA since 1.27)
K8S_VERSION = "1.30.0"

MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (doc["kind"], doc["metadata"]["name"]): doc
        for path in MANIFESTS
        for doc in load_yaml_docs(path)
    }


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    return _resources()


@pytest.fixture(scope="module")
def pod(resources: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = resources[("StatefulSet", "pagetrackd")]["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["containers"]
    assert isinstance(c, dict)
    return c


@pytest.fixture(scope="module")
def config_toml(resources: dict[tuple[str, str], dict[str, Any]]) -> str:
    text = resources[("ConfigMap", "pagetrackd")]["data"]["pagetrack.toml"]
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_mistake() -> None:
    """The check above has teeth: an unknown field in a probe is refused."""
    (doc,) = load_yaml_docs(K8S / "statefulset.yaml")
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = load_yaml_docs(K8S / "kustomization.yaml")
    assert sorted(kust["resources"]) == [p.name for p in MANIFESTS]


def test_probes_use_grpc_health_on_the_api_port(
    container: dict[str, Any], config_toml: str
) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = tomllib.loads(config_toml)
    assert ports["grpc"] == port_of(config["listen"][0]) == 50051
    assert ports["metrics"] == config["metrics_port"] == 9090
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe


def test_resources_have_requests_and_limits(container: dict[str, Any]) -> None:
    res = container["resources"]
    assert {"cpu", "memory"} <= set(res["requests"])
    assert {"cpu", "memory"} <= set(res["limits"])


def test_runs_as_the_images_non_root_user(pod: dict[str, Any], container: dict[str, Any]) -> None:
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True
    assert sec["runAsUser"] == 10001 and sec["fsGroup"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_config_map_is_a_config_the_daemon_accepts(config_toml: str, tmp_path: Path) -> None:
    path = tmp_path / "pagetrack.toml"
    path.write_text(config_toml)
    config = load(str(path), env={})
    assert config.tokens_file, "a non-loopback listener needs tokens"
    assert config.metrics_host == "0.0.0.0"


def test_volumes_hold_config_tokens_and_state(
    resources: dict[tuple[str, str], dict[str, Any]],
    container: dict[str, Any],
    config_toml: str,
    tmp_path: Path,
) -> None:
    sts = resources[("StatefulSet", "pagetrackd")]
    config = tomllib.loads(config_toml)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}

    # state: on the per-pod PersistentVolumeClaim, where the config says
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == config["state_dir"]

    # config: the ConfigMap's key is the file the container is told to read
    assert volumes["config"]["configMap"]["name"] == "pagetrackd"
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    assert str(config_path.parent) == mounts["config"]
    assert config_path.name in resources[("ConfigMap", "pagetrackd")]["data"]

    # tokens: the Secret's key is the tokens file the config names, and it loads
    secret_name = volumes["tokens"]["secret"]["secretName"]
    secret = resources[("Secret", secret_name)]
    tokens_path = Path(config["tokens_file"])
    assert str(tokens_path.parent) == mounts["tokens"]
    text = secret["stringData"][tokens_path.name]
    (tmp_path / "tokens.toml").write_text(text)
    assert Authenticator.from_file(tmp_path / "tokens.toml").enabled


def test_services_select_the_pods_and_name_their_ports(
    resources: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    sts = resources[("StatefulSet", "pagetrackd")]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}
    headless = resources[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    for svc in (headless, resources[("Service", "pagetrackd")]):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
