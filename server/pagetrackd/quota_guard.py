"""Quotas on every path: a VM's own methods are charged to its tenant's quotas.

The gRPC calls are not the only things that grow a VM: workloads make memslots, track
pages and write; ReplayVm and RestoreVm rebuild VMs; plugins track the tables they
shadow. So the checks sit on the VM itself. :func:`guard` installs thin wrappers on one
:class:`~pagetrackd.domain.Vm` *instance* (the class is untouched, as the recorder
does), so every caller is charged without knowing it:

* ``set_memslot`` -- a new or resized slot's pages against ``guest_pages``;
* ``track_add`` -- gfns that become tracked against ``tracked_gfns``;
* ``write``, ``write_batch``, ``cmpxchg`` -- guest writes against ``write_rate`` (given
  back when the call is refused: it changed nothing).

A call over a quota raises QuotaExceeded and changes nothing. ``exempt`` turns the
checks off while the daemon loads a VM it accepted before (its state directory): a VM
that was allowed is never refused at a restart.

A request done in slices (application/slices.py) is charged and checked whole before its
first slice: :meth:`QuotaGuard.prepaid` charges a batch's writes once and lets its slices
through uncharged; :meth:`QuotaGuard.prechecked` lets the slices of a tracking change
through unchecked (calls a plugin makes from inside them are checked as ever).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from pagetrackd.domain import PageTrackError, TenantId, Vm
from pagetrackd.domain.arrays import distinct
from pagetrackd.domain.types import TENANT_OWNER, SlotFlags

if TYPE_CHECKING:
    from pagetrackd.application.tenancy import Tenancy

__all__ = ["QuotaGuard", "guard"]

#: up to this many gfns a track_add looks each up; more are matched in one array pass
_LOOKUP_EACH = 64


class QuotaGuard:
    """The wrappers on one VM; ``exempt`` switches their checks off."""

    def __init__(self, engine: Tenancy, tenant: TenantId, vm: Vm) -> None:
        self.engine = engine
        self.tenant = tenant
        self.vm = vm
        self.exempt = False
        self._writing = False  #: a charged call runs (cmpxchg may call write): charge once
        self._prechecked = False  #: outermost track_add calls were checked whole already
        self._adding = 0  #: track_add calls running (a plugin's, inside one, is nested)
        self._wrap("set_memslot", self._set_memslot)
        self._wrap("track_add", self._track_add)
        for name in ("write", "cmpxchg"):
            self._wrap(name, self._charged(name, lambda *a, **k: 1))
        self._wrap("write_batch", self._charged("write_batch", _batch_writes))

    def _wrap(self, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        self.vm.__dict__[name] = make(getattr(self.vm, name))

    def _set_memslot(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        vm = self.vm

        def set_memslot(
            slot_id: int, base_gfn: int, npages: int, flags: SlotFlags = SlotFlags.NONE
        ) -> Any:
            if not self.exempt and npages > 0:
                old = vm.slots.by_id.get(slot_id)
                if old is None or old.info.npages != npages:
                    self.engine.check_guest_pages(self.tenant, npages)
            return orig(slot_id, base_gfn, npages, flags)

        return set_memslot

    def _track_add(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        vm = self.vm

        def track_add(gfns: Any, owner: str = TENANT_OWNER) -> Any:
            if not self.exempt and not (self._prechecked and not self._adding):
                uniq = distinct(np.asarray(gfns, dtype=np.int64))
                if uniq.size <= _LOOKUP_EACH:
                    extra = sum(1 for g in uniq.tolist() if not vm.is_tracked(g))
                else:
                    extra = int(uniq.size - np.isin(uniq, vm.tracked_gfns()).sum())
                if extra:
                    self.engine.check_tracked(self.tenant, extra)
            self._adding += 1
            try:
                return orig(gfns, owner)
            finally:
                self._adding -= 1

        return track_add

    def _charged(
        self, name: str, count: Callable[..., int]
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(orig: Callable[..., Any]) -> Callable[..., Any]:
            def charged(*args: Any, **kwargs: Any) -> Any:
                if self.exempt or self._writing:
                    return orig(*args, **kwargs)
                n = count(*args, **kwargs)
                self.engine.charge_writes(self.tenant, n)
                self._writing = True
                try:
                    return orig(*args, **kwargs)
                except PageTrackError:
                    self.engine.refund_writes(self.tenant, n)
                    raise
                finally:
                    self._writing = False

            return charged

        return make

    @contextlib.contextmanager
    def prepaid(self, writes: int, unused: Callable[[], int]) -> Iterator[None]:
        """Charge ``writes`` guest writes to the write rate now (QuotaExceeded, nothing
        charged, if they do not fit); the VM's writes inside are not charged again. If
        the block is left by an exception, ``unused()`` writes are given back (those
        never written)."""
        if self.exempt or self._writing:
            yield
            return
        self.engine.charge_writes(self.tenant, writes)
        self._writing = True
        try:
            yield
        except BaseException:
            self.engine.refund_writes(self.tenant, unused())
            raise
        finally:
            self._writing = False

    @contextlib.contextmanager
    def prechecked(self) -> Iterator[None]:
        """Inside, outermost ``track_add`` calls are not checked against tracked_gfns:
        the caller checked the whole change they are slices of."""
        self._prechecked = True
        try:
            yield
        finally:
            self._prechecked = False


def _batch_writes(gpa: Any, *args: Any, **kwargs: Any) -> int:
    return int(np.size(gpa))


def guard(engine: Tenancy, tenant: TenantId, vm: Vm) -> QuotaGuard:
    """Charge every later call on ``vm`` to ``tenant``'s quotas."""
    return QuotaGuard(engine, tenant, vm)
