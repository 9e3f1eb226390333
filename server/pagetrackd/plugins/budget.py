"""Bytes the built-in plugins' state holds, counted against the tenant's
``plugin_state_bytes`` quota.

A shadow page (shadow MMU) or a shadow page table (vGPU) is the daemon's memory, made
because of what a tenant's guest wrote and asked for: 16 bytes of guest memory naming
a new guest table make a vGPU shadow table of 512 entries. So each built-in plugin
keeps a :class:`StateMeter`: it ``take``\\ s bytes when it makes an object and
``give``\\ s them back when it frees one, and before a step that makes objects it
``reserve``\\ s the most that step can make. The meters of one tenant's plugins share
a :class:`StateBudget`; a reservation past it raises QuotaExceeded, before anything
changed, as KVM's ``mmu_topup_memory_caches`` fails a fault with -ENOMEM before the
fault takes the MMU lock (``arch/x86/kvm/mmu/mmu.c``).

The per-object sizes are what CPython allocates for them (measured with tracemalloc,
checked by tests/plugins/test_plugin_budget.py), rounded up.
"""

from __future__ import annotations

from collections.abc import Callable

from pagetrackd.domain import QuotaExceeded

__all__ = ["StateBudget", "StateMeter"]

QUOTA = "plugin_state_bytes"


class StateBudget:
    """One tenant's plugin state: bytes held, summed over its plugins' meters, and the
    quota. The quota is read from ``limit`` when a reservation would pass the value read
    last, so a quota raised since applies at once and a fitting reservation (every one
    on the write path, but the last) costs no call.

    ``used`` and ``quota_seen`` are public for a plugin's hot path (the vGPU's DMA
    mappings): ``used + n <= quota_seen`` means ``n`` more bytes fit, with no call; only
    when it does not hold must :meth:`StateMeter.room` decide."""

    __slots__ = ("used", "_limit", "quota_seen")

    def __init__(self, limit: Callable[[], int]) -> None:
        self.used = 0
        self._limit = limit
        self.quota_seen = -1  #: the quota read last (none yet)

    @property
    def limit(self) -> int:
        """The quota now."""
        self.quota_seen = q = self._limit()
        return q

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more stay within the quota."""
        return self.used + nbytes <= self.quota_seen or self.used + nbytes <= self.limit

    def check(self, nbytes: int, what: str | Callable[[], str]) -> None:
        """Raise QuotaExceeded if ``nbytes`` more would pass the quota."""
        if self.fits(nbytes):
            return
        q = self.quota_seen
        if not isinstance(what, str):
            what = what()
        raise QuotaExceeded(
            f"{what} needs up to {nbytes} bytes of plugin state; the tenant's plugins"
            f" hold {self.used} and its plugin_state_bytes quota is {q}. Nothing was"
            " changed: detach a plugin, destroy shadowed tables or ask for a higher quota",
            quota=QUOTA, limit=q,
        )


class StateMeter:
    """Bytes one plugin's state holds; charged to a :class:`StateBudget` once the
    daemon gives it one (:meth:`join`). Without a budget (a plugin used in-process,
    tools, tests) it only counts. ``exempt`` turns the checks off while the daemon
    loads a VM it accepted before (as the quota guard's ``exempt``)."""

    __slots__ = ("bytes", "budget", "exempt")

    def __init__(self) -> None:
        self.bytes = 0
        self.budget: StateBudget | None = None
        self.exempt: Callable[[], bool] = _never

    def join(self, budget: StateBudget, exempt: Callable[[], bool] = lambda: False) -> None:
        """Charge this meter (what it holds now, and from now on) to ``budget``."""
        self.leave()
        budget.used += self.bytes
        self.budget = budget
        self.exempt = exempt

    def leave(self) -> None:
        """Stop charging the budget (what it holds is given back to it)."""
        if self.budget is not None:
            self.budget.used -= self.bytes
        self.budget = None
        self.exempt = _never

    def reserve(self, nbytes: int, what: str | Callable[[], str]) -> None:
        """Raise QuotaExceeded if the budget cannot take ``nbytes`` more. ``what`` (or
        what it returns, made only then: this runs on the write path) names the cause."""
        budget = self.budget
        if budget is not None and not budget.fits(nbytes) and not self.exempt():
            budget.check(nbytes, what)

    def room(self, nbytes: int) -> bool:
        """Whether the budget can take ``nbytes`` more (always, without a budget or while
        exempt); nothing is taken."""
        budget = self.budget
        return budget is None or budget.fits(nbytes) or self.exempt()

    def take(self, nbytes: int) -> None:
        """An object of ``nbytes`` was made."""
        self.bytes += nbytes
        if self.budget is not None:
            self.budget.used += nbytes

    def give(self, nbytes: int) -> None:
        """An object of ``nbytes`` was freed."""
        self.bytes -= nbytes
        if self.budget is not None:
            self.budget.used -= nbytes

    def clear(self) -> None:
        """All the plugin's state was dropped (detach, VM closed)."""
        self.give(self.bytes)


def _never() -> bool:
    return False
