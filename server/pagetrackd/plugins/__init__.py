"""In-process plugins, by name. Each entry makes a fresh, unattached plugin."""

from __future__ import annotations

from collections.abc import Callable

from pagetrackd.plugins.base import AuditReport, Mismatch, Plugin

#: name -> factory; filled in by the plugin modules below.
PLUGINS: dict[str, Callable[[], Plugin]] = {}

__all__ = ["PLUGINS", "AuditReport", "Mismatch", "Plugin"]

from pagetrackd.plugins.vgpu import Vgpu  # noqa: E402  (registers after PLUGINS exists)

PLUGINS["vgpu"] = Vgpu

from pagetrackd.plugins.shadow_mmu import ShadowMmu  # noqa: E402

PLUGINS["shadow_mmu"] = ShadowMmu
