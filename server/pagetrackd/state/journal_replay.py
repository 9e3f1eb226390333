"""The journal applied again at start: every record newer than its VM's saved file, in
order, with the seqs it had (see :mod:`pagetrackd.journal`)."""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import structlog

from pagetrackd.application import Engine, VmEntry
from pagetrackd.domain import PageTrackError, TenantId, VmLimits
from pagetrackd.journal import Journal
from pagetrackd.replay import VM_OPS, decode_value
from pagetrackd.state.restore import restore_snapshot
from pagetrackd.state.snapshot import read_snapshot

log = structlog.get_logger("pagetrackd.journal")

__all__ = ["replay_journal"]


def replay_journal(engine: Engine, journal: Journal, saved: dict[tuple[str, str], int]) -> int:
    """Apply every record newer than the VM's saved file (``saved``: (tenant, vm) -> the
    journal index its file holds). Returns the records applied. A record that cannot be
    applied is logged and skipped with the rest of its VM's records."""
    applied = 0
    broken: set[tuple[str, str]] = set()
    journal.paused = True
    try:
        for rec in journal.read():
            key = (str(rec.get("t")), str(rec.get("vm")))
            if rec["i"] <= saved.get(key, 0) or key in broken:
                continue
            op = rec.get("op")
            if isinstance(op, str) and op.startswith("lease_"):
                continue  # applied before the VM files loaded
            try:
                if op == "create":
                    _create(engine, key, rec)
                elif op == "restore":
                    snap = read_snapshot(base64.b64decode(rec["data"]))
                    restore_snapshot(engine, TenantId(key[0]), snap, name=key[1],
                                     replace=True, saved=True)
                elif op == "delete":
                    engine.delete_vm(TenantId(key[0]), key[1])
                else:
                    _apply(engine, engine.vm(TenantId(key[0]), key[1]), rec)
            except (PageTrackError, KeyError, TypeError, ValueError) as exc:
                broken.add(key)
                log.error("journal.replay_failed", tenant=key[0], vm=key[1], index=rec["i"],
                          op=op, reason=f"{type(exc).__name__}: {exc}")
                continue
            saved[key] = rec["i"]
            applied += 1
    finally:
        journal.paused = False
    return applied


def _create(engine: Engine, key: tuple[str, str], rec: dict[str, Any]) -> None:
    o = decode_value(rec["options"])
    with contextlib.suppress(PageTrackError):
        engine.delete_vm(TenantId(key[0]), key[1])  # one of the same name, deleted later
    engine.create_vm(
        TenantId(key[0]), key[1], vcpus=o["vcpus"], dma_policy=o["dma_policy"],
        semantics=o["semantics"], cost=o["cost"], limits=_limits(o["limits"]),
        history_events=o["history_events"], history_bytes=o["history_bytes"],
        check_quota=False, record=bool(o.get("record", False)),
    )


def _limits(values: dict[str, Any]) -> VmLimits:
    return VmLimits(**values)


def _apply(engine: Engine, entry: VmEntry, rec: dict[str, Any]) -> None:
    """One VM or plugin operation, at the seqs it had."""
    vm = entry.vm
    seq0 = rec.get("seq0")
    if isinstance(seq0, int) and seq0 > vm.seq:
        entry.hub.history.add_lost(vm.seq + 1, seq0)  # taken by something not journaled
        vm.seq = seq0
    op = rec["op"]
    if entry.quota is not None:
        entry.quota.exempt = True  # it was allowed when it happened
    try:
        if op == "plugin_attach":
            engine.attach_plugin(entry, rec["name"], decode_value(rec["options"]))
        elif op == "plugin_call":
            engine.plugin(entry, rec["name"]).call(rec["call"], **decode_value(rec["args"]))
        elif op == "plugin_detach":
            engine.detach_plugin(entry, rec["name"])
        elif op == "close":
            pass  # a delete record follows
        elif op in VM_OPS:
            getattr(vm, op)(**{k: decode_value(v) for k, v in rec["args"].items()})
        else:
            raise ValueError(f"unknown op {op!r}")
    finally:
        if entry.quota is not None:
            entry.quota.exempt = False
    seq = rec.get("seq")
    if isinstance(seq, int) and vm.seq != seq:
        log.warning("journal.seq_differs", vm=entry.name, index=rec["i"], op=op,
                    replayed=vm.seq, journaled=seq)
        if seq > vm.seq:
            vm.seq = seq
