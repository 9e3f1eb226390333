"""The vGPU's status and audit: the shadow against a fresh read of guest memory."""

from __future__ import annotations

from pagetrackd.domain import PAGE_SHIFT
from pagetrackd.plugins.base import AuditReport, Mismatch
from pagetrackd.plugins.vgpu_shadow import VgpuShadow
from pagetrackd.plugins.vgpu_tables import (
    ADDR_MASK,
    ENTRIES,
    FLAGS_MASK,
    PTE_PRESENT,
    Spt,
    level_shift,
)


class VgpuAudit(VgpuShadow):
    """Status and audit of the shadow."""

    def status(self) -> dict[str, int | str]:
        """Counters and sizes of the shadow, flat. The names the API documents:
        ``shadow_tables`` (guest tables shadowed, each write-tracked), ``pending_partial``
        (entries whose 4-byte write waits for the flush, R8.7), ``scratch_entries``
        (present shadow entries pointing at a scratch page: pending partials and entries
        naming gfns outside the memslots) and ``violations``."""
        s = self.stats
        entries = self.mapped_entries
        pending = 0
        on_scratch = self.scratch_entries
        for spt in self._post_list.values():  # every spt with pending entries
            on_scratch += sum(
                1 for i in spt.post if not spt.entries[i] & PTE_PRESENT
            )  # a pending entry whose guest flags are not present still sits on scratch
            pending += len(spt.post)
        return {
            "vm": "" if self.vm is None else self.vm.name,
            "attached": int(self.vm is not None),
            "partial_mode": self.partial,
            "missing_table": self.missing_table,
            "ppgtts": len(self._mms),
            "shadow_tables": len(self._spt_by_mfn),
            "shadowed_tables": len(self._spt_by_mfn),
            "shadow_entries": entries,
            "scratch_entries": on_scratch,
            "dma_mapped_pages": len(self._dma),
            "protected_gfns": len(self._protect),
            "pending_partial": pending,
            "pending": pending,
            "writes": s.writes,
            "foreign_writes": s.foreign_writes,
            "full_writes": s.full_writes,
            "partial_writes": s.partial_writes,
            "completed_partials": s.completed_partials,
            "flushed_entries": s.flushed_entries,
            "ignored_writes": s.ignored_writes,
            "misaligned_writes": s.misaligned_writes,
            "dma_events": s.dma_events,
            "violations": s.violations,
            "type_conflicts": s.type_conflicts,
            "handler_errors": s.handler_errors,
            "submissions": s.submissions,
            "scratch_batches": s.scratch_batches,
            "spts_created": s.spts_created,
            "spts_freed": s.spts_freed,
            "regions_removed": s.regions_removed,
            "quota_refusals": s.quota_refusals,
            "state_bytes": self.state_meter.bytes,
        }

    def audit(self) -> AuditReport:
        """Compare every shadow entry with what guest memory says now.

        The walk starts at each PPGTT root and follows the shadow (what the GPU would
        use); every shadow table reached is compared entry by entry with a fresh read
        of the guest table it shadows, so a stale entry is reported once, with the GPU
        va it translates, and its subtree is still checked. Pending entries (R8.7) must
        point at the scratch page and are otherwise skipped. Shadow tables that no
        root reaches are reported as orphans."""
        if self.vm is None:
            return AuditReport(0)
        mismatches: list[Mismatch] = []
        seen: set[int] = set()
        checked = 0
        for mm in self._mms.values():
            if mm.root is None:
                continue
            stack: list[tuple[Spt, int]] = [(mm.root, 0)]
            while stack:
                spt, base_va = stack.pop()
                if spt.mfn in seen:
                    continue
                seen.add(spt.mfn)
                checked += self._audit_table(spt, base_va, mismatches, stack)
        for spt in self._spt_by_mfn.values():
            if spt.mfn not in seen:
                mismatches.append(
                    Mismatch(spt.gfn << PAGE_SHIFT, spt.level, spt.mfn << PAGE_SHIFT, 0,
                             "orphan shadow table: no PPGTT root reaches it",
                             table="ppgtt", table_gfn=spt.gfn)
                )
        mismatches.sort(key=lambda m: (m.address, -m.level))
        return AuditReport(checked, tuple(mismatches))

    def _audit_table(
        self, spt: Spt, base_va: int, mismatches: list[Mismatch], stack: list[tuple[Spt, int]]
    ) -> int:
        """Compare one shadow table with the guest table it shadows; push the child
        tables the shadow points at. Returns the entries checked."""
        guest = self._read_table(spt.gfn)
        shift = level_shift(spt.level)
        if guest is None:
            mismatches.append(
                Mismatch(base_va, spt.level, spt.mfn << PAGE_SHIFT, 0,
                         f"guest table gfn {spt.gfn:#x} is in no memslot",
                         table="ppgtt", table_gfn=spt.gfn)
            )
            return 0
        scratch = self.scratch[spt.level]
        for index in range(ENTRIES):
            se = spt.entries[index]
            ge = guest[index]
            va = base_va | (index << shift)
            if index in spt.post:
                if (se & ADDR_MASK) >> PAGE_SHIFT != scratch:
                    mismatches.append(
                        Mismatch(va, spt.level, se, ge, "pending entry not at scratch",
                                 table="ppgtt", table_gfn=spt.gfn, index=index,
                                 expected=(se & FLAGS_MASK) | (scratch << PAGE_SHIFT))
                    )
                continue
            expected = self._expected(spt.level, ge)
            if expected != se:
                reason = "stale shadow entry"
                if (
                    spt.level > 1 and ge & PTE_PRESENT and self.missing_table == "fail"
                    and not self._valid_gfn((ge & ADDR_MASK) >> PAGE_SHIFT)
                ):
                    reason = ("shadowing failed: the guest entry names a table in no"
                              " memslot, the shadow keeps its old entry (gtt.c)")
                mismatches.append(
                    Mismatch(va, spt.level, se, ge, reason, table="ppgtt",
                             table_gfn=spt.gfn, index=index, expected=expected)
                )
            # Descend along the shadow (what the GPU walks), stale or not: each spt
            # is compared with the guest table it shadows.
            frame = (se & ADDR_MASK) >> PAGE_SHIFT
            if spt.level > 1 and se & PTE_PRESENT and frame != scratch:
                child = self._spt_by_mfn.get(frame)
                if child is None:
                    mismatches.append(
                        Mismatch(va, spt.level, se, ge, "shadow points at a freed table",
                                 table="ppgtt", table_gfn=spt.gfn, index=index,
                                 expected=expected)
                    )
                else:
                    stack.append((child, va))
        return ENTRIES

    def _expected(self, level: int, ge: int) -> int | None:
        """The shadow entry a fresh shadowing of guest entry ``ge`` would give, using
        the spts and DMA mappings that exist now; None if none exists (stale)."""
        if not ge & PTE_PRESENT:
            return self._scratch_entry(level)
        gfn = (ge & ADDR_MASK) >> PAGE_SHIFT
        flags = ge & FLAGS_MASK
        scratch = (self._scratch_entry(level)) | flags
        if not self._valid_gfn(gfn):
            return scratch
        if level > 1:
            track = self._tracks.get(gfn)
            if track is None:
                return None
            if track.priv.level != level - 1:
                return scratch
            return (track.priv.mfn << PAGE_SHIFT) | flags
        dma = self._dma.get(gfn)
        return None if dma is None else (dma[0] << PAGE_SHIFT) | flags


__all__ = ["VgpuAudit"]
