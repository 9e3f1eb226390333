"""TTL leases in the state directory (``leases.json``): a sealed JSON file (its body's
sha256 beside it) written with every save, read back at start.

With ``durability = "journal"`` a lease made or ended between saves is a journal record
(``lease_create`` / ``lease_end``); the file says up to which journal index it holds
them (``journal_index``), and :func:`apply_lease_records` applies the newer ones at
start, before the VM files load, so the references held under such a lease load too."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from pagetrackd.application import Engine
from pagetrackd.domain import PageTrackError, TenantId
from pagetrackd.leases import Lease
from pagetrackd.state.container import FORMAT_VERSION, SnapshotError
from pagetrackd.state.vmfiles import read_regular

log = structlog.get_logger("pagetrackd.state")

__all__ = [
    "LEASES_FILE", "apply_lease_records", "lease_record", "leases_blob", "load_leases", "seal",
    "unseal",
]

LEASES_FILE = "leases.json"

def seal(body: dict[str, Any]) -> bytes:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canon.encode()).hexdigest()
    return json.dumps(
        {"format_version": FORMAT_VERSION, "sha256": digest, "body": body}, indent=1
    ).encode()


def unseal(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"not valid JSON ({exc}); truncated or corrupt") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"format_version is not {FORMAT_VERSION}")
    body = doc.get("body")
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    if hashlib.sha256(canon.encode()).hexdigest() != doc.get("sha256"):
        raise SnapshotError("sha256 mismatch: the file is corrupt")
    if not isinstance(body, dict):
        raise SnapshotError("body is not an object")
    return body



def leases_blob(
    engine: Engine, leases: list[Lease], began_ns: int, journal_index: int = 0
) -> bytes:
    """The file holding ``leases`` as they stand, for a save that began at ``began_ns``
    (a saved_at_ns after a change means every VM file holds that change) when the
    journal's last index was ``journal_index``."""
    return seal({
        "saved_at_ns": began_ns,
        "journal_index": journal_index,
        "leases": [
            {
                "lease_id": lease.lease_id,
                "tenant": lease.tenant,
                "ttl_ms": lease.ttl_ms,
                "remaining_ms": engine.leases.remaining_ms(lease),
                "label": lease.label,
            }
            for lease in leases
        ],
    })


def load_leases(engine: Engine, path: Path) -> tuple[dict[str, set[str]], int]:
    """Adopt the TTL leases saved at ``path`` that have time left; returns tenant -> the
    lease ids adopted, and the journal index the file holds (0 = none, or a file from
    before journaled leases). Raises SnapshotError (or OSError) when the file is
    unusable."""
    out: dict[str, set[str]] = {}
    if not path.exists():
        return out, 0
    try:
        body = unseal(read_regular(path))
        index = body.get("journal_index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise SnapshotError(f"journal_index {index!r} is not a count")
        records = body.get("leases")
        if not isinstance(records, list):
            raise SnapshotError("no lease list")
        for r in records:
            remaining = int(r["remaining_ms"])
            if remaining <= 0:
                continue
            lease = engine.leases.adopt(
                TenantId(str(r["tenant"])), str(r["lease_id"]), int(r["ttl_ms"]),
                remaining, str(r.get("label", "")),
            )
            out.setdefault(lease.tenant, set()).add(lease.lease_id)
    except (PageTrackError, KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"lease file: {exc}") from None
    return out, index


def lease_record(change: str, lease: Lease) -> dict[str, Any]:
    """The journal record of a TTL lease made (``change`` "create") or ended ("end")."""
    rec: dict[str, Any] = {"t": lease.tenant, "vm": "", "op": f"lease_{change}",
                           "lease": lease.lease_id}
    if change == "create":
        rec["ttl_ms"] = lease.ttl_ms
        rec["label"] = lease.label
    return rec


def apply_lease_records(
    engine: Engine, records: Iterable[dict[str, Any]], after: int, out: dict[str, set[str]]
) -> int:
    """Apply the journal's lease records newer than index ``after`` to the lease table
    and to ``out`` (tenant -> lease ids), in order. A lease made again gets a full TTL
    from now (its holder keeps it alive from there). Returns the records applied; a
    malformed one is logged and skipped."""
    applied = 0
    for rec in records:
        if rec["i"] <= after:
            continue
        try:
            tenant, lease_id = TenantId(str(rec["t"])), str(rec["lease"])
            if rec["op"] == "lease_create":
                engine.leases.drop(lease_id)
                ttl = int(rec["ttl_ms"])
                engine.leases.adopt(tenant, lease_id, ttl, ttl, str(rec.get("label", "")))
                out.setdefault(tenant, set()).add(lease_id)
            elif rec["op"] == "lease_end":
                engine.leases.drop(lease_id)
                out.get(tenant, set()).discard(lease_id)
            else:
                continue
        except (PageTrackError, KeyError, TypeError, ValueError) as exc:
            log.error("journal.lease_replay_failed", index=rec.get("i"), reason=str(exc))
            continue
        applied += 1
    return applied
