#!/usr/bin/env python3
"""Container health check: ask pagetrackd's grpc.health.v1 service whether it is SERVING.

Exit 0 when it is, 1 otherwise (NOT_SERVING while shutting down, unreachable, timeout).
The target is the first argument, else ``PAGETRACK_HEALTH_TARGET``, else the first address
the daemon was configured to listen on (``PAGETRACK_LISTEN``, else ``listen`` in the config
file ``PAGETRACK_CONFIG`` or /etc/pagetrack/pagetrack.toml; 0.0.0.0 and :: become
loopback), else 127.0.0.1:50051. A daemon started with ``--listen`` on another port needs
``PAGETRACK_HEALTH_TARGET``. The health service answers without a token. With
``PAGETRACK_TLS_CERT`` set, the check uses TLS and trusts that certificate.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_CONFIG = "/etc/pagetrack/pagetrack.toml"
WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]", "": "127.0.0.1"}


def _listen(env: Mapping[str, str]) -> list[str]:
    if env.get("PAGETRACK_LISTEN"):
        return [a.strip() for a in env["PAGETRACK_LISTEN"].split(",") if a.strip()]
    try:
        config = tomllib.loads(Path(env.get("PAGETRACK_CONFIG", DEFAULT_CONFIG)).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return []
    listen = config.get("listen", [])
    return [listen] if isinstance(listen, str) else [str(a) for a in listen]


def target_from_env(env: Mapping[str, str]) -> str:
    """Where to send the check, from the environment and config the daemon started with."""
    if env.get("PAGETRACK_HEALTH_TARGET"):
        return env["PAGETRACK_HEALTH_TARGET"]
    listen = _listen(env)
    if not listen:
        return DEFAULT_TARGET
    addr = listen[0]
    if addr.startswith("unix:"):
        return addr
    host, _, port = addr.rpartition(":")
    return f"{WILDCARDS.get(host, host)}:{port}"


def check(target: str, timeout: float = 3.0, tls_cert: str = "") -> int:
    """0 if the daemon at ``target`` reports SERVING, else 1 (with the reason on stderr)."""
    if tls_cert:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_cert).read_bytes())
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types omit Check
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"pagetrackd at {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"pagetrackd at {target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str]) -> int:
    """Entry point: ``pagetrack-healthcheck [TARGET]``."""
    target = argv[1] if len(argv) > 1 else target_from_env(os.environ)
    return check(target, tls_cert=os.environ.get("PAGETRACK_TLS_CERT", ""))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
