"""Daemon configuration: TOML file, then ``PAGETRACK_*`` environment variables, then
command-line flags, each overriding the one before."""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pagetrackd.domain import InvalidArgument
from pagetrackd.limits import (
    DEFAULT_HISTORY_BYTES,
    DEFAULT_HISTORY_EVENTS,
    DEFAULT_PLUGIN_FAILURE_LIMIT,
    MAX_GRACE_S,
    MAX_PLUGIN_FAILURE_LIMIT,
    MAX_SAVE_INTERVAL_S,
)

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ``pagetrackd`` can be told. Field names are the TOML keys; the
    environment variable is ``PAGETRACK_`` + the upper-cased name."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)  #: HOST:PORT or unix:PATH, repeatable
    tokens_file: str = ""  #: TOML file of hashed bearer tokens; empty = no auth
    insecure: bool = False  #: allow non-loopback listening without tokens
    tls_cert: str = ""  #: PEM server certificate; with tls_key, serve TLS on TCP
    tls_key: str = ""  #: PEM private key
    log_level: str = "info"
    log_format: str = "auto"  #: auto (JSON unless a terminal), json or console
    grace_s: float = 5.0  #: seconds in-flight calls get on shutdown
    history_events: int = DEFAULT_HISTORY_EVENTS  #: per-VM resume history, in events
    #: per-VM resume history, in bytes of event data
    history_bytes: int = DEFAULT_HISTORY_BYTES
    metrics_port: int = 0  #: Prometheus metrics on this TCP port; 0 = off
    #: where metrics are served; anything but loopback needs a tokens file (scrapes then
    #: need a token of role metrics or admin) or --insecure
    metrics_host: str = "127.0.0.1"
    metrics_max_vms: int = 100  #: VMs with their own metric labels; the rest are vm="_other"
    state_dir: str = ""  #: where VM state is saved and loaded; empty = nothing saved
    save_interval_s: float = 30.0  #: how often state is saved (and on shutdown)
    #: "interval": a crash loses what changed since the last save; "journal": every
    #: acknowledged change is journaled (fsynced) before its reply
    durability: str = "interval"
    ready_file: str = ""  #: once serving, write the bound addresses here (JSON)
    #: open grpc.health.v1 Health.Watch streams (they need no token), over all callers
    health_watchers: int = 256
    demo: bool = False  #: create a demo VM with slots, tracking and a workload at start
    #: quotas for every tenant (TOML table ``[quotas]``: vms, guest_pages, tracked_gfns,
    #: watchers, workloads, write_rate); unset keys keep their defaults
    quotas: Mapping[str, int] = field(default_factory=dict)
    #: per-tenant overrides (TOML tables ``[tenant_quotas.NAME]``)
    tenant_quotas: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    #: third-party plugins (entry-point names in group ``pagetrackd.plugins``) tenants
    #: may attach; the built-in plugins are always allowed
    plugins_allow: tuple[str, ...] = ()
    #: failed hooks after which a third-party plugin is detached from its VM
    plugin_failure_limit: int = DEFAULT_PLUGIN_FAILURE_LIMIT

    def check(self) -> None:
        """Raise InvalidArgument for settings that cannot work together."""
        if not self.listen:
            raise InvalidArgument("listen: give at least one address")
        for addr in self.listen:
            parse_listen(addr)
        if self.log_format not in ("auto", "json", "console"):
            raise InvalidArgument("log_format must be auto, json or console")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise InvalidArgument("log_level must be debug, info, warning or error")
        if not (
            math.isfinite(self.save_interval_s) and 0 < self.save_interval_s <= MAX_SAVE_INTERVAL_S
        ):
            raise InvalidArgument(
                f"save_interval_s {self.save_interval_s} must be more than 0 and at most"
                f" {MAX_SAVE_INTERVAL_S} seconds"
            )
        if self.durability not in ("interval", "journal"):
            raise InvalidArgument(
                f"durability {self.durability!r} must be \"interval\" or \"journal\""
            )
        if self.durability == "journal" and not self.state_dir:
            raise InvalidArgument("durability = \"journal\" needs a state_dir")
        if not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument(
                f"metrics_port {self.metrics_port} must be 0 (off) or a TCP port 1..65535"
            )
        if not (math.isfinite(self.grace_s) and 0 <= self.grace_s <= MAX_GRACE_S):
            raise InvalidArgument(f"grace_s {self.grace_s} must be 0..{MAX_GRACE_S} seconds")
        for name in ("history_events", "history_bytes", "metrics_max_vms"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} {getattr(self, name)} must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("tls_cert and tls_key go together")
        if not 1 <= self.plugin_failure_limit <= MAX_PLUGIN_FAILURE_LIMIT:
            raise InvalidArgument(
                f"plugin_failure_limit {self.plugin_failure_limit} must be"
                f" 1..{MAX_PLUGIN_FAILURE_LIMIT}"
            )
        if self.health_watchers < 0:
            raise InvalidArgument("health_watchers must be >= 0")
        if (
            self.metrics_port and not self.tokens_file and not self.insecure
            and not is_local(f"{self.metrics_host}:0")
        ):
            raise InvalidArgument(
                f"refusing to serve metrics on {self.metrics_host} without a tokens file:"
                " anyone who can reach it would see every tenant's VMs. Give --tokens-file"
                " (scrapes then need a token of role metrics), or --insecure if the network"
                " is trusted"
            )
        if not self.tokens_file and not self.insecure:
            for addr in self.listen:
                if not is_local(addr):
                    raise InvalidArgument(
                        f"refusing to listen on {addr} without a tokens file: anyone who can"
                        " reach it could use every VM. Give --tokens-file, or --insecure if"
                        " the network is trusted"
                    )


def parse_listen(addr: str) -> tuple[str, str]:
    """Split a listen address into ("unix", path) or (host, port)."""
    if addr.startswith("unix:"):
        if len(addr) <= 5:
            raise InvalidArgument("unix: needs a path, e.g. unix:/run/pagetrack.sock")
        return "unix", addr[5:]
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise InvalidArgument(f"listen address {addr!r}: use HOST:PORT or unix:PATH")
    return host.strip("[]"), port


def is_local(addr: str) -> bool:
    """Whether an address is a unix socket or on loopback."""
    host, _ = parse_listen(addr)
    if host in ("unix", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _coerce(name: str, value: Any, current: Any) -> Any:
    if isinstance(current, Mapping):
        if not isinstance(value, Mapping):
            raise InvalidArgument(f"{name} must be a TOML table")
        return dict(value)
    if isinstance(current, tuple):
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, list | tuple):
            return tuple(str(v) for v in value)
        raise InvalidArgument(f"{name} must be a list of strings")
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off", ""):
            return False
        raise InvalidArgument(f"{name} must be true or false, got {value!r}")
    try:
        return type(current)(value)
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"{name} must be a {type(current).__name__}, got {value!r}"
        ) from None


def merge(base: Config, values: Mapping[str, Any], origin: str) -> Config:
    """``base`` with ``values`` applied; unknown keys are an error naming ``origin``."""
    known = {f.name for f in fields(Config)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise InvalidArgument(f"{origin}: unknown setting {key!r}")
        changes[key] = _coerce(key, value, getattr(base, key))
    return replace(base, **changes)


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """File, then environment, then flags."""
    config = Config()
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"config file {path}: {exc}") from None
        config = merge(config, data, f"config file {path}")
    env = os.environ if env is None else env
    from_env = {
        f.name: env[f"PAGETRACK_{f.name.upper()}"]
        for f in fields(Config)
        if f"PAGETRACK_{f.name.upper()}" in env
    }
    config = merge(config, from_env, "environment")
    config = merge(config, {k: v for k, v in (flags or {}).items() if v is not None}, "flags")
    config.check()
    return config


__all__ = ["Config", "load", "parse_listen"]
