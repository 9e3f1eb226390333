"""Every limit and default of the daemon, in one place.

Request caps (reported by GetServerInfo and named in errors), per-tenant quotas,
and the defaults the API applies when a field is unset. Everything that checks or
reports one of these imports it from here instead of repeating the number.

This module imports nothing from pagetrackd, so every layer may import it (the domain
included). The client package does not import the daemon: where the ``pagetrack``
command's help names a daemon default, tests/application/test_limits.py checks that
it still matches the value here.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- VMs

#: vCPUs of a VM created without max_vcpus
DEFAULT_VCPUS = 8
#: the most vCPUs a VM may have (ids are below it)
MAX_VCPUS = 4096
#: memslots per VM: KVM's KVM_USER_MEM_SLOTS on x86 (509 in the 2016 era) by default,
#: at most 32768 (KVM_MEM_SLOTS_NUM)
DEFAULT_MEMSLOTS = 509
MAX_MEMSLOTS = 32768
#: guest frame number width: 40 bits by default, a 52-bit guest physical address space
#: (x86-64 MAXPHYADDR)
DEFAULT_GFN_BITS = 40
MIN_GFN_BITS = 12
MAX_GFN_BITS = 40
#: the most bytes one guest access (a write, read or cmpxchg piece) may cover
MAX_WRITE_BYTES = 1 << 20

# ---------------------------------------------------------------- event history

#: events kept per VM for Watch resume, unless configured
DEFAULT_HISTORY_EVENTS = 65536
#: bytes of event data kept per VM for Watch resume, unless configured
DEFAULT_HISTORY_BYTES = 16 << 20
#: the largest history one VM may ask for
MAX_HISTORY_EVENTS = 1 << 24
MAX_HISTORY_BYTES = 1 << 32

# ---------------------------------------------------------------- leases

#: a TTL lease lives at least this long between keep-alives
MIN_LEASE_TTL_MS = 100
#: and at most this long (a day)
MAX_LEASE_TTL_MS = 24 * 3600 * 1000

# ---------------------------------------------------------------- workloads and restores

#: ended workloads are forgotten this long after they ended (and beyond each tenant's
#: finished_workloads quota, the oldest first)
FINISHED_WORKLOAD_TTL_S = 3600.0
#: the most tracking references one restore adds (as many as one AddTracking may)
MAX_RESTORE_REFERENCES = 1 << 22

# ---------------------------------------------------------------- uploads and downloads

#: SaveVm / GetRecording chunk size when the request leaves it 0
DEFAULT_CHUNK_BYTES = 1 << 20
#: the smallest chunk a download may ask for
MIN_CHUNK_BYTES = 4096

# ---------------------------------------------------------------- plugins and settings

#: failed hooks after which a third-party plugin is detached from its VM
DEFAULT_PLUGIN_FAILURE_LIMIT = 3
MAX_PLUGIN_FAILURE_LIMIT = 1_000_000
#: the longest save interval and shutdown grace a daemon may be configured with
MAX_SAVE_INTERVAL_S = 86400
MAX_GRACE_S = 3600


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Caps on request sizes and stream settings, reported by GetServerInfo."""

    max_message_bytes: int = 64 << 20
    max_write_bytes: int = MAX_WRITE_BYTES
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


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-tenant limits. The defaults suit a daemon that several tenants share: each
    bounds what one tenant can make the daemon hold or do (docs/operations.md says
    why each is safe and how to raise it). The byte quotas count what the daemon
    really holds, not just the bytes a client sent."""

    vms: int = 64
    guest_pages: int = 1 << 36  #: pages summed over the tenant's memslots
    tracked_gfns: int = 1 << 26
    watchers: int = 256  #: open Watch streams
    workloads: int = 64  #: running workloads
    write_rate: int = 0  #: guest writes per second (a 1 s burst is allowed); 0 = no limit
    guest_memory_bytes: int = 1 << 30  #: bytes guest memory holds, summed over VMs
    tracking_bytes: int = 256 << 20  #: bytes track counters hold, summed over VMs
    history_bytes: int = 1 << 30  #: the VMs' event history bounds, summed
    stream_queue_bytes: int = 1 << 30  #: the open Watch streams' queue bounds, summed
    recording_bytes: int = 256 << 20  #: one VM's recording file
    upload_bytes: int = 256 << 20  #: one RestoreVm or ReplayVm upload, and what it decodes to
    leases: int = 1024  #: TTL leases held at once
    finished_workloads: int = 64  #: ended workloads kept for their figures
    #: bytes the built-in plugins' state holds (shadow MMU pages, vGPU shadow tables)
    plugin_state_bytes: int = 256 << 20


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_GFN_BITS",
    "DEFAULT_HISTORY_BYTES",
    "DEFAULT_HISTORY_EVENTS",
    "DEFAULT_MEMSLOTS",
    "DEFAULT_PLUGIN_FAILURE_LIMIT",
    "DEFAULT_VCPUS",
    "FINISHED_WORKLOAD_TTL_S",
    "MAX_GFN_BITS",
    "MAX_GRACE_S",
    "MAX_HISTORY_BYTES",
    "MAX_HISTORY_EVENTS",
    "MAX_LEASE_TTL_MS",
    "MAX_MEMSLOTS",
    "MAX_PLUGIN_FAILURE_LIMIT",
    "MAX_RESTORE_REFERENCES",
    "MAX_SAVE_INTERVAL_S",
    "MAX_VCPUS",
    "MAX_WRITE_BYTES",
    "MIN_CHUNK_BYTES",
    "MIN_GFN_BITS",
    "MIN_LEASE_TTL_MS",
    "Quotas",
    "ServerLimits",
]
