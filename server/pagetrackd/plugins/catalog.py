"""Which plugins a tenant may attach, by name: the built-ins and installed entry points.

The built-in plugins are always allowed. A third-party plugin is an entry point in the
group ``pagetrackd.plugins`` (its name is the plugin's name, its object a class or
function returning a :class:`pagetrackd.plugins.api.Plugin`); tenants may attach it
only when the operator lists its name in ``plugins_allow``. Entry points are looked
up and loaded at attach time, so a broken one refuses that attach and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import structlog

from pagetrackd.domain import FailedPrecondition, InvalidArgument, PermissionDenied, PluginNotFound
from pagetrackd.limits import DEFAULT_PLUGIN_FAILURE_LIMIT
from pagetrackd.plugins import PLUGINS
from pagetrackd.plugins import Plugin as BuiltinPlugin
from pagetrackd.plugins.api import ENTRY_POINT_GROUP, Plugin
from pagetrackd.plugins.host import HostedPlugin

log = structlog.get_logger("pagetrackd.plugins")

#: the API spells built-in names with a dash; both spellings name the built-in
_ALIASES = {name.replace("_", "-"): name for name in PLUGINS}
#: what a plugin name may look like (it becomes the owner ``plugin:<name>``)
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def canonical_name(name: str) -> str:
    """The name a plugin is kept under: built-ins as ``shadow_mmu``/``vgpu``."""
    return _ALIASES.get(name, name)


class Catalog:
    """Makes plugins by name, within the operator's allow-list.

    ``on_detached`` is given to every third-party plugin made: the host calls it when
    it detached the plugin after ``failure_limit`` failed hooks.
    """

    def __init__(
        self,
        allow: Iterable[str] = (),
        failure_limit: int = DEFAULT_PLUGIN_FAILURE_LIMIT,
        *,
        lookup: Callable[[str], EntryPoint | None] | None = None,
    ) -> None:
        if failure_limit < 1:
            raise InvalidArgument(f"plugin_failure_limit {failure_limit} must be >= 1")
        self.allow = frozenset(canonical_name(n) for n in allow)
        self.failure_limit = failure_limit
        self.on_detached: Callable[[HostedPlugin], None] | None = None
        self._lookup = lookup or _entry_point

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is a built-in plugin."""
        return canonical_name(name) in PLUGINS

    def make(self, name: str) -> BuiltinPlugin:
        """A fresh, unattached plugin. Raises InvalidArgument for a malformed name,
        PermissionDenied for one the operator did not allow, PluginNotFound when no
        such plugin is installed and FailedPrecondition when it cannot be loaded."""
        name = canonical_name(name)
        factory = PLUGINS.get(name)
        if factory is not None:
            return factory()
        if not NAME_RE.fullmatch(name):
            raise InvalidArgument(
                f"plugin name {name[:80]!r}: 1..63 of a-z 0-9 . _ -, starting with a letter"
                " or digit", field="name",
            )
        if name not in self.allow:
            raise PermissionDenied(
                f"plugin {name!r} is not allowed on this daemon: the operator must list it"
                " in plugins_allow (built-ins are always allowed:"
                f" {', '.join(sorted(_ALIASES))})"
            )
        ep = self._lookup(name)
        if ep is None:
            raise PluginNotFound(
                f"plugin {name!r} is allowed but not installed: no entry point named"
                f" {name!r} in group {ENTRY_POINT_GROUP!r}", name=name,
            )
        impl = _load(name, ep)
        return HostedPlugin(
            name, impl, failure_limit=self.failure_limit, on_detached=self.on_detached
        )


def _entry_point(name: str) -> EntryPoint | None:
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    return next(iter(found), None)


def _load(name: str, ep: EntryPoint) -> Plugin:
    """Load an entry point and make the plugin; any failure is FailedPrecondition."""
    try:
        factory: Any = ep.load()
        impl = factory()
    except Exception as exc:
        log.warning("plugin.load_failed", plugin=name, entry_point=ep.value, exc_info=True)
        raise FailedPrecondition(
            f"plugin {name!r} ({ep.value}) cannot be loaded: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(impl, Plugin):
        raise FailedPrecondition(
            f"plugin {name!r} ({ep.value}) does not implement the plugin interface"
            " (pagetrackd.plugins.api.Plugin)"
        )
    return impl


__all__ = ["NAME_RE", "Catalog", "canonical_name"]
