"""Plugin use cases: status views, audits, and the built-in plugins' own operations
(shadow MMU roots and translations, vGPU PPGTTs), each with a typed result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from pagetrackd.application.slices import run_steps
from pagetrackd.domain import InvalidArgument, TenantId
from pagetrackd.plugins import Plugin, ops
from pagetrackd.plugins.base import AuditReport

if TYPE_CHECKING:
    from pagetrackd.application.engine import Engine
    from pagetrackd.application.entries import VmEntry

#: the metrics module's logger: a failing status is a scrape's problem
log = structlog.get_logger("pagetrackd.metrics")


@dataclass(frozen=True, slots=True)
class PluginView:
    """An attached plugin: its status split into counters (whole numbers >= 0) and
    other values (as text)."""

    name: str  #: canonical name
    tracked_gfns: int  #: gfns it holds references on
    counters: dict[str, int] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        """Hooks that raised (third-party plugins)."""
        return self.counters.get("hook_failures", 0)

    @property
    def findings(self) -> int:
        """Findings it published."""
        return self.counters.get("findings", 0)


@dataclass(frozen=True, slots=True)
class PpgttBuild:
    """A PPGTT the vGPU shadows now."""

    ppgtt: int
    tables: int
    scratch_entries: int
    violations: int


@dataclass(frozen=True, slots=True)
class VgpuSubmit:
    """A submission: entries flushed, and each asked address translated."""

    flushed: int
    gpa: list[int]
    scratch: list[bool]


def plugin_view(name: str, plugin: Plugin, entry: VmEntry) -> PluginView:
    """The plugin's status now."""
    counters: dict[str, int] = {}
    info: dict[str, str] = {}
    for key, value in plugin.status().items():
        if isinstance(value, bool):
            info[key] = str(value).lower()
        elif isinstance(value, int) and value >= 0:
            counters[key] = value
        else:
            info[key] = str(value)
    tracked = len(entry.vm.tracked_gfns(f"plugin:{name}"))
    return PluginView(name, tracked, counters, info)


def plugin_views(engine: Engine, tenant: TenantId, vm: str) -> list[PluginView]:
    """Every plugin attached to the VM."""
    entry = engine.vm(tenant, vm)
    return [plugin_view(k, p, entry) for k, p in entry.plugins.items()]


async def attach(
    engine: Engine, tenant: TenantId, vm: str, name: str, options: dict[str, object]
) -> PluginView:
    """Attach a plugin by canonical name. A vGPU attached at a root shadows that PPGTT
    a table at a time (see :func:`build_ppgtt`); if that fails, the vGPU is detached
    again, so the call changes nothing."""
    entry = engine.vm(tenant, vm)
    root_gpa = options.get("root_gpa") if name == "vgpu" else None
    if root_gpa is None:
        plugin = engine.attach_plugin(entry, name, options)
        return plugin_view(name, plugin, entry)
    plugin = engine.attach_plugin(
        entry, name, {k: v for k, v in options.items() if k != "root_gpa"})
    try:
        if not isinstance(root_gpa, int):
            raise InvalidArgument(f"root_gpa must be an integer, got {root_gpa!r}")
        await run_steps(ops.build_ppgtt_steps(plugin, root_gpa=root_gpa))
    except BaseException:
        engine.detach_plugin(entry, name)
        raise
    entry.plugin_options[name] = dict(options)
    return plugin_view(name, plugin, entry)


def _plugin(engine: Engine, tenant: TenantId, vm: str, name: str) -> tuple[VmEntry, Plugin]:
    entry = engine.vm(tenant, vm)
    return entry, engine.plugin(entry, name)


def audit(engine: Engine, tenant: TenantId, vm: str, name: str) -> AuditReport:
    """Compare the plugin's shadow with the guest's tables."""
    return _plugin(engine, tenant, vm, name)[1].audit()


def set_shadow_root(
    engine: Engine, tenant: TenantId, vm: str, cr3: int, vcpu: int
) -> ops.RootSet:
    """Load a guest CR3 into the shadow MMU."""
    return ops.set_root(_plugin(engine, tenant, vm, "shadow_mmu")[1], cr3=cr3, vcpu=vcpu)


def translate_shadow(
    engine: Engine, tenant: TenantId, vm: str, gva: int, write: bool, vcpu: int
) -> ops.Translation:
    """Walk the shadow tables for a guest virtual address."""
    plugin = _plugin(engine, tenant, vm, "shadow_mmu")[1]
    return ops.translate(plugin, gva=gva, write=write, vcpu=vcpu)


async def build_ppgtt(
    engine: Engine, tenant: TenantId, vm: str, root_gpa: int | None
) -> PpgttBuild:
    """Shadow a guest PPGTT in the vGPU, a table at a time: a tree of thousands of
    tables does not hold the event loop (the VM's lock keeps its other calls out)."""
    plugin = _plugin(engine, tenant, vm, "vgpu")[1]
    built = await run_steps(ops.build_ppgtt_steps(plugin, root_gpa=root_gpa))
    status = plugin.status()
    return PpgttBuild(
        built.ppgtt, built.tables, int(status.get("pending", 0)),
        int(status.get("violations", 0)),
    )


async def submit_vgpu(
    engine: Engine, tenant: TenantId, vm: str, ppgtt: int, gpu_addrs: list[int]
) -> VgpuSubmit:
    """Submit work on a PPGTT and translate the given GPU addresses. The flush before
    it may shadow new tables; it runs a table at a time, as :func:`build_ppgtt`."""
    plugin = _plugin(engine, tenant, vm, "vgpu")[1]
    done = await run_steps(ops.submit_steps(plugin, ppgtt=ppgtt))
    gpa, scratch = [], []
    for va in gpu_addrs:
        t = ops.gpu_translate(plugin, va=va, ppgtt=ppgtt)
        gpa.append(t.gpa(va))
        scratch.append(t.scratch)
    return VgpuSubmit(done.flushed, gpa, scratch)


def destroy_ppgtt(engine: Engine, tenant: TenantId, vm: str, ppgtt: int) -> int:
    """Stop shadowing a PPGTT; returns the tracking references released."""
    entry, plugin = _plugin(engine, tenant, vm, "vgpu")
    before = len(entry.vm.tracked_gfns("plugin:vgpu"))
    ops.destroy_ppgtt(plugin, ppgtt=ppgtt)
    return before - len(entry.vm.tracked_gfns("plugin:vgpu"))


@dataclass(frozen=True, slots=True)
class PluginMetrics:
    """An attached plugin's figures for metrics: its status' numbers (booleans as 0/1)."""

    name: str
    tracked_gfns: int
    numbers: dict[str, float]


def plugin_metrics(entry: VmEntry) -> list[PluginMetrics]:
    """Every attached plugin's figures. A plugin whose status raises is logged and
    reported without numbers: a plugin bug must not break a scrape."""
    out = []
    for name, plugin in entry.plugins.items():
        tracked = int(entry.vm.tracked_gfns(f"plugin:{name}").size)
        numbers: dict[str, float] = {}
        try:
            status = plugin.status()
        except Exception:
            log.exception("metrics.plugin_status_failed", plugin=name)
        else:
            for k, v in status.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    numbers[k] = v
                elif isinstance(v, bool):
                    numbers[k] = int(v)
        out.append(PluginMetrics(name, tracked, numbers))
    return out
