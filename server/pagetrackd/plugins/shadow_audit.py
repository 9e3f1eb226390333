"""The shadow MMU's audit: every SPTE against a fresh walk of guest memory and the
current track counters (what ``CONFIG_KVM_MMU_AUDIT`` once checked)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pagetrackd.domain import PAGE_SHIFT
from pagetrackd.plugins.base import AuditReport, Mismatch
from pagetrackd.plugins.shadow_pages import SPTE_MMIO, ShadowPage, leaf_spte, spte_gfn
from pagetrackd.plugins.shadow_table import ShadowTable
from pagetrackd.plugins.x86_paging import (
    ACC_WRITE,
    ENTRY_BYTES,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    ROOT_LEVEL,
    gpte_access,
    is_leaf,
    leaf_base_gfn,
    pages_per,
    read_gpte,
    table_gfn,
)


class ShadowAudit(ShadowTable):
    """Audits of the shadow table."""

    def _expected(self, sp: ShadowPage, idx: int) -> tuple[int, str, int, int]:
        """What entry ``idx`` of ``sp`` shadows per guest memory now: (guest entry, kind,
        child table gfn or mapped gfn, access). Kind is "link", "leaf", "direct" (an
        entry of a split guest large page) or why the guest entry cannot be shadowed."""
        level = sp.level
        if sp.direct:
            gfn = sp.gfn + idx * pages_per(level)
            return 0, "direct", gfn, sp.access
        gpte = read_gpte(self.vm, (sp.gfn << PAGE_SHIFT) + idx * ENTRY_BYTES)
        if gpte is None:
            return 0, "guest table is not in any memslot", 0, 0
        if not gpte & PTE_P:
            return gpte, "guest entry not present", 0, 0
        if level == ROOT_LEVEL and gpte & PTE_PS:
            return gpte, "guest entry has a reserved bit", 0, 0
        access = sp.access & gpte_access(gpte)
        if is_leaf(gpte, level):
            return gpte, "leaf", leaf_base_gfn(gpte, level), access
        return gpte, "link", table_gfn(gpte), access

    def _audit(self) -> tuple[int, list[dict[str, Any]]]:
        checked = 0
        found: list[dict[str, Any]] = []
        for sp in list(self._sps.values()):
            for idx, spte in sp.sptes.items():
                checked += 1
                gpte, kind, gfn, access = self._expected(sp, idx)
                child = sp.children.get(idx)
                level = sp.level
                expected = 0
                reason = ""
                if kind == "direct":
                    if child is not None:
                        expected = (gfn << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US
                        if not (child.direct and child.gfn == gfn and child.access == access):
                            reason = "split page links the wrong direct page"
                    else:
                        expected, reason = self._check_leaf(spte, gfn, level, access)
                elif kind == "link":
                    expected = (gfn << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US
                    if (
                        child is None
                        or child.direct
                        or child.gfn != gfn
                        or child.level != level - 1
                        or child.access != access
                    ):
                        reason = "stale link: guest entry points at another table"
                elif kind == "leaf":
                    if child is not None:
                        # A guest large page mapped small: the child splits it.
                        expected = (gfn << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US
                        if not (child.direct and child.gfn == gfn and child.access == access):
                            reason = "stale split of a guest large page"
                    else:
                        expected, reason = self._check_leaf(spte, gfn, level, access)
                else:
                    reason = kind
                if reason:
                    found.append(
                        {
                            "table": "shadow",
                            "table_gfn": sp.gfn,
                            "level": level,
                            "index": idx,
                            "address": sp.gva_of(idx),
                            "guest_entry": gpte,
                            "expected": expected,
                            "actual": spte,
                            "reason": reason if not sp.direct else f"{reason} (direct page)",
                        }
                    )
        self.counters["audits"] += 1
        self.counters["audit_checked"] = checked
        self.counters["audit_mismatches"] = len(found)
        return checked, found

    def _check_leaf(
        self,
        spte: int,
        gfn: int,
        level: int,
        access: int,
    ) -> tuple[int, str]:
        """Compare a leaf SPTE with what the guest maps now; the W bit may be stricter
        than the guest's (write protection), never looser, and never set over a gfn
        whose track counter is above 0, whoever holds it (R3.3)."""
        slot = self.vm.slots.find(gfn)
        allowed = bool(access & ACC_WRITE) and slot is not None and not slot.readonly
        expected = leaf_spte(gfn, level, access, allowed, slot is None)
        ignore = PTE_RW | (SPTE_MMIO if spte & SPTE_MMIO else 0)
        if (spte & ~ignore) != (expected & ~ignore):
            if spte_gfn(spte) != gfn:
                return expected, "stale leaf: guest entry maps another frame"
            return expected, "stale leaf: guest access bits changed"
        if spte & PTE_RW:
            if not allowed:
                return expected, "shadow writable where the guest is not"
            span = pages_per(level)
            if self._any_tracked(gfn, span):
                return expected, "writable SPTE maps a write-tracked gfn"
        return expected, ""

    def _any_tracked(self, gfn: int, span: int) -> bool:
        """Whether any gfn of ``[gfn, gfn + span)`` has a track counter above 0."""
        if span == 1:
            return self.vm.is_tracked(gfn)
        end = gfn + span
        for slot in self.vm.slots.slots():
            lo, hi = max(gfn, slot.info.base_gfn), min(end, slot.info.end_gfn)
            if lo < hi:
                idx = np.arange(lo - slot.base_gfn, hi - slot.base_gfn, dtype=np.int64)
                if bool((slot.tracking.counters.get(idx) > 0).any()):
                    return True
        return False

    def audit(self) -> AuditReport:
        """Compare every SPTE of every shadow page with the guest entry it shadows, read
        afresh from guest memory (links, leaves, access, write protection)."""
        checked, found = self._audit()
        return AuditReport(
            checked,
            tuple(
                Mismatch(
                    m["address"],
                    m["level"],
                    m["actual"],
                    m["guest_entry"],
                    f"{m['reason']}; table_gfn={m['table_gfn']:#x} index={m['index']}"
                    f" expected={m['expected']:#x}",
                    table=m["table"],
                    table_gfn=m["table_gfn"],
                    index=m["index"],
                    expected=m["expected"],
                )
                for m in found
            ),
        )


__all__ = ["ShadowAudit"]
