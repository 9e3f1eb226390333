"""The plugin protocol: in-process consumers of track-write events, like KVM's own.

A plugin is attached to one VM. It registers itself as a notifier, so its
``track_write`` runs synchronously on the write path, right after the write landed
(as ``kvm_mmu_track_write`` and ``kvmgt_page_track_write`` do). It holds tracking
references under its own owner name, ``plugin:<name>``.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, TypeVar, runtime_checkable

from pagetrackd.domain import Vm, WriteEvent

T = TypeVar("T")

#: An operation done a step at a time: a generator that yields between two steps (each
#: about one table's work) and returns the result. The daemon lets other requests run
#: between steps; :func:`run_all` does it in one go.
Steps: TypeAlias = Generator[None, None, T]


def run_all(steps: Steps[T]) -> T:
    """Every step of ``steps``, then its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One shadow entry that disagrees with a fresh walk of guest memory."""

    address: int  #: the guest address the entry translates (gva for the MMU, GPU va for PPGTT)
    level: int  #: page-table level of the entry (1 = leaf)
    shadow: int  #: what the shadow holds
    guest: int  #: what guest memory says now
    reason: str = ""
    table: str = ""  #: table family: "shadow" (shadow MMU) or "ppgtt" (vGPU)
    table_gfn: int = 0  #: gfn of the guest table page holding the entry
    index: int = 0  #: entry index within that table, 0..511
    expected: int | None = None  #: what the shadow entry should be; None if unknown


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The result of comparing every shadow entry with guest memory."""

    checked: int
    mismatches: tuple[Mismatch, ...] = field(default_factory=tuple)

    @property
    def clean(self) -> bool:
        """True when no entry is stale."""
        return not self.mismatches


class Plugin(Protocol):
    """What every plugin offers. ``call`` carries the plugin's own operations (for
    example ``set_root`` or ``build_ppgtt``) with plain keyword arguments, so the
    transport needs no plugin-specific code to reach them."""

    name: str
    external: bool

    def attach(self, vm: Vm, **options: Any) -> None:
        """Start consuming this VM's writes (register as a notifier)."""

    def detach(self) -> None:
        """Stop: unregister, drop this plugin's tracking references and shadow state."""

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        """A tracked write landed (synchronous, on the write path)."""

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        """A gfn range is gone: forget shadow state there, do not untrack it."""

    def status(self) -> dict[str, int | str]:
        """Counters and state, flat, for the API and metrics."""

    def audit(self) -> AuditReport:
        """Compare every shadow entry with a fresh walk of guest memory."""

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Run a plugin-specific operation; raise InvalidArgument for an unknown ``op``."""


@runtime_checkable
class SteppedCalls(Protocol):
    """A plugin whose long operations (shadowing a whole table tree) can run a step at a
    time: ``call_steps(op, **args)`` is ``call`` as :data:`Steps`."""

    def call_steps(self, op: str, **args: Any) -> Steps[dict[str, Any]]:
        """``call`` a step at a time."""
        ...
