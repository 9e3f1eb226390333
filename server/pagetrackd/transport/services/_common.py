"""What every servicer shares: the caller's tenant, required fields, option strings."""

from __future__ import annotations

import math
from typing import Any, TypeAlias

import grpc

from pagetrackd.auth import current_caller
from pagetrackd.domain import InvalidArgument, TenantId

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def tenant() -> TenantId:
    """The calling tenant (set by the auth interceptor)."""
    return current_caller.get().tenant


def require(value: str, field: str) -> str:
    """A string field that must not be empty."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def int_options(options: Any) -> dict[str, Any]:
    """Plugin and workload options arrive as strings; numbers become ints or floats."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        v: Any = value
        for conv in (lambda s: int(s, 0), float):
            try:
                v = conv(value)
                break
            except ValueError:
                continue
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidArgument(f"option {key}={value!r} is not a finite number")
        if value in ("true", "false"):
            v = value == "true"
        out[key] = v
    return out
