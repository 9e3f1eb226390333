"""TTL leases in the state directory (``leases.json``): a sealed JSON file (its body's
sha256 beside it) written with every save, read back at start."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pagetrackd.application import Engine
from pagetrackd.domain import PageTrackError, TenantId
from pagetrackd.leases import Lease
from pagetrackd.state.container import FORMAT_VERSION, SnapshotError
from pagetrackd.state.vmfiles import read_regular

__all__ = ["LEASES_FILE", "leases_blob", "load_leases", "seal", "unseal"]

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



def leases_blob(engine: Engine, leases: list[Lease], began_ns: int) -> bytes:
    """The file holding ``leases`` as they stand, for a save that began at ``began_ns``
    (a saved_at_ns after a change means every VM file holds that change)."""
    return seal({
        "saved_at_ns": began_ns,
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


def load_leases(engine: Engine, path: Path) -> dict[str, set[str]]:
    """Adopt the TTL leases saved at ``path`` that have time left; returns tenant -> the
    lease ids adopted. Raises SnapshotError (or OSError) when the file is unusable."""
    out: dict[str, set[str]] = {}
    if not path.exists():
        return out
    try:
        body = unseal(read_regular(path))
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
    return out
