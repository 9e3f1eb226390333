"""Notifiers: who is told of every emulated write, as ``kvm_page_track_notifier_node``.

KVM calls a VM's notifiers synchronously on the vCPU's write path, newest registered
first (registration inserts at the list head; ``arch/x86/kvm/mmu/page_track.c``), and
the shadow MMU after all of them, whenever it was attached (R4.8: since 6.6
``kvm_page_track_write`` calls ``kvm_mmu_track_write`` directly after walking the list;
before, the MMU's node was registered at VM creation and so came last). Here the
internal nodes (``external = False``: the shadow MMU) are called after the external ones.

pagetrack adds batch notifiers (the event history and Watch streams), which only queue
what they are told. Each event reaches them before the per-event notifiers (the plugins)
react to it, so they see every event in seq order even when a plugin's reaction makes
events of its own (a DMA under dma_policy=notify), and a plugin that (un)registers a
stream from its callback changes what the stream gets from the next event on.
Unregistering waits for in-flight callbacks (``synchronize_srcu``); here everything
runs on one thread, so once :meth:`NotifierList.unregister` returns the node is never
called again, even by a dispatch that is already walking the list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import structlog

from pagetrackd.domain.events import EventBatch, WriteEvent, guest_event

if TYPE_CHECKING:
    from pagetrackd.domain.vm import Vm

log = structlog.get_logger("pagetrackd.notifiers")


class Notifier(Protocol):
    """What a VM calls. ``external`` is true for users outside the MMU (KVMGT, streams):
    linux-6.6 semantics refuse a memslot MOVE while one is registered."""

    name: str
    external: bool

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        """An emulated write landed; ``event.data`` is already in guest memory."""

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        """The gfns ``[base_gfn, base_gfn + npages)`` are gone (slot deleted or moved):
        forget per-gfn state there and do not remove tracking for them afterwards."""


@runtime_checkable
class BatchNotifier(Protocol):
    """A notifier that may receive the events of a batched write all at once, after
    the whole batch has been applied. Only for notifiers that do not read guest
    memory when told (remote streams): they see the same events in the same order."""

    def track_write_batch(self, vm: Vm, batch: EventBatch) -> None:
        """The emulated writes of one batch, in seq order."""


class GuestWriteNotifier(Protocol):
    """A per-event notifier that can also be told of a guest write without an event
    object: ``track_guest_write(vm, seq, vcpu, gpa, data)`` must do exactly what
    ``track_write(vm, WriteEvent(seq, vcpu, gpa, data))`` does. Batched writes call it
    when every per-event node offers it (building the event is a large share of a
    plugin's cost per write)."""

    def track_guest_write(self, vm: Vm, seq: int, vcpu: int, gpa: int, data: bytes) -> None:
        """A guest (source GUEST) write landed; ``data`` is already in guest memory."""


@runtime_checkable
class ClosingNotifier(Protocol):
    """A notifier that wants to know when its VM is deleted (after the regions are gone)."""

    def vm_closed(self, vm: Vm) -> None:
        """The VM is being deleted; the notifier has been unregistered."""


@dataclass(slots=True, eq=False)
class NotifierNode:
    """A registration: the notifier, its id and its error count."""

    node_id: int
    notifier: Notifier
    batch: bool
    active: bool = True
    errors: int = 0
    calls: int = 0


class NotifierList:
    """A VM's notifiers, newest first."""

    __slots__ = ("_nodes", "_next_id", "sync", "batch", "errors", "flush")

    def __init__(self) -> None:
        self._nodes: list[NotifierNode] = []
        self._next_id = 1
        self.sync: tuple[NotifierNode, ...] = ()  #: nodes called once per event
        self.batch: tuple[NotifierNode, ...] = ()  #: nodes that take batches
        self.errors = 0
        #: Set while a batched write holds events back for the batch nodes: gives them
        #: those events. Called before anything else reaches batch nodes (a single event,
        #: a region record) and before registrations change, so batch nodes see every
        #: event in seq order and exactly the events of their registered time, as with
        #: one-by-one writes.
        self.flush: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._nodes)

    def nodes(self) -> tuple[NotifierNode, ...]:
        """Registered nodes, newest first."""
        return tuple(self._nodes)

    @property
    def has_external(self) -> bool:
        """KVM's ``kvm_page_track_has_external_user`` (the fixed, non-inverted one)."""
        return any(n.notifier.external for n in self._nodes)

    def register(self, notifier: Notifier) -> NotifierNode:
        """Register at the head of the list; returns the node (its id names it)."""
        if self.flush is not None:
            self.flush()
        node = NotifierNode(self._next_id, notifier, isinstance(notifier, BatchNotifier))
        self._next_id += 1
        # A new list, never an in-place change: a dispatch walking the old list must
        # neither call a node twice nor skip one (R5.3).
        self._nodes = [node, *self._nodes]
        self._refresh()
        return node

    def unregister(self, node: NotifierNode) -> bool:
        """Remove a node; false if it was not registered. It is never called again."""
        if not node.active:
            return False
        if self.flush is not None:
            self.flush()
        node.active = False
        self._nodes = [n for n in self._nodes if n is not node]
        self._refresh()
        return True

    def _refresh(self) -> None:
        # External per-event nodes newest first, then the internal ones (the shadow MMU,
        # R4.8, arch/x86/kvm/mmu/page_track.h kvm_page_track_write).
        self.sync = tuple(n for n in self._nodes if not n.batch and n.notifier.external) + tuple(
            n for n in self._nodes if not n.batch and not n.notifier.external
        )
        self.batch = tuple(n for n in self._nodes if n.batch)

    def _failed(self, node: NotifierNode, vm: Vm, hook: str) -> None:
        # Every notifier hook is called from this module, so this is the one place a
        # raising notifier is counted and logged.
        node.errors += 1
        self.errors += 1
        log.exception(
            "notifier.failed", vm=vm.name, notifier=node.notifier.name, node=node.node_id,
            hook=hook,
        )

    def _tell(self, nodes: Sequence[NotifierNode], vm: Vm, event: WriteEvent) -> int:
        # Register and unregister replace the lists, so iterating one is safe even when a
        # callback changes the registrations; unregistered nodes are skipped (R5.2).
        calls = 0
        for node in nodes:
            if not node.active:
                continue
            calls += 1
            node.calls += 1
            try:
                node.notifier.track_write(vm, event)
            except Exception:
                self._failed(node, vm, "track_write")
        return calls

    def dispatch_write(self, vm: Vm, event: WriteEvent) -> int:
        """Tell every node of one event, the batch nodes first (see the module
        docstring), then the per-event ones: external newest first, then internal
        (the shadow MMU); returns the calls made."""
        if self.flush is not None:
            self.flush()
        return self._tell(self.batch, vm, event) + self._tell(self.sync, vm, event)

    def dispatch_sync(self, vm: Vm, event: WriteEvent) -> int:
        """Tell only the per-event nodes of one event (batch nodes are told later)."""
        return self._tell(self.sync, vm, event)

    def dispatch_batch(self, vm: Vm, batch: EventBatch) -> int:
        """Give a batch to every batch node; returns the event deliveries made."""
        calls = 0
        for node in self.batch:
            if not node.active:
                continue
            calls += len(batch)
            node.calls += len(batch)
            try:
                node.notifier.track_write_batch(vm, batch)  # type: ignore[attr-defined]
            except Exception:
                self._failed(node, vm, "track_write_batch")
        return calls

    def dispatch_remove_region(
        self, vm: Vm, base_gfn: int, npages: int, *, internal_only: bool = False
    ) -> None:
        """Tell nodes that a gfn range is gone, newest first."""
        if self.flush is not None:
            self.flush()
        for node in self._nodes:
            if not node.active or (internal_only and node.notifier.external):
                continue
            try:
                node.notifier.track_remove_region(vm, base_gfn, npages)
            except Exception:
                self._failed(node, vm, "track_remove_region")

    def dispatch_vm_closed(self, vm: Vm) -> None:
        """Unregister every node, newest first, and tell those that ask
        (:class:`ClosingNotifier`) that the VM is deleted."""
        for node in self.nodes():
            self.unregister(node)
            if isinstance(node.notifier, ClosingNotifier):
                try:
                    node.notifier.vm_closed(vm)
                except Exception:
                    self._failed(node, vm, "vm_closed")

    def guest_writes(self) -> GuestWrites:
        """A per-event dispatcher for the emulated pieces of one batched write."""
        return GuestWrites(self)


_GuestWriteFn = Callable[["Vm", int, int, int, bytes], None]


class GuestWrites:
    """Tells the per-event nodes of each emulated piece of a batched write, as
    :meth:`NotifierList.dispatch_sync` would with an event object.

    When every per-event node offers ``track_guest_write`` (:class:`GuestWriteNotifier`)
    no event object is built; a piece on an untracked page (its event flagged
    ``untracked``) always gets one, as ``track_guest_write`` has no flag. The nodes are
    looked up again whenever the registrations change (a callback may change them).
    With a single such node the batch loop calls it itself (:meth:`direct`); which
    function that is, how its calls are counted and what a failure does stay here.
    Call :meth:`finish` at the end: it returns the calls made.
    """

    __slots__ = ("_list", "_known", "_fast", "_one", "_one_calls", "_calls")

    def __init__(self, notifiers: NotifierList) -> None:
        self._list = notifiers
        self._known: tuple[NotifierNode, ...] | None = None  # the nodes _fast was made for
        self._fast: list[tuple[NotifierNode, _GuestWriteFn]] = []
        self._one: _GuestWriteFn | None = None  # _fast's only node
        self._one_calls = 0  # calls made to _one not yet counted on its node
        self._calls = 0

    def _settle(self) -> None:
        """Count the calls made to the only node so far on that node."""
        if self._one_calls:
            self._fast[0][0].calls += self._one_calls
            self._calls += self._one_calls
            self._one_calls = 0

    def _refresh(self, nodes: tuple[NotifierNode, ...]) -> None:
        # Registered nodes changed (or first piece): can every node take the write
        # without an event object?
        self._settle()
        self._known = nodes
        fns = [getattr(n.notifier, "track_guest_write", None) for n in nodes]
        self._fast = [] if None in fns else [
            (n, fn) for n, fn in zip(nodes, fns, strict=True) if fn is not None
        ]
        self._one = self._fast[0][1] if len(self._fast) == 1 else None

    def direct(self) -> tuple[tuple[NotifierNode, ...], _GuestWriteFn | None]:
        """What to call for a piece on a tracked page while the per-event nodes stay the
        tuple returned with it: the only node's ``track_guest_write`` (the usual case, a
        plugin), called with ``(vm, seq, vcpu, gpa, data)``; None when :meth:`tell` must
        be used. The caller counts its calls with :meth:`called` and reports an
        exception from it with :meth:`failed`; it saves a call per piece on the write
        path, where the plugin's own work is a few times that."""
        nodes = self._list.sync
        if nodes is not self._known:
            self._refresh(nodes)
        return nodes, self._one

    def called(self, n: int) -> None:
        """:meth:`direct`'s function was called ``n`` more times."""
        self._one_calls += n

    def failed(self, vm: Vm) -> None:
        """:meth:`direct`'s function raised: counted and logged as any notifier failure."""
        self._list._failed(self._fast[0][0], vm, "track_write")

    def tell(self, vm: Vm, seq: int, vcpu: int, gpa: int, data: bytes, flags: int) -> None:
        """Tell the per-event nodes that the guest write ``data`` at ``gpa`` landed;
        ``flags`` nonzero: its page is not tracked (the event is flagged)."""
        nodes = self._list.sync
        if nodes is not self._known:
            self._refresh(nodes)
        if flags or not self._fast:
            self._calls += self._list._tell(
                nodes, vm, guest_event(seq, vcpu, gpa, data, bool(flags))
            )
            return
        for node, fn in self._fast:
            if not node.active:  # unregistered by a node called before it
                continue
            self._calls += 1
            node.calls += 1
            try:
                fn(vm, seq, vcpu, gpa, data)
            except Exception:
                self._list._failed(node, vm, "track_write")

    def finish(self) -> int:
        """The calls made (one per piece per node told)."""
        self._settle()
        return self._calls
