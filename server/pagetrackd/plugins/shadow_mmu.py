"""The shadow MMU plugin: KVM's shadow paging as the internal write-tracking user.

The guest runs x86-64 4-level paging with its tables in guest memory. For every guest
table it walks, the plugin builds a *shadow page* (``struct kvm_mmu_page``) on demand,
when a translation or a simulated fault walks the tables (``FNAME(page_fault)`` ->
``FNAME(walk_addr)`` -> ``FNAME(fetch)``, ``arch/x86/kvm/mmu/paging_tmpl.h``), and
write-tracks the guest table page so every guest write to it is emulated and reaches
:meth:`ShadowMmu.track_write` (``kvm_mmu_track_write``, ``arch/x86/kvm/mmu/mmu.c``).

Rules followed from ``arch/x86/kvm/mmu/mmu.c`` (ids as in docs/kvm-rules.md):

* R3.1/R3.3 every user's tracking: the VM tells the plugin of each gfn whose counter
  goes 0 -> 1, whoever added it (tenant, lease, vGPU), inside the add, as KVM's
  ``__kvm_write_track_add_gfn`` calls ``kvm_mmu_slot_gfn_write_protect``; every SPTE
  mapping the gfn is made read-only, so the next guest write faults and is emulated.
  The fault path never installs a writable SPTE on a tracked gfn, and the audit checks
  every SPTE against the current counters.
* R4.8 the VM calls the plugin after every external notifier, whatever the attach order.

* R7.1 ``account_shadowed``: a new shadow page for guest table gfn G takes a track
  reference on G and write-protects existing SPTEs that map G. **Difference:** KVM
  takes a counter reference only for non-leaf tables (level > 4K) and lets leaf
  tables go *unsync* (writable, resynced on TLB flush). Unsync is not modelled, so
  here *every* shadowed table page, leaf or not, holds a counter reference under the
  owner ``plugin:shadow_mmu``: no guest write to a shadowed table ever slips by, and
  the audit can require zero mismatches at any moment.
* R7.2 ``kvm_mmu_track_write``: the written gpte is re-read from guest memory (the
  event's bytes are not trusted, R4.9). Long mode has CR4.PAE set, so a 4-byte write
  is widened to the aligned 8-byte gpte (``mmu_pte_write_fetch_gpte``); **difference:**
  not when it straddles two gptes (KVM would leave the second SPTE stale). For each
  shadow page of the gfn: a misaligned write or write flooding zaps the whole shadow
  page (which drops its track reference); otherwise exactly the written SPTE is zapped
  and refaults lazily (KVM zaps; it no longer updates SPTEs in place).
* R7.3 ``detect_write_misaligned``; R7.4 ``detect_write_flooding`` (threshold 3,
  level-1 pages exempt as in KVM, count reset whenever the page is used by the fault
  path or found by the shadow-page lookup); R7.5 ``get_written_sptes`` (8-byte gptes:
  one SPTE); R7.6 / R4.10 ``kvm_mmu_unprotect_page`` and the retry loop guard.
* R3.1 large pages: a guest 2M/1G page is mapped by a large SPTE only where the track
  pool allows it (``kvm_mmu_hugepage_adjust``) and the region lies in one memslot;
  otherwise it is split into *direct* shadow pages of smaller SPTEs.

Orphaned shadow pages (no parent left) stay, tracked, until flooding, a misaligned
write, unprotect or eviction removes them, as in KVM; ``max_shadow_pages`` plays
``n_max_mmu_pages`` (oldest pages zapped first, roots in use never).
"""

from __future__ import annotations

from typing import Any

import structlog

from pagetrackd.domain import (
    PAGE_SHIFT,
    InvalidArgument,
    PageTrackError,
    Vm,
    WriteEvent,
)
from pagetrackd.plugins.ops import ShadowRoot
from pagetrackd.plugins.shadow_audit import ShadowAudit
from pagetrackd.plugins.shadow_faults import ShadowFaults
from pagetrackd.plugins.shadow_pages import (
    DEFAULT_MAX_SHADOW_PAGES,
    FLOOD_THRESHOLD,
    MIN_SHADOW_PAGES,
    NAME,
    OWNER,
    ShadowPage,
    detect_write_misaligned,
    parse_bool,
    parse_int,
    spte_gfn,
)
from pagetrackd.plugins.x86_paging import ENTRY_BYTES, pages_per, read_gpte

log = structlog.get_logger("pagetrackd.plugins.shadow_mmu")


class ShadowMmu(ShadowFaults, ShadowAudit):
    """KVM's shadow MMU for one VM: shadow pages, write tracking of guest tables,
    zapping on guest writes, audits. Attach with ``root=<cr3 gpa>`` (optional)."""

    name = NAME
    external = False  #: KVM's MMU is the internal tracking user

    def attach(self, vm: Vm, **options: Any) -> None:
        """Register as a notifier of ``vm``. Options: ``root``/``cr3`` (gpa of the
        PML4, loaded for ``vcpu``, default 0), ``flood_threshold`` (1..1000, default 3),
        ``flood_leaf`` (also count level-1 pages; KVM does not), ``max_shadow_pages``."""
        if self._vm is not None:
            raise InvalidArgument("this shadow_mmu plugin is already attached")
        known = {"root", "cr3", "vcpu", "flood_threshold", "flood_leaf", "max_shadow_pages"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidArgument(
                f"unknown shadow_mmu option(s) {', '.join(unknown)};"
                f" known: {', '.join(sorted(known))}"
            )
        if "root" in options and "cr3" in options:
            raise InvalidArgument("give the root as either 'root' or 'cr3', not both")
        threshold = parse_int(
            "flood_threshold", options.get("flood_threshold", FLOOD_THRESHOLD), 1, 1000
        )
        flood_leaf = parse_bool("flood_leaf", options.get("flood_leaf", False))
        max_pages = parse_int(
            "max_shadow_pages",
            options.get("max_shadow_pages", DEFAULT_MAX_SHADOW_PAGES),
            MIN_SHADOW_PAGES,
            1 << 20,
        )
        root = options.get("root", options.get("cr3"))
        vcpu = parse_int("vcpu", options.get("vcpu", 0), 0, vm.vcpus - 1)
        self.flood_threshold = threshold
        self.flood_leaf = flood_leaf
        self.max_shadow_pages = max_pages
        self._vm = vm
        try:
            if root is not None:
                self._set_root(vcpu, parse_int("root", root, 0, (1 << 64) - 1))
        except PageTrackError:
            self._vm = None
            self._reset_state()
            raise
        self._node = vm.register_notifier(self)
        vm.track_start_hooks.append(self._tracking_started)
        log.info("plugin.attached", plugin=NAME, vm=vm.name, root=root)

    def detach(self) -> None:
        """Unregister, release every track reference the plugin holds, drop all state."""
        vm = self._vm
        if vm is None:
            return
        if self._node is not None:
            vm.unregister_notifier(self._node)
            self._node = None
        self._unhook(vm)
        self.released_gfns = vm.release_owner(OWNER) if not vm.closed else 0
        self._vm = None
        self._reset_state()
        log.info("plugin.detached", plugin=NAME, vm=vm.name, released_gfns=self.released_gfns)

    def vm_closed(self, vm: Vm) -> None:
        """The VM is deleted (its regions are already gone): forget everything."""
        self._unhook(vm)
        self._node = None
        self._vm = None
        self._reset_state()

    def _unhook(self, vm: Vm) -> None:
        if self._tracking_started in vm.track_start_hooks:
            vm.track_start_hooks.remove(self._tracking_started)

    def _tracking_started(self, gfns: list[int]) -> None:
        """Some user's add took these gfns' counters 0 -> 1 (R3.1): write-protect every
        SPTE mapping them (kvm_mmu_slot_gfn_write_protect, mmu.c)."""
        for gfn in gfns:
            self._write_protect(gfn)

    # ------------------------------------------------------------------ write path

    def track_write(self, vm: Vm, event: WriteEvent) -> None:
        """``kvm_mmu_track_write`` (R7.2): zap the written SPTE of every shadow page of
        the gfn, or the whole page when the write is misaligned or floods it."""
        self.counters["emulations"] += 1
        pages = self._by_gfn.get(event.gfn)
        if not pages:
            return
        gpa = event.gpa
        nbytes = len(event.data)
        if nbytes == 4 and (gpa & 7) <= 4:
            # mmu_pte_write_fetch_gpte: long mode has CR4.PAE set, so a 32-bit write of
            # half a 64-bit gpte is widened to the whole aligned gpte. Deliberate
            # difference: KVM widens any 4-byte write, so one that straddles two gptes
            # zaps only the first SPTE and leaves the second stale; here it stays a
            # 4-byte write and detect_write_misaligned zaps the page.
            gpa &= ~7
            nbytes = 8
        gentry = 0
        if nbytes == 8:
            gentry = read_gpte(vm, gpa) or 0  # re-read, R4.9
        self.counters["pte_writes"] += 1
        for sp in list(pages):
            if not sp.valid:
                continue
            if detect_write_misaligned(gpa, nbytes):
                self._zap_sp(sp, "misaligned")
                continue
            if self._detect_write_flooding(sp):
                self._zap_sp(sp, "flooded")
                continue
            # get_written_sptes: 8-byte gptes, exactly one SPTE
            if self._drop_spte(sp, (gpa & 0xFFF) // ENTRY_BYTES):
                self.counters["sptes_zapped"] += 1
            if gentry and sp.level > 1:
                self.counters["pde_zapped"] += 1

    def _detect_write_flooding(self, sp: ShadowPage) -> bool:
        """``detect_write_flooding`` (R7.4): level-1 pages are exempt in KVM (they may go
        unsync); others flood at the threshold-th write without an intervening use."""
        if sp.level == 1 and not self.flood_leaf:
            return False
        sp.flood += 1
        return sp.flood >= self.flood_threshold

    def track_remove_region(self, vm: Vm, base_gfn: int, npages: int) -> None:
        """The gfns ``[base_gfn, base_gfn + npages)`` are gone: drop the shadow pages of
        guest tables there (their references went with the slot: no untrack), direct
        pages over the range, and every SPTE mapping a gfn there."""
        end = base_gfn + npages
        for sp in list(self._sps.values()):
            if not sp.valid:
                continue
            if sp.direct:
                span = pages_per(sp.level + 1)
                if sp.gfn < end and sp.gfn + span > base_gfn:
                    self._zap_sp(sp, "region_removed")
            elif base_gfn <= sp.gfn < end:
                self._zap_sp(sp, "region_removed", untrack=False)
        for (level, gfn), entries in list(self._rmap.items()):
            if gfn < end and gfn + pages_per(level) > base_gfn:
                for sp, idx in list(entries):
                    self._drop_spte(sp, idx)


    # ------------------------------------------------------------------ status and calls

    def status(self) -> dict[str, int | str]:
        """Shadow pages, roots, tracking, faults, zaps by reason, audits; flat."""
        direct = sum(1 for sp in self._sps.values() if sp.direct)
        roots = {sp for vc in self._vcpus.values() for sp in (vc.root, *vc.prev) if sp}
        out: dict[str, int | str] = {
            "attached": int(self._vm is not None),
            "shadow_pages": len(self._sps),
            "shadow_pages_direct": direct,
            "roots": len(roots),
            "sptes": sum(len(sp.sptes) for sp in self._sps.values()),
            "tracked_gfns": len(self._by_gfn),
            "tracked_refs": sum(1 for sp in self._sps.values() if sp.accounted),
            "flood_threshold": self.flood_threshold,
            "max_shadow_pages": self.max_shadow_pages,
            "state_bytes": self.state_meter.bytes,
        }
        out.update(self.counters)
        out["cr3"] = " ".join(f"vcpu{r.vcpu}={r.cr3:#x}" for r in self.roots())
        return out

    def roots(self) -> list[ShadowRoot]:
        """Each vCPU's current root (CR3), by vCPU: what a restore loads again."""
        return [
            ShadowRoot(n, vc.cr3_gfn << PAGE_SHIFT)
            for n, vc in sorted(self._vcpus.items())
            if vc.cr3_gfn is not None
        ]

    def shadow_pages(self) -> list[dict[str, Any]]:
        """Every shadow page, oldest first: gfn, level, role, entries, flood count."""
        return [
            {
                "id": sp.sp_id,
                "gfn": sp.gfn,
                "level": sp.level,
                "access": sp.access,
                "direct": sp.direct,
                "entries": len(sp.sptes),
                "parents": len(sp.parents),
                "root_count": sp.root_count,
                "flood": sp.flood,
                "gva_base": sp.gva_base,
            }
            for sp in self._sps.values()
        ]

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Plugin operations:

        * ``set_root(cr3, vcpu=0)`` -> root_gfn, cached, shadow_pages
        * ``translate(gva, write=False, user=False, vcpu=0)`` and ``fault(...)`` ->
          present, gpa, page_bytes, shadow_page_bytes, writable, fault, faulted,
          emulated, shadow_pages_created
        * ``unprotect(gfn= | gva=, rip=None, vcpu=0)`` -> gfn, zapped, retry, tracked, reason
        * ``audit()`` -> checked, mismatch_count, mismatches (dicts: table, table_gfn,
          level, index, address, guest_entry, expected, actual, reason)
        * ``shadow_pages()`` -> pages; ``zap_all()`` -> zapped; ``status()`` -> status
        """
        _ = self.vm  # raises FailedPrecondition when not attached
        if op == "set_root":
            cr3 = args.pop("cr3", args.pop("root", None))
            if cr3 is None:
                raise InvalidArgument("set_root needs 'cr3' (gpa of the PML4 table)")
            vcpu = args.pop("vcpu", 0)
            self._no_more(op, args)
            return self._set_root(
                parse_int("vcpu", vcpu, 0, self.vm.vcpus - 1),
                parse_int("cr3", cr3, 0, (1 << 64) - 1),
            )
        if op in ("translate", "fault"):
            gva = args.pop("gva", None)
            if gva is None:
                raise InvalidArgument(f"{op} needs 'gva'")
            write = parse_bool("write", args.pop("write", False))
            user = parse_bool("user", args.pop("user", False))
            vcpu = args.pop("vcpu", 0)
            self._no_more(op, args)
            method = self.translate if op == "translate" else self.fault
            return method(gva, write=write, user=user, vcpu=vcpu)
        if op == "unprotect":
            gfn = args.pop("gfn", None)
            gva = args.pop("gva", None)
            rip = args.pop("rip", None)
            vcpu = args.pop("vcpu", 0)
            self._no_more(op, args)
            return self.unprotect(gfn, gva=gva, rip=rip, vcpu=vcpu)
        if op == "audit":
            self._no_more(op, args)
            checked, found = self._audit()
            return {"checked": checked, "mismatch_count": len(found), "mismatches": found}
        if op == "shadow_pages":
            self._no_more(op, args)
            return {"shadow_pages": self.shadow_pages()}
        if op == "zap_all":
            self._no_more(op, args)
            return {"zapped": self.zap_all()}
        if op == "status":
            self._no_more(op, args)
            return dict(self.status())
        raise InvalidArgument(
            f"unknown shadow_mmu op {op!r}; known: set_root, translate, fault, unprotect,"
            " audit, shadow_pages, zap_all, status"
        )

    @staticmethod
    def _no_more(op: str, args: dict[str, Any]) -> None:
        if args:
            raise InvalidArgument(f"{op}: unknown argument(s) {', '.join(sorted(args))}")


__all__ = ["OWNER", "ShadowMmu", "ShadowPage", "detect_write_misaligned", "spte_gfn"]
