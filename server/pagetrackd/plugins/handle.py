"""The restricted handle a plugin gets instead of the VM.

It holds the VM privately and offers only what :class:`pagetrackd.plugins.api.Handle`
lists: reads, tracking under the plugin's own owner, findings. Revoked at detach, so a
plugin that kept it can do nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pagetrackd.domain import FailedPrecondition, InvalidArgument, SlotFlags, Vm
from pagetrackd.domain.findings import MAX_GFN, Finding, publish_finding
from pagetrackd.plugins.api import GfnRange

#: most gfns one track or untrack call may name (the VM's own batch bound)
MAX_GFNS_PER_CALL = 1 << 20


class PluginHandle:
    """A plugin's view of one VM (see :class:`pagetrackd.plugins.api.Handle`)."""

    __slots__ = ("_vm", "_plugin", "_owner", "_on_finding")

    def __init__(
        self, vm: Vm, plugin: str, on_finding: Callable[[Finding], None] = lambda f: None
    ) -> None:
        self._vm: Vm | None = vm
        self._plugin = plugin
        self._owner = f"plugin:{plugin}"
        self._on_finding = on_finding

    @property
    def plugin(self) -> str:
        """The plugin's name."""
        return self._plugin

    @property
    def owner(self) -> str:
        """The owner its tracking references are held under."""
        return self._owner

    @property
    def vm_name(self) -> str:
        """The VM's name."""
        return self._live().name

    def revoke(self) -> None:
        """Detach: every later call raises FailedPrecondition."""
        self._vm = None

    def _live(self) -> Vm:
        vm = self._vm
        if vm is None or vm.closed:
            raise FailedPrecondition(f"plugin {self._plugin!r} is detached from its VM")
        return vm

    def read(self, gpa: int, length: int) -> bytes:
        """Guest memory; every byte must be in a memslot."""
        if not 0 < length <= 1 << 20:
            raise InvalidArgument(f"read length {length}: 1..{1 << 20} bytes")
        return self._live().read(gpa, length)

    def memslots(self) -> tuple[GfnRange, ...]:
        """The VM's memslots, ascending."""
        return tuple(
            GfnRange(s.base_gfn, s.npages, bool(s.flags & SlotFlags.READONLY))
            for s in sorted(self._live().memslots(), key=lambda s: s.base_gfn)
        )

    def _gfns(self, first_gfn: int, npages: int) -> np.ndarray[tuple[int], np.dtype[np.int64]]:
        if not 1 <= npages <= MAX_GFNS_PER_CALL or not 0 <= first_gfn <= MAX_GFN:
            raise InvalidArgument(
                f"gfn range {first_gfn}+{npages}: first_gfn 0..{MAX_GFN}, npages"
                f" 1..{MAX_GFNS_PER_CALL}"
            )
        return np.arange(first_gfn, first_gfn + npages, dtype=np.int64)

    def track(self, first_gfn: int, npages: int = 1) -> int:
        """Add one reference per gfn under this plugin's owner, all or none."""
        vm = self._live()
        return vm.track_add(self._gfns(first_gfn, npages), owner=self._owner)

    def untrack(self, first_gfn: int, npages: int = 1) -> int:
        """Drop one of this plugin's references per gfn, all or none."""
        vm = self._live()
        return vm.track_remove(self._gfns(first_gfn, npages), owner=self._owner)

    def tracked(self) -> tuple[int, ...]:
        """The gfns this plugin holds references on, ascending."""
        return tuple(int(g) for g in self._live().tracked_gfns(self._owner).tolist())

    def publish(
        self,
        kind: str,
        first_gfn: int,
        npages: int,
        message: str,
        details: Mapping[str, str] | None = None,
    ) -> Finding:
        """Publish a finding into the VM's event stream; returns it with its seq."""
        vm = self._live()
        finding = publish_finding(
            vm, Finding(self._plugin, kind, first_gfn, npages, message, dict(details or {}))
        )
        self._on_finding(finding)
        return finding


__all__ = ["MAX_GFNS_PER_CALL", "PluginHandle"]
