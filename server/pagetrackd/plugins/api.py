"""The typed plugin interface: what a plugin implements and what it is told.

A plugin is attached to one VM and gets a :class:`Handle` (never the VM): it reads
guest memory, adds and removes tracking under its own owner (``plugin:<name>``) and
publishes findings. The daemon calls its hooks synchronously on the write path, after
the write landed, as KVM calls a ``kvm_page_track_notifier_node``
(``arch/x86/kvm/mmu/page_track.c`` ``__kvm_page_track_write``): newest attached first,
the shadow MMU after every other plugin (R4.8). See docs/plugins.md for the contract.

Third-party plugins register a factory (a class or a function returning a
:class:`Plugin`) under the entry-point group :data:`ENTRY_POINT_GROUP`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pagetrackd.domain.findings import Finding
from pagetrackd.plugins.base import AuditReport, Mismatch

#: the entry-point group third-party plugins register under
ENTRY_POINT_GROUP = "pagetrackd.plugins"

#: an attach option's value: options arrive as text and numbers become int or float
OptionValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class WritePiece:
    """One emulated write piece (never crosses a page): ``data`` is already in guest
    memory. ``dma`` marks a device write delivered under ``dma_policy=notify``;
    ``untracked``: the page was not write-tracked (a piece of an emulated write that
    crossed into an untracked page; KVM notifies those too, arch/x86/kvm/x86.c)."""

    seq: int
    vcpu: int
    gpa: int
    data: bytes
    dma: bool = False
    untracked: bool = False

    @property
    def gfn(self) -> int:
        """The written frame."""
        return self.gpa >> 12

    @property
    def offset(self) -> int:
        """Where in its page the write starts."""
        return self.gpa & 0xFFF


@dataclass(frozen=True, slots=True)
class RegionRemoved:
    """The gfns ``[base_gfn, base_gfn + npages)`` are gone (memslot deleted or moved):
    forget state there; the daemon has already dropped the tracking there."""

    base_gfn: int
    npages: int


@dataclass(frozen=True, slots=True)
class TrackingStarted:
    """Some user's add took these gfns' track counters from 0 to 1 (R3.1: KVM write-
    protects every mapping of a gfn then, ``kvm_mmu_slot_gfn_write_protect``)."""

    gfns: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Status:
    """A plugin's counters (non-negative integers) and facts (text), for the API,
    ``pagetrack plugin status`` and the metrics."""

    counters: Mapping[str, int] = field(default_factory=dict)
    info: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GfnRange:
    """``npages`` frames from ``base_gfn``; ``readonly`` for a READONLY memslot."""

    base_gfn: int
    npages: int
    readonly: bool = False


class Handle(Protocol):
    """What a plugin may do to its VM. Every call raises a domain error (a
    ``PageTrackError``) on bad input and changes nothing then; after detach, every
    call raises FailedPrecondition."""

    @property
    def plugin(self) -> str:
        """The plugin's name."""

    @property
    def owner(self) -> str:
        """The owner its tracking references are held under: ``plugin:<name>``."""

    @property
    def vm_name(self) -> str:
        """The VM's name (for messages)."""

    def read(self, gpa: int, length: int) -> bytes:
        """Guest memory; every byte must be in a memslot."""

    def memslots(self) -> tuple[GfnRange, ...]:
        """The VM's memslots, ascending."""

    def track(self, first_gfn: int, npages: int = 1) -> int:
        """Add one reference per gfn under this plugin's owner, all or none; returns
        the gfns that became tracked."""

    def untrack(self, first_gfn: int, npages: int = 1) -> int:
        """Drop one of this plugin's references per gfn, all or none (another owner's
        references are never touched: NotTracked); returns gfns that became untracked."""

    def tracked(self) -> tuple[int, ...]:
        """The gfns this plugin holds references on, ascending."""

    def publish(
        self,
        kind: str,
        first_gfn: int,
        npages: int,
        message: str,
        details: Mapping[str, str] | None = None,
    ) -> Finding:
        """Publish a finding into the VM's event stream; returns it with its seq."""


@runtime_checkable
class Plugin(Protocol):
    """What a plugin implements. Subclass :class:`BasePlugin` to get do-nothing hooks."""

    def attach(self, handle: Handle, options: Mapping[str, OptionValue]) -> None:
        """Start: keep the handle, check the options (raise InvalidArgument naming a bad
        one; the attach is refused and nothing stays), take initial tracking."""

    def on_write(self, piece: WritePiece) -> None:
        """An emulated write landed (synchronous, on the write path: keep it short)."""

    def on_region_removed(self, region: RegionRemoved) -> None:
        """A gfn range is gone."""

    def on_tracking_started(self, change: TrackingStarted) -> None:
        """Some user started tracking these gfns."""

    def status(self) -> Status:
        """Counters and facts."""

    def detach(self) -> None:
        """Stop (the daemon releases the plugin's tracking after this returns)."""


class BasePlugin:
    """A plugin with do-nothing hooks; override what you need. ``self.handle`` is set
    by :meth:`attach`."""

    handle: Handle

    def attach(self, handle: Handle, options: Mapping[str, OptionValue]) -> None:
        """Keep the handle."""
        self.handle = handle

    def on_write(self, piece: WritePiece) -> None:
        """Nothing."""

    def on_region_removed(self, region: RegionRemoved) -> None:
        """Nothing."""

    def on_tracking_started(self, change: TrackingStarted) -> None:
        """Nothing."""

    def status(self) -> Status:
        """No counters."""
        return Status()

    def detach(self) -> None:
        """Nothing."""


__all__ = [
    "ENTRY_POINT_GROUP",
    "AuditReport",
    "BasePlugin",
    "Finding",
    "GfnRange",
    "Handle",
    "Mismatch",
    "OptionValue",
    "Plugin",
    "RegionRemoved",
    "Status",
    "TrackingStarted",
    "WritePiece",
]
