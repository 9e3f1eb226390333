"""Plugin records in a VM snapshot: what is saved of each attached plugin, the checks a
saved record passes before a restore acts on it, and attaching it again."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagetrackd.application import Engine, VmEntry
from pagetrackd.plugins import Plugin, ops
from pagetrackd.plugins.base import Steps, run_all
from pagetrackd.plugins.shadow_mmu import ShadowMmu
from pagetrackd.state.container import SnapshotError

__all__ = ["REBUILD", "check_plugin_records", "plugin_record", "reattach"]


@dataclass(frozen=True, slots=True)
class _Rebuild:
    """How to bring a re-attached plugin back to its saved shape from guest memory,
    for plugins without ``export_state``/``import_state``: what to record, how to replay
    it, and which attach options the replay stands in for."""

    save: Callable[[Plugin], Any]
    replay: Callable[[Plugin, Any], None]
    replaces: frozenset[str]
    #: the replay a step at a time, for a plugin whose rebuild can take long
    steps: Callable[[Plugin, Any], Steps[None]] | None = None
    #: the plugin rebuilds the rest on demand (the shadow MMU refaults its pages, as
    #: KVM's does after a migration), so fewer tracked gfns after the replay is expected
    lazy: bool = False


def _vgpu_steps(plugin: Plugin, ppgtts: Any) -> Steps[None]:
    for mm in sorted(ppgtts, key=lambda m: int(m["ppgtt"])):
        for _ in range(max(1, int(mm.get("refs", 1)))):
            yield from ops.build_ppgtt_steps(plugin, root_gpa=int(mm["root_gpa"]))


def _vgpu_replay(plugin: Plugin, ppgtts: Any) -> None:
    run_all(_vgpu_steps(plugin, ppgtts))


def _vgpu_ppgtts(plugin: Plugin) -> list[dict[str, int]]:
    return [dataclasses.asdict(p) for p in ops.ppgtts(plugin)]


def _shadow_roots(plugin: Plugin) -> list[dict[str, int]]:
    roots = plugin.roots() if isinstance(plugin, ShadowMmu) else []
    return [dataclasses.asdict(r) for r in roots]


def _shadow_replay(plugin: Plugin, roots: Any) -> None:
    for r in roots:
        ops.set_root(plugin, cr3=int(r["cr3"]), vcpu=int(r["vcpu"]))


REBUILD: dict[str, _Rebuild] = {
    "vgpu": _Rebuild(_vgpu_ppgtts, _vgpu_replay, frozenset({"root_gpa"}), steps=_vgpu_steps),
    "shadow_mmu": _Rebuild(
        _shadow_roots, _shadow_replay, frozenset({"root", "cr3", "vcpu"}), lazy=True
    ),
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def plugin_record(kind: str, plugin: Plugin, options: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "kind": kind,
        "options": _jsonable(options),
        "status": _jsonable(plugin.status()),
    }
    export = getattr(plugin, "export_state", None)
    if callable(export):
        rec["state"] = _jsonable(export())
    elif kind in REBUILD:
        rec["rebuild"] = _jsonable(REBUILD[kind].save(plugin))
    return rec


#: JSON nesting a plugin record may have (its options, state and rebuild records)
_MAX_RECORD_DEPTH = 32
#: how often one saved PPGTT may be built again at restore (its reference count)
_MAX_PPGTT_REFS = 4096


def _depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests, counting no further than ``limit`` + 1."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _int_field(rec: Any, key: str, where: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    value = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SnapshotError(f"snapshot header: {where}.{key} must be an integer {lo}..{hi}")
    return value


def check_plugin_records(records: Any) -> None:
    """Raise SnapshotError for a plugin record the restore could not act on."""
    if records is None:
        return
    if not isinstance(records, list):
        raise SnapshotError("snapshot header: plugins is not a list")
    for i, rec in enumerate(records):
        where = f"plugins[{i}]"
        if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
            raise SnapshotError(f"snapshot header: {where} has no plugin kind")
        if not isinstance(rec.get("options", {}), dict):
            raise SnapshotError(f"snapshot header: {where}.options is not an object")
        if _depth(rec, _MAX_RECORD_DEPTH) > _MAX_RECORD_DEPTH:
            raise SnapshotError(f"snapshot header: {where} nests too deeply")
        if "state" in rec and not isinstance(rec["state"], dict):
            raise SnapshotError(f"snapshot header: {where}.state is not an object")
        rebuild = rec.get("rebuild")
        if rebuild is None or "state" in rec:
            continue
        if not isinstance(rebuild, list):
            raise SnapshotError(f"snapshot header: {where}.rebuild is not a list")
        for j, r in enumerate(rebuild):
            at = f"{where}.rebuild[{j}]"
            if rec["kind"] == "vgpu":
                _int_field(r, "root_gpa", at)
                _int_field(r, "ppgtt", at)
                if "refs" in r:
                    _int_field(r, "refs", at, 1, _MAX_PPGTT_REFS)
            elif rec["kind"] == "shadow_mmu":
                _int_field(r, "cr3", at)
                _int_field(r, "vcpu", at, 0, 4095)


def reattach(
    engine: Engine, entry: VmEntry, rec: dict[str, Any], *, stepped: bool = False
) -> Steps[None] | None:
    """Attach a saved plugin again and let it rebuild its shadow from guest memory.
    With ``stepped``, a rebuild that can run in steps is returned for the caller to run
    (None: the plugin is done)."""
    kind = str(rec.get("kind", ""))
    options = dict(rec.get("options") or {})
    rebuild = REBUILD.get(kind) if "state" not in rec else None
    if rebuild is not None and "rebuild" in rec:
        attach_opts = {k: v for k, v in options.items() if k not in rebuild.replaces}
    else:
        attach_opts = options
    plugin = engine.attach_plugin(entry, kind, attach_opts)
    entry.plugin_options[kind] = options
    if "state" in rec:
        load = getattr(plugin, "import_state", None)
        if callable(load):
            load(rec["state"])
    elif rebuild is not None and "rebuild" in rec:
        if stepped and rebuild.steps is not None:
            return rebuild.steps(plugin, rec["rebuild"])
        rebuild.replay(plugin, rec["rebuild"])
    return None


# ---------------------------------------------------------------------- one VM


