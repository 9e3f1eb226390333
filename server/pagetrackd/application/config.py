"""The engine's settings and the per-tenant quotas it applies."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pagetrackd.domain import InvalidArgument
from pagetrackd.limits import (
    DEFAULT_HISTORY_BYTES,
    DEFAULT_HISTORY_EVENTS,
    DEFAULT_PLUGIN_FAILURE_LIMIT,
    Quotas,
)


def make_quotas(values: Mapping[str, Any], base: Quotas | None = None) -> Quotas:
    """Quotas from a TOML table; unknown names and negative values are refused."""
    base = base or Quotas()
    known = set(Quotas.__dataclass_fields__)
    out = {}
    for key, value in values.items():
        if key not in known:
            raise InvalidArgument(f"unknown quota {key!r}; known: {', '.join(sorted(known))}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"quota {key} must be a whole number >= 0, got {value!r}")
        out[key] = value
    return dataclasses.replace(base, **out)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine settings (see ``pagetrackd --help`` for their flags)."""

    history_events: int = DEFAULT_HISTORY_EVENTS
    history_bytes: int = DEFAULT_HISTORY_BYTES
    quotas: Quotas = field(default_factory=Quotas)
    #: quotas for named tenants; others get ``quotas``
    tenant_quotas: Mapping[str, Quotas] = field(default_factory=dict)
    lease_check_interval_s: float = 0.05
    #: third-party plugins (entry-point names) tenants may attach; built-ins always
    plugins_allow: tuple[str, ...] = ()
    #: failed hooks after which a third-party plugin is detached
    plugin_failure_limit: int = DEFAULT_PLUGIN_FAILURE_LIMIT
