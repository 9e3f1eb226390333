"""Server-wide request limits, reported by GetServerInfo and named in errors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Caps on request sizes and stream settings."""

    max_message_bytes: int = 64 << 20
    max_write_bytes: int = 1 << 20
    max_batch_writes: int = 1 << 20
    #: 2^25 gfns: a 128 GiB guest in one range
    max_gfns_per_request: int = 1 << 25
    max_filter_ranges: int = 1024
    max_watch_batch_events: int = 65536
    default_watch_batch_events: int = 4096
    max_watch_batch_bytes: int = 16 << 20
    default_watch_batch_bytes: int = 4 << 20
    max_watch_batch_delay_ms: int = 1000
    default_watch_batch_delay_ms: int = 2
    max_queue_limit: int = 1 << 22
    default_queue_limit: int = 65536
    max_queue_bytes: int = 256 << 20
    default_queue_bytes: int = 4 << 20
    max_block_timeout_ms: int = 60000
    default_block_timeout_ms: int = 1000
    min_heartbeat_interval_ms: int = 50
    max_heartbeat_interval_ms: int = 60000
    default_heartbeat_interval_ms: int = 1000
    max_audit_mismatches: int = 10000
