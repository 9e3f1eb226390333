"""The shadow MMU's table of shadow pages: making, linking, write-protecting and
zapping them (``kvm_mmu_get_shadow_page``, ``mmu_page_zap_pte``,
``kvm_mmu_prepare_zap_page``, ``make_mmu_pages_available`` in
``arch/x86/kvm/mmu/mmu.c``). The fault path, the audit and the write hook build on it."""

from __future__ import annotations

from pagetrackd.domain import FailedPrecondition, NotTracked, Vm
from pagetrackd.domain.notifiers import NotifierNode
from pagetrackd.plugins.budget import StateMeter
from pagetrackd.plugins.shadow_pages import (
    DEFAULT_MAX_SHADOW_PAGES,
    FLOOD_THRESHOLD,
    MIN_FREE_PAGES,
    OWNER,
    REFILL_PAGES,
    ZAP_REASONS,
    ShadowPage,
    VcpuMmu,
    link_spte,
    spte_gfn,
)
from pagetrackd.plugins.x86_paging import PTE_RW, pages_per

#: bytes a shadow page holds with its table entries (object, empty maps, lookups),
#: and each SPTE (its entry, its rmap or parent link); see plugins/budget.py
SP_BYTES = 1024
SPTE_BYTES = 512


class ShadowTable:
    """The shadow pages of one VM, by id, role and guest gfn, with the reverse map of
    leaf SPTEs, each vCPU's roots and the counters."""

    def __init__(self) -> None:
        self._vm: Vm | None = None
        self._node: NotifierNode | None = None
        self.flood_threshold = FLOOD_THRESHOLD
        self.flood_leaf = False
        self.max_shadow_pages = DEFAULT_MAX_SHADOW_PAGES
        self.released_gfns = 0  #: gfns untracked by the last detach
        #: bytes the shadow pages hold, against the tenant's plugin_state_bytes
        self.state_meter = StateMeter()
        self._reset_state()

    def _reset_state(self) -> None:
        self.state_meter.clear()
        self._next_id = 1
        #: every valid shadow page by id, oldest first (``active_mmu_pages``)
        self._sps: dict[int, ShadowPage] = {}
        self._hash: dict[tuple[int, int, int, bool], ShadowPage] = {}
        #: guest table gfn -> its (indirect) shadow pages (``mmu_page_hash`` by gfn)
        self._by_gfn: dict[int, list[ShadowPage]] = {}
        #: (level, first gfn) -> leaf SPTEs mapping it, as (page, index) (rmap)
        self._rmap: dict[tuple[int, int], set[tuple[ShadowPage, int]]] = {}
        self._vcpus: dict[int, VcpuMmu] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "faults", "guest_faults", "hits", "emulated_faults", "shadow_pages_created",
                "emulations", "pte_writes", "pde_zapped", "sptes_zapped", "zapped",
                "unprotect_calls", "retries", "retries_refused", "untrack_errors",
                "audits", "audit_checked", "audit_mismatches", "write_protected",
                *ZAP_REASONS,
            ),
            0,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def vm(self) -> Vm:
        """The VM attached to; FailedPrecondition when detached."""
        if self._vm is None:
            raise FailedPrecondition("the shadow_mmu plugin is not attached to a VM")
        return self._vm


    def _get_sp(
        self, gfn: int, level: int, access: int, direct: bool, gva_base: int
    ) -> ShadowPage:
        """``kvm_mmu_get_shadow_page``: reuse the page with this gfn and role (its flood
        count is reset: it is being used) or make one, accounting it (R7.1)."""
        sp = self._hash.get((gfn, level, access, direct))
        if sp is not None:
            sp.flood = 0
            return sp
        if not direct:
            # account_shadowed: one reference per shadow page, then write-protect SPTEs
            # that map the table (kvm_mmu_slot_gfn_write_protect, every level).
            self.vm.track_add([gfn], owner=OWNER)
        sp = ShadowPage(self._next_id, gfn, level, access, direct, gva_base)
        self.state_meter.take(SP_BYTES)
        self._next_id += 1
        self._sps[sp.sp_id] = sp
        self._hash[sp.key] = sp
        self.counters["shadow_pages_created"] += 1
        if not direct:
            sp.accounted = True
            self._by_gfn.setdefault(gfn, []).append(sp)
            self._write_protect(gfn)
        return sp


    def _write_protect(self, gfn: int) -> None:
        """Clear W in every leaf SPTE that maps ``gfn``, at every level."""
        for level in (1, 2, 3):
            base = gfn & ~(pages_per(level) - 1)
            for sp, idx in self._rmap.get((level, base), ()):
                if sp.sptes[idx] & PTE_RW:
                    sp.sptes[idx] &= ~PTE_RW
                    self.counters["write_protected"] += 1

    def _link(self, sp: ShadowPage, idx: int, child: ShadowPage) -> None:
        if idx not in sp.sptes:
            self.state_meter.take(SPTE_BYTES)
        sp.sptes[idx] = link_spte(child)
        sp.children[idx] = child
        child.parents.add((sp, idx))

    def _set_leaf(self, sp: ShadowPage, idx: int, spte: int) -> None:
        self._drop_spte(sp, idx)
        self.state_meter.take(SPTE_BYTES)
        sp.sptes[idx] = spte
        self._rmap.setdefault((sp.level, spte_gfn(spte)), set()).add((sp, idx))

    def _drop_spte(self, sp: ShadowPage, idx: int) -> bool:
        """``mmu_page_zap_pte``: clear one SPTE; a child page loses this parent (and
        stays, maybe orphaned); a leaf leaves the rmap. True if something was there."""
        spte = sp.sptes.pop(idx, None)
        if spte is None:
            return False
        self.state_meter.give(SPTE_BYTES)
        child = sp.children.pop(idx, None)
        if child is not None:
            child.parents.discard((sp, idx))
        else:
            key = (sp.level, spte_gfn(spte))
            entries = self._rmap.get(key)
            if entries is not None:
                entries.discard((sp, idx))
                if not entries:
                    del self._rmap[key]
        return True

    def _zap_sp(self, sp: ShadowPage, reason: str, *, untrack: bool = True) -> None:
        """``kvm_mmu_prepare_zap_page``: unlink children and parents, leave every root
        cache, and drop the track reference (``unaccount_shadowed``) unless the gfn's
        region is gone (``untrack=False``)."""
        if not sp.valid:
            return
        sp.valid = False
        for idx in list(sp.sptes):
            self._drop_spte(sp, idx)
        for parent, idx in list(sp.parents):
            self._drop_spte(parent, idx)
        if sp.root_count:
            for vc in self._vcpus.values():
                if vc.root is sp:
                    vc.root = None
                if sp in vc.prev:
                    vc.prev.remove(sp)
            sp.root_count = 0
        del self._sps[sp.sp_id]
        self.state_meter.give(SP_BYTES)
        del self._hash[sp.key]
        if not sp.direct:
            pages = self._by_gfn[sp.gfn]
            pages.remove(sp)
            if not pages:
                del self._by_gfn[sp.gfn]
        if sp.accounted:
            sp.accounted = False
            if untrack:
                try:
                    self.vm.track_remove([sp.gfn], owner=OWNER)
                except (NotTracked, FailedPrecondition):
                    # The reference went with its memslot; nothing left to drop.
                    self.counters["untrack_errors"] += 1
        self.counters["zapped"] += 1
        self.counters[reason] += 1

    def _make_room(self) -> None:
        """``make_mmu_pages_available``: below MIN_FREE_PAGES of room, zap the oldest
        pages that are not roots in use until REFILL_PAGES are free."""
        if len(self._sps) <= self.max_shadow_pages - MIN_FREE_PAGES:
            return
        target = self.max_shadow_pages - REFILL_PAGES
        for sp in list(self._sps.values()):
            if len(self._sps) <= target:
                break
            if sp.valid and not sp.root_count:
                self._zap_sp(sp, "evicted")

    def zap_all(self) -> int:
        """``kvm_mmu_zap_all``: zap every shadow page; returns how many."""
        n = 0
        for sp in list(self._sps.values()):
            if sp.valid:
                self._zap_sp(sp, "zap_all")
                n += 1
        return n


__all__ = ["SPTE_BYTES", "SP_BYTES", "ShadowTable"]
