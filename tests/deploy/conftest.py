"""Shared readers for the deployment files (no containers needed: CI has no podman)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # no stubs in the dev extra

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """Every document of a YAML file (empty ones skipped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), re.sub(r"\s+", " ", rest).strip()))
    return out


@pytest.fixture(scope="session")
def image_config() -> dict[str, Any]:
    """The daemon config baked into the image (deploy/pagetrack.toml)."""
    return tomllib.loads((DEPLOY / "pagetrack.toml").read_text())


def port_of(addr: str) -> int:
    """The port of a HOST:PORT listen address."""
    return int(addr.rpartition(":")[2])
