"""The shadow MMU's fault path: roots, the guest walk, shadow page faults, lookups and
unprotect-and-retry (``FNAME(page_fault)``, ``FNAME(fetch)``, ``kvm_mmu_new_pgd``,
``kvm_mmu_hugepage_adjust``, ``kvm_mmu_unprotect_page`` in ``arch/x86/kvm/mmu/``)."""

from __future__ import annotations

from typing import Any

from pagetrackd.domain import PAGE_SHIFT, FailedPrecondition, InvalidArgument
from pagetrackd.plugins.shadow_pages import (
    NUM_PREV_ROOTS,
    SPTE_MMIO,
    ShadowPage,
    VcpuMmu,
    leaf_spte,
    parse_int,
    translation,
)
from pagetrackd.plugins.shadow_table import SP_BYTES, SPTE_BYTES, ShadowTable
from pagetrackd.plugins.x86_paging import (
    ACC_ALL,
    ACC_WRITE,
    PTE_RW,
    PTE_US,
    ROOT_LEVEL,
    check_gva,
    index,
    level_shift,
    pages_per,
    walk_guest,
)

#: the most one fault makes: a root and a page per level below it, each linked, and
#: the leaf SPTE (what ``mmu_topup_memory_caches`` fills before a fault, mmu.c)
FAULT_BYTES = ROOT_LEVEL * (SP_BYTES + SPTE_BYTES)


class ShadowFaults(ShadowTable):
    """Roots and faults over the shadow table."""

    def _vcpu(self, vcpu: object) -> VcpuMmu:
        n = parse_int("vcpu", vcpu, 0, self.vm.vcpus - 1)
        vc = self._vcpus.get(n)
        if vc is None:
            vc = self._vcpus[n] = VcpuMmu()
        return vc

    def _set_root(self, vcpu: int, cr3: int) -> dict[str, Any]:
        """``kvm_mmu_new_pgd`` + ``kvm_mmu_load``: switch to the root for ``cr3``, from
        the previous-roots cache if it is there, and shadow it."""
        vm = self.vm
        gfn = (cr3 & 0x000F_FFFF_FFFF_F000) >> PAGE_SHIFT
        if vm.slots.find(gfn) is None:
            raise FailedPrecondition(
                f"cr3 {cr3:#x}: root table gfn {gfn:#x} is not in any memslot"
                " (KVM would triple-fault the guest)"
            )
        vc = self._vcpu(vcpu)
        cached = False
        if vc.cr3_gfn == gfn and vc.root is not None:
            cached = True
        else:
            hit = next((i for i, sp in enumerate(vc.prev) if sp.gfn == gfn), None)
            if hit is None:
                self.state_meter.reserve(SP_BYTES, "loading a shadow MMU root")
            if hit is not None:
                sp = vc.prev.pop(hit)
                if vc.root is not None:
                    vc.prev.insert(0, vc.root)
                vc.root = sp
                cached = True
            else:
                if vc.root is not None:
                    vc.prev.insert(0, vc.root)
                    vc.root = None
                while len(vc.prev) > NUM_PREV_ROOTS:
                    vc.prev.pop().root_count -= 1
            vc.cr3_gfn = gfn
            self._load_root(vc)
        return {
            "root_gfn": gfn,
            "cached": cached,
            "shadow_pages": len(self._sps),
        }

    def _load_root(self, vc: VcpuMmu) -> ShadowPage:
        if vc.root is None:
            if vc.cr3_gfn is None:
                raise FailedPrecondition("no root set for this vCPU; call set_root first")
            if self.vm.slots.find(vc.cr3_gfn) is None:
                raise FailedPrecondition(
                    f"root table gfn {vc.cr3_gfn:#x} is not in any memslot; set a new root"
                )
            self._make_room()
            vc.root = self._get_sp(vc.cr3_gfn, ROOT_LEVEL, ACC_ALL, False, 0)
            vc.root.root_count += 1
        return vc.root

    def _mapping_level(self, gfn: int, max_level: int) -> int:
        """``kvm_mmu_hugepage_adjust``: the largest level <= ``max_level`` whose region
        holds no tracked gfn (lpage disallow, R3.1) and lies in one memslot."""
        if max_level == 1:
            return 1
        slot = self.vm.slots.find(gfn)
        if slot is None:
            return 1
        info = self.vm.track_query([gfn])[0]
        for level in range(max_level, 1, -1):
            base = gfn & ~(pages_per(level) - 1)
            if base < slot.info.base_gfn or base + pages_per(level) > slot.info.end_gfn:
                continue
            if level == 3 and info.lpage_disallowed_1g:
                continue
            if level == 2 and info.lpage_disallowed_2m:
                continue
            return level
        return 1

    def _make_leaf(self, gfn: int, level: int, access: int) -> int:
        slot = self.vm.slots.find(gfn)
        mmio = slot is None
        writable = bool(access & ACC_WRITE) and slot is not None and not slot.readonly
        if writable and level == 1 and self.vm.is_tracked(gfn):
            # mmu_try_to_unsync_pages() refuses a tracked gfn: read-only SPTE (R3.3).
            writable = False
        return leaf_spte(gfn, level, access, writable, mmio)

    def _lookup(
        self, vc: VcpuMmu, gva: int, write: bool, user: bool
    ) -> tuple[int, int, int] | None:
        """The hardware walk of the shadow: (spte, spte level, guest level) if the shadow
        maps ``gva`` with the access allowed, else None (a fault)."""
        sp = vc.root
        if sp is None:
            return None
        guest_level = 0
        while True:
            idx = index(gva, sp.level)
            spte = sp.sptes.get(idx)
            if spte is None:
                return None
            child = sp.children.get(idx)
            if child is None:
                if spte & SPTE_MMIO:
                    return None  # KVM revalidates MMIO SPTEs on every access
                if (write and not spte & PTE_RW) or (user and not spte & PTE_US):
                    return None
                return spte, sp.level, guest_level or sp.level
            if child.direct and not guest_level:
                guest_level = sp.level
            sp = child

    def _fault(self, vc: VcpuMmu, gva: int, write: bool, user: bool) -> dict[str, Any]:
        """``FNAME(page_fault)``: walk the guest tables, then ``FNAME(fetch)`` the shadow
        path, making shadow pages as needed and resetting the flood count of every
        page on the way (``clear_sp_write_flooding_count``)."""
        self.state_meter.reserve(FAULT_BYTES, "a shadow page fault")
        self.counters["faults"] += 1
        created = self.counters["shadow_pages_created"]
        self._make_room()
        root = self._load_root(vc)
        assert vc.cr3_gfn is not None
        gw = walk_guest(self.vm, vc.cr3_gfn, gva, write=write, user=user)
        if not gw.ok:
            self.counters["guest_faults"] += 1
            made = self.counters["shadow_pages_created"] - created
            return translation(present=False, fault=gw.fault, created=made)
        sp = root
        level = ROOT_LEVEL
        while level > gw.level:
            sp.flood = 0
            idx = index(gva, level)
            child_gfn = gw.table_gfns[ROOT_LEVEL - level + 1]
            access = gw.access_at(level)
            child = sp.children.get(idx)
            if (
                child is None
                or child.direct
                or child.gfn != child_gfn
                or child.access != access
            ):
                self._drop_spte(sp, idx)
                gva_base = gva & ~((1 << level_shift(level)) - 1)
                child = self._get_sp(child_gfn, level - 1, access, False, gva_base)
                self._link(sp, idx, child)
            sp = child
            level -= 1
        map_level = self._mapping_level(gw.gfn, gw.level)
        while level > map_level:
            # A guest large page mapped smaller: direct shadow pages (drop_large_spte).
            sp.flood = 0
            idx = index(gva, level)
            base = gw.gfn & ~(pages_per(level) - 1)
            child = sp.children.get(idx)
            if child is None or not child.direct or child.gfn != base or child.access != gw.access:
                self._drop_spte(sp, idx)
                gva_base = gva & ~((1 << level_shift(level)) - 1)
                child = self._get_sp(base, level - 1, gw.access, True, gva_base)
                self._link(sp, idx, child)
            sp = child
            level -= 1
        sp.flood = 0
        leaf_gfn = gw.gfn & ~(pages_per(map_level) - 1)
        spte = self._make_leaf(leaf_gfn, map_level, gw.access)
        self._set_leaf(sp, index(gva, map_level), spte)
        emulated = write and self.vm.is_tracked(gw.gfn)
        if emulated:
            # page_fault_handle_page_track: a write to a tracked gfn is emulated (R4.1).
            self.counters["emulated_faults"] += 1
        return translation(
            present=True,
            gva=gva,
            spte=spte,
            spte_level=map_level,
            guest_level=gw.level,
            faulted=True,
            emulated=emulated,
            created=self.counters["shadow_pages_created"] - created,
        )

    def translate(
        self, gva: int, *, write: bool = False, user: bool = False, vcpu: int = 0
    ) -> dict[str, Any]:
        """A guest access to ``gva``: served by the shadow if it maps it with the access
        allowed (no exit, no flood reset), else a shadow page fault (:meth:`fault`)."""
        gva = check_gva(gva)
        vc = self._vcpu(vcpu)
        hit = self._lookup(vc, gva, write, user)
        if hit is None:
            return self._fault(vc, gva, write, user)
        self.counters["hits"] += 1
        spte, spte_level, guest_level = hit
        return translation(
            present=True,
            gva=gva,
            spte=spte,
            spte_level=spte_level,
            guest_level=guest_level,
            faulted=False,
        )

    def fault(
        self, gva: int, *, write: bool = False, user: bool = False, vcpu: int = 0
    ) -> dict[str, Any]:
        """A simulated guest page fault on ``gva``: always runs the fault path."""
        gva = check_gva(gva)
        return self._fault(self._vcpu(vcpu), gva, write, user)

    def unprotect(
        self,
        gfn: int | None = None,
        *,
        gva: int | None = None,
        rip: int | None = None,
        vcpu: int = 0,
    ) -> dict[str, Any]:
        """``kvm_mmu_unprotect_page`` (R7.6) as used by unprotect-and-retry (R4.10): zap
        every shadow page of the gfn (dropping their track references) so the guest
        can re-execute the write natively. With ``gva`` the gfn comes from a guest
        walk; with ``rip`` the loop guard refuses a second retry at the same (rip,
        address). ``retry`` is true only if something was zapped (6.12+)."""
        self.counters["unprotect_calls"] += 1
        vc = self._vcpu(vcpu)
        addr: int
        if gva is not None:
            gva = check_gva(gva)
            addr = gva
            if vc.cr3_gfn is None:
                raise FailedPrecondition("no root set for this vCPU; call set_root first")
            gw = walk_guest(self.vm, vc.cr3_gfn, gva, write=True)
            if not gw.ok:
                return {"gfn": None, "zapped": 0, "retry": False, "reason": gw.fault}
            gfn = gw.gfn
        elif gfn is not None:
            gfn = parse_int("gfn", gfn, 0, self.vm.limits.gfn_limit - 1)
            addr = gfn << PAGE_SHIFT
        else:
            raise InvalidArgument("unprotect needs 'gfn' or 'gva'")
        if rip is not None:
            rip = parse_int("rip", rip, 0, (1 << 64) - 1)
            if vc.last_retry == (rip, addr):
                self.counters["retries_refused"] += 1
                return {"gfn": gfn, "zapped": 0, "retry": False, "reason": "loop guard"}
        zapped = 0
        for sp in list(self._by_gfn.get(gfn, ())):
            self._zap_sp(sp, "unprotected")
            zapped += 1
        retry = zapped > 0
        if retry:
            self.counters["retries"] += 1
            if rip is not None:
                vc.last_retry = (rip, addr)
        return {
            "gfn": gfn,
            "zapped": zapped,
            "retry": retry,
            "tracked": self.vm.is_tracked(gfn),
            "reason": "" if retry else "no shadow page for the gfn",
        }


__all__ = ["ShadowFaults"]
