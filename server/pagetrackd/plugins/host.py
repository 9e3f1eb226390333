"""Runs a typed plugin on a VM: registers it as a notifier, turns the VM's callbacks
into typed hooks, and keeps a failing plugin from hurting anyone else.

A hook that raises is counted and logged; the write that triggered it has landed and
succeeds, as in KVM, where a notifier cannot fail a write. After ``failure_limit``
failures the plugin is detached on the spot: unregistered (no hook runs again), its
own ``detach`` called, its handle revoked, and every tracking reference it held
released. KVM's ``kvm_page_track_unregister_notifier`` (``arch/x86/kvm/mmu/
page_track.c``) only unlinks the node and waits for running callbacks
(``synchronize_srcu``); the user must remove its own tracking (KVMGT does, gfn by
gfn). pagetrack records who holds each reference, so it releases the plugin's on
detach: a plugin that failed cannot be trusted to clean up after itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from pagetrackd.domain import FailedPrecondition, InvalidArgument, PageTrackError, Vm, WriteEvent
from pagetrackd.domain.findings import Finding, publish_finding
from pagetrackd.domain.notifiers import NotifierNode
from pagetrackd.domain.types import Source
from pagetrackd.limits import DEFAULT_PLUGIN_FAILURE_LIMIT
from pagetrackd.plugins.api import (
    AuditReport,
    Plugin,
    RegionRemoved,
    Status,
    TrackingStarted,
    WritePiece,
)
from pagetrackd.plugins.handle import PluginHandle

log = structlog.get_logger("pagetrackd.plugins")

#: the finding kind the daemon publishes when it detaches a failing plugin
DETACHED_KIND = "plugin.detached"


class HostedPlugin:
    """A typed plugin attached to a VM through a :class:`PluginHandle`.

    ``on_detached`` is called once the host detached the plugin by itself (after too
    many failures), so whoever lists the VM's plugins forgets it.
    """

    external = True  #: a user outside the MMU, like KVMGT

    def __init__(
        self,
        name: str,
        impl: Plugin,
        *,
        failure_limit: int = DEFAULT_PLUGIN_FAILURE_LIMIT,
        on_detached: Callable[[HostedPlugin], None] | None = None,
    ) -> None:
        if failure_limit < 1:
            raise InvalidArgument(f"plugin failure limit {failure_limit} must be >= 1")
        self.name = name
        self.impl = impl
        self.failure_limit = failure_limit
        self.on_detached = on_detached
        self.failures = 0  #: hooks that raised
        self.last_error = ""
        self.findings = 0  #: findings published
        self.released_gfns = 0  #: gfns untracked by the detach
        self.detached_for_failures = False
        self._vm: Vm | None = None
        self._handle: PluginHandle | None = None
        self._node: NotifierNode | None = None
        self._options: dict[str, Any] = {}

    @property
    def owner(self) -> str:
        """The owner of the plugin's tracking references."""
        return f"plugin:{self.name}"

    # ------------------------------------------------------------------ lifecycle

    def attach(self, vm: Vm, **options: Any) -> None:
        """Give the plugin its handle, then register it (newest first, R4.8). A plugin
        that refuses (raises) leaves nothing behind: InvalidArgument as it said, any
        other exception as FailedPrecondition naming it."""
        if self._vm is not None:
            raise InvalidArgument(f"plugin {self.name!r} is already attached")
        handle = PluginHandle(vm, self.name, self._published)
        try:
            self.impl.attach(handle, dict(options))
        except Exception as exc:
            handle.revoke()
            vm.release_owner(self.owner)
            if isinstance(exc, PageTrackError):
                raise
            log.warning("plugin.attach_failed", plugin=self.name, vm=vm.name, exc_info=True)
            raise FailedPrecondition(
                f"plugin {self.name!r} failed to attach: {type(exc).__name__}: {exc}"
            ) from None
        self._vm, self._handle, self._options = vm, handle, dict(options)
        self._node = vm.register_notifier(self)
        vm.track_start_hooks.append(self._tracking_started)
        log.info("plugin.attached", plugin=self.name, vm=vm.name)

    def attach_options(self) -> dict[str, Any]:
        """The options it was attached with (saved with the VM's state)."""
        return dict(self._options)

    def detach(self) -> None:
        """Unregister (no hook runs after this), let the plugin stop, revoke its handle
        and release every tracking reference it holds."""
        vm, handle = self._vm, self._handle
        if vm is None or handle is None:
            return
        self._unhook(vm)
        self._guard("detach", self.impl.detach, None, count=False)
        handle.revoke()
        self._handle = None
        self._vm = None
        self.released_gfns = vm.release_owner(self.owner) if not vm.closed else 0
        log.info("plugin.detached", plugin=self.name, vm=vm.name, released_gfns=self.released_gfns)

    def vm_closed(self, vm: Vm) -> None:
        """The VM is deleted: the plugin stops and its handle is revoked."""
        self._node = None  # the VM unregistered it already
        self._unhook(vm)
        if self._handle is not None:
            self._guard("detach", self.impl.detach, None, count=False)
            self._handle.revoke()
        self._handle = None
        self._vm = None

    def _unhook(self, vm: Vm) -> None:
        if self._node is not None:
            vm.unregister_notifier(self._node)
            self._node = None
        if self._tracking_started in vm.track_start_hooks:
            vm.track_start_hooks.remove(self._tracking_started)

    # ------------------------------------------------------------------ hooks

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        """A write landed: the plugin's ``on_write``."""
        piece = WritePiece(
            event.seq, event.vcpu, event.gpa, event.data, event.source is Source.DMA,
            event.untracked,
        )
        self._guard("on_write", self.impl.on_write, piece)

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        """A region is gone: the plugin's ``on_region_removed``."""
        self._guard("on_region_removed", self.impl.on_region_removed,
                    RegionRemoved(base_gfn, npages))

    def _tracking_started(self, gfns: list[int]) -> None:
        self._guard("on_tracking_started", self.impl.on_tracking_started,
                    TrackingStarted(tuple(gfns)))

    def _guard(self, hook: str, fn: Callable[[Any], None] | Callable[[], None],
               arg: Any, *, count: bool = True) -> None:
        """Call one hook; a failure is counted and logged, never passed on."""
        if self._handle is None:
            return
        try:
            fn() if arg is None else fn(arg)  # type: ignore[call-arg]
        except Exception as exc:
            if count:
                self._failed(hook, exc)
            else:
                log.warning("plugin.hook_failed", plugin=self.name, hook=hook, exc_info=True)

    def _failed(self, hook: str, exc: Exception) -> None:
        self.failures += 1
        self.last_error = f"{hook}: {type(exc).__name__}: {exc}"[:240]
        vm = self._vm
        log.warning(
            "plugin.hook_failed", plugin=self.name, vm=vm.name if vm else "", hook=hook,
            failures=self.failures, limit=self.failure_limit, exc_info=True,
        )
        if self.failures >= self.failure_limit and vm is not None:
            self.detach()
            self.detached_for_failures = True
            publish_finding(vm, Finding(
                self.name, DETACHED_KIND, 0, 0,
                f"plugin {self.name!r} was detached after {self.failures} failed hooks",
                {"failures": str(self.failures), "last_error": self.last_error},
            ))
            log.error("plugin.detached_after_failures", plugin=self.name, vm=vm.name,
                      failures=self.failures, released_gfns=self.released_gfns)
            if self.on_detached is not None:
                self.on_detached(self)

    def _published(self, finding: Finding) -> None:
        self.findings += 1

    # ------------------------------------------------------------------ reports

    def typed_status(self) -> Status:
        """The plugin's own status; a plugin whose ``status`` raises reports none."""
        try:
            st = self.impl.status()
        except Exception:
            log.warning("plugin.status_failed", plugin=self.name, exc_info=True)
            return Status()
        return st if isinstance(st, Status) else Status()

    def status(self) -> dict[str, int | str]:
        """Flat status: the plugin's counters and facts plus the host's own."""
        st = self.typed_status()
        out: dict[str, int | str] = {
            k: int(v) for k, v in st.counters.items() if isinstance(v, int) and v >= 0
        }
        out.update({k: str(v) for k, v in st.info.items()})
        out["hook_failures"] = self.failures
        out["failure_limit"] = self.failure_limit
        out["findings"] = self.findings
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    def audit(self) -> AuditReport:
        """The plugin's audit if it offers one, else nothing checked."""
        audit = getattr(self.impl, "audit", None)
        if not callable(audit):
            return AuditReport(checked=0)
        report = audit()
        if not isinstance(report, AuditReport):
            raise FailedPrecondition(f"plugin {self.name!r} audit returned no AuditReport")
        return report

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Third-party plugins have no operations of their own over the API."""
        raise InvalidArgument(f"plugin {self.name!r} has no operation {op!r}")


__all__ = ["DETACHED_KIND", "HostedPlugin"]
