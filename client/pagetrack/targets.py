"""Daemon addresses as users write them, normalized and checked (no grpc needed, so the
command line can refuse a bad --target before loading the client)."""

from __future__ import annotations

from pagetrack.constants import DEFAULT_TARGET

DEFAULT_PORT = int(DEFAULT_TARGET.rpartition(":")[2])
_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")


def normalize_target(target: str) -> str:
    """``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH`` (and grpc's other schemes) as given; a
    bare host gets port 50051. Raises ValueError for an empty target or a port that is
    not 1-65535 (grpc would quietly use another port)."""
    target = target.strip()
    if not target:
        raise ValueError("target is empty; give HOST:PORT or unix:PATH")
    if target.startswith(_SCHEMES):
        return target
    if target.startswith("["):
        if "]:" not in target:
            return f"{target}:{DEFAULT_PORT}"
        port = target.rpartition("]:")[2]
    elif target.count(":") == 1:
        port = target.rpartition(":")[2]
    elif ":" not in target:
        return f"{target}:{DEFAULT_PORT}"
    else:
        return target  # a bare IPv6 address: grpc reads it as it is
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"target {target!r}: {port!r} is not a port (1 to 65535); give HOST:PORT, e.g."
            f" {DEFAULT_TARGET}, or unix:PATH"
        )
    return target


__all__ = ["DEFAULT_PORT", "normalize_target"]
