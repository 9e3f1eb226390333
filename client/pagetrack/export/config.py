"""What the exporter reads from its TOML file and flags: which daemon and VMs, which NATS
servers and stream, and how it publishes."""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pagetrack import errors

#: payload formats: the EventBatch protobuf bytes, or one JSON object per event a line
FORMATS = ("protobuf", "jsonl")
#: slow-consumer policies the exporter may Watch under; COALESCE is refused because its
#: gaps name events that are still to come, so JetStream could no longer hold every seq once
POLICIES = ("block", "drop", "disconnect")


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """The JetStream stream, as created with ``create = true``."""

    name: str = "PAGETRACK"
    create: bool = False  #: create the stream (or update its limits) when the exporter starts
    retention: str = "limits"  #: limits | interest | workqueue
    storage: str = "file"  #: file | memory
    discard: str = "old"  #: old | new: what a full stream drops (new = refuse the publish)
    max_age_s: float = 0.0  #: 0 = keep for ever
    max_bytes: int = -1  #: -1 = no limit
    max_msgs: int = -1  #: -1 = no limit
    max_msg_size: int = -1  #: -1 = the server's limit
    duplicate_window_s: float = 120.0  #: how long a Nats-Msg-Id is remembered
    replicas: int = 1


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """Everything ``pagetrack export nats`` needs."""

    target: str = "127.0.0.1:50051"  #: the daemon
    token: str | None = None  #: bearer token of the tenant whose VMs are exported
    token_file: str | None = None  #: or a file holding it, read when the exporter starts
    ca_file: str | None = None
    vms: tuple[str, ...] = ()  #: exact VM names; with ``patterns`` empty too, every VM
    patterns: tuple[str, ...] = ()  #: shell-style globs over VM names
    poll_interval_s: float = 2.0  #: how often ListVms is asked for new VMs
    nats_servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_creds: str | None = None  #: a NATS .creds file (JWT and nkey seed)
    subject_prefix: str = "pagetrack"
    format: str = "protobuf"
    max_inflight: int = 64  #: publishes awaiting their ack, per VM
    ack_timeout_s: float = 10.0  #: an ack later than this restarts the VM's export
    policy: str = "block"  #: the Watch stream's slow-consumer policy
    queue_limit: int | None = None  #: the Watch stream's queue bound, events
    block_timeout_ms: int | None = None
    max_batch_events: int | None = None
    max_batch_bytes: int | None = None
    max_batch_delay_ms: int | None = None
    retry_initial_s: float = 0.2  #: first wait after a failure; doubles up to retry_max_s
    retry_max_s: float = 5.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  #: serve Prometheus metrics here; None = not at all
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise errors.InvalidArgument(
                f"format {self.format!r}: choose one of {', '.join(FORMATS)}"
            )
        if self.policy not in POLICIES:
            raise errors.InvalidArgument(
                f"policy {self.policy!r}: the exporter watches under {', '.join(POLICIES)}"
                " (coalesce would leave seqs neither exported nor reported)"
            )
        if self.max_inflight < 1:
            raise errors.InvalidArgument("max_inflight must be at least 1")
        if self.ack_timeout_s <= 0 or self.poll_interval_s <= 0:
            raise errors.InvalidArgument("ack_timeout_s and poll_interval_s must be positive")
        if not self.nats_servers:
            raise errors.InvalidArgument("give at least one NATS server")
        if not self.subject_prefix or any(c in self.subject_prefix for c in " *>"):
            raise errors.InvalidArgument(
                f"subject_prefix {self.subject_prefix!r}: a NATS subject without wildcards"
            )
        s = self.stream
        for key, value, allowed in (
            ("retention", s.retention, ("limits", "interest", "workqueue")),
            ("storage", s.storage, ("file", "memory")),
            ("discard", s.discard, ("old", "new")),
        ):
            if value not in allowed:
                raise errors.InvalidArgument(
                    f"stream.{key} {value!r}: choose one of {', '.join(allowed)}"
                )

    def bearer_token(self) -> str | None:
        """``token``, else the contents of ``token_file``, else None."""
        if self.token or not self.token_file:
            return self.token
        try:
            return Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise errors.InvalidArgument(f"{self.token_file}: {exc.strerror}") from None

    def wants(self, vm: str) -> bool:
        """Whether ``vm`` is one of the VMs to export."""
        if not self.vms and not self.patterns:
            return True
        return vm in self.vms or any(fnmatch.fnmatchcase(vm, p) for p in self.patterns)

    def with_overrides(self, **values: Any) -> ExportConfig:
        """A copy with the values that are not None (flags over the file); ``stream_*``
        keys set the stream's fields."""
        top = {k: v for k, v in values.items() if v is not None and not k.startswith("stream_")}
        stream = {
            k.removeprefix("stream_"): v
            for k, v in values.items() if v is not None and k.startswith("stream_")
        }
        return replace(self, **top, stream=replace(self.stream, **stream))


_SECTIONS = {
    "daemon": {"target": "target", "token": "token", "token_file": "token_file",
               "ca_file": "ca_file"},
    "vms": {"names": "vms", "patterns": "patterns", "poll_interval_s": "poll_interval_s"},
    "nats": {"servers": "nats_servers", "user": "nats_user", "password": "nats_password",
             "token": "nats_token", "creds": "nats_creds", "subject_prefix": "subject_prefix",
             "format": "format", "max_inflight": "max_inflight",
             "ack_timeout_s": "ack_timeout_s"},
    "watch": {"policy": "policy", "queue_limit": "queue_limit",
              "block_timeout_ms": "block_timeout_ms", "max_batch_events": "max_batch_events",
              "max_batch_bytes": "max_batch_bytes", "max_batch_delay_ms": "max_batch_delay_ms"},
    "metrics": {"host": "metrics_host", "port": "metrics_port"},
}
_STREAM_KEYS = {f.name for f in fields(StreamConfig)}


def load_config(path: str | Path | None) -> ExportConfig:
    """Read the exporter's TOML file (sections daemon, vms, nats, stream, watch, metrics);
    None gives the defaults. Unknown keys are refused, naming the key."""
    if path is None:
        return ExportConfig()
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise errors.InvalidArgument(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise errors.InvalidArgument(f"{path}: {exc}") from None
    values: dict[str, Any] = {}
    stream: dict[str, Any] = {}
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise errors.InvalidArgument(f"{path}: {section!r} must be a [section]")
        if section == "stream":
            for key, value in table.items():
                if key not in _STREAM_KEYS:
                    raise errors.InvalidArgument(f"{path}: unknown key stream.{key}")
                stream[key] = value
            continue
        names = _SECTIONS.get(section)
        if names is None:
            raise errors.InvalidArgument(f"{path}: unknown section [{section}]")
        for key, value in table.items():
            if key not in names:
                raise errors.InvalidArgument(f"{path}: unknown key {section}.{key}")
            values[names[key]] = value
    for key in ("vms", "patterns", "nats_servers"):
        if key in values:
            values[key] = tuple(values[key])
    try:
        return ExportConfig(**values, stream=StreamConfig(**stream))
    except TypeError as exc:
        raise errors.InvalidArgument(f"{path}: {exc}") from None
