"""The snapshot format as the application sees it: a port that the state package fills.

SnapshotVm and RestoreVm are use cases of the application, but a snapshot's bytes and
loading one into a VM belong to :mod:`pagetrackd.state`, which itself works on the
engine. So the application holds the format through this protocol, set on the engine
as ``engine.snapshots`` by the daemon (:class:`pagetrackd.app.Daemon`), and imports
nothing of the state package.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from pagetrackd.domain import PageTrackError, TenantId, Vm
from pagetrackd.domain.snapshot import VmState

if TYPE_CHECKING:
    from pagetrackd.application.engine import Engine
    from pagetrackd.application.entries import VmEntry


@dataclass(eq=False)
class PendingRebuild:
    """A restored plugin whose shadow is still to be rebuilt from guest memory, a step
    at a time (see :func:`pagetrackd.application.slices.run_steps`)."""

    plugin: str
    steps: Generator[object, None, None]
    #: called when the steps have all run
    done: Callable[[], None]
    #: called when a step raised: the plugin is detached and the failure logged
    failed: Callable[[PageTrackError], None]


class Loaded(Protocol):
    """Snapshot bytes decoded and checked."""

    @property
    def state(self) -> VmState:
        """The VM's state: its name, memslots, tracking, seq."""
        ...


S = TypeVar("S", bound=Loaded)


class SnapshotFormat(Protocol[S]):
    """Encoding a VM as snapshot bytes, and bytes back into a VM."""

    @property
    def version(self) -> int:
        """The format version written."""
        ...

    def encode(self, engine: Engine, entry: VmEntry, include_memory: bool) -> bytes:
        """The VM's snapshot (guest memory only when asked)."""
        ...

    def declared_length(self, head: bytes) -> int | None:
        """The whole length the first bytes of a snapshot declare (None: not told yet);
        raises InvalidArgument when they are not a snapshot's."""
        ...

    def decode(self, raw: bytes) -> S:
        """The snapshot in ``raw``, checked (may run in a worker thread)."""
        ...

    def prepare(self, snap: S, name: str) -> Vm:
        """The VM of ``snap``, loaded outside the registry (may run in a worker thread)."""
        ...

    def restore(
        self, engine: Engine, tenant: TenantId, snap: S, *, name: str, replace: bool,
        prepared: Vm, later: list[PendingRebuild],
    ) -> VmEntry:
        """Register ``prepared`` as the tenant's VM ``name`` with the rest of ``snap``
        (history, plugins); a plugin shadow that is rebuilt in steps is added to
        ``later`` instead, for the caller to run."""
        ...


__all__ = ["Loaded", "PendingRebuild", "SnapshotFormat"]
