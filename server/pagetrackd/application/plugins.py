"""Plugins on VMs: attach by name (built-in or allowed third-party), look up, detach."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from pagetrackd.application.entries import VmEntry
from pagetrackd.application.tenancy import Tenancy
from pagetrackd.domain import PluginAlreadyAttached, PluginNotFound, TenantId
from pagetrackd.plugins import PLUGINS, Plugin
from pagetrackd.plugins.budget import StateBudget, StateMeter
from pagetrackd.plugins.catalog import canonical_name
from pagetrackd.plugins.host import HostedPlugin

log = structlog.get_logger("pagetrackd.engine")


class Plugins(Tenancy):
    """The plugins attached to each VM (``VmEntry.plugins``), by canonical name."""

    def attach_plugin(
        self, entry: VmEntry, kind: str, options: Mapping[str, Any]
    ) -> Plugin:
        """Attach a plugin by name to a VM: a built-in, or a third-party plugin the
        operator allowed (see :class:`~pagetrackd.plugins.catalog.Catalog`)."""
        self.check_serving()
        kind = canonical_name(kind)
        if kind in entry.plugins:
            raise PluginAlreadyAttached(
                f"plugin {kind!r} is already attached to VM {entry.name!r}"
            )
        plugin = self.plugin_catalog.make(kind)
        self._meter(entry, plugin)  # before attach: attaching at a root shadows it
        plugin.attach(entry.vm, **options)
        entry.plugins[kind] = plugin
        entry.plugin_options[kind] = dict(options)
        return plugin

    def _plugin_detached(self, plugin: HostedPlugin) -> None:
        """A third-party plugin failed too often and detached itself: forget it."""
        self.plugin_failure_detaches[plugin.name] = (
            self.plugin_failure_detaches.get(plugin.name, 0) + 1
        )
        for entry in self.entries.values():
            if entry.plugins.get(plugin.name) is plugin:
                del entry.plugins[plugin.name]
                entry.plugin_options.pop(plugin.name, None)

    def _adopt_plugins(self, entry: VmEntry) -> None:
        """Take plugins that something other than :meth:`attach_plugin` registered on the
        VM (a workload's setup attaching the vGPU or the shadow MMU) into
        ``entry.plugins``, so the API lists, audits and detaches them like any other."""
        kinds: dict[object, str] = {factory: kind for kind, factory in PLUGINS.items()}
        for node in entry.vm.notifiers.nodes():
            kind = kinds.get(type(node.notifier))
            if kind is None or kind in entry.plugins:
                continue
            plugin: Plugin = node.notifier  # type: ignore[assignment]
            entry.plugins[kind] = plugin
            self._meter(entry, plugin)
            options = getattr(plugin, "attach_options", None)
            entry.plugin_options[kind] = dict(options()) if callable(options) else {}
            log.info("plugin.adopted", tenant=entry.tenant, vm=entry.name, plugin=kind)

    def plugin_budget(self, tenant: TenantId) -> StateBudget:
        """Bytes the tenant's built-in plugins' state holds, against its
        plugin_state_bytes quota (see plugins/budget.py)."""
        budget = self._plugin_budgets.get(tenant)
        if budget is None:
            budget = self._plugin_budgets[tenant] = StateBudget(
                lambda: self.quotas(tenant).plugin_state_bytes
            )
        return budget

    def _meter(self, entry: VmEntry, plugin: Plugin) -> None:
        """Charge a built-in plugin's state to its tenant (third-party plugins keep
        their own memory: the daemon cannot see it)."""
        meter = getattr(plugin, "state_meter", None)
        if isinstance(meter, StateMeter):
            guard = entry.quota
            meter.join(
                self.plugin_budget(entry.tenant),
                lambda: guard is not None and guard.exempt,
            )

    def plugin(self, entry: VmEntry, kind: str) -> Plugin:
        """An attached plugin."""
        kind = canonical_name(kind)
        plugin = entry.plugins.get(kind)
        if plugin is None:
            raise PluginNotFound(
                f"plugin {kind!r} is not attached to VM {entry.name!r}", name=kind
            )
        return plugin

    def detach_plugin(self, entry: VmEntry, kind: str) -> int:
        """Detach a plugin; returns the tracking references it released."""
        kind = canonical_name(kind)
        plugin = self.plugin(entry, kind)
        refs = entry.vm.owner_references(f"plugin:{kind}")
        plugin.detach()
        del entry.plugins[kind]
        entry.plugin_options.pop(kind, None)
        return refs
