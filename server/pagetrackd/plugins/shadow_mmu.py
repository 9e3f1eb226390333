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

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from pagetrackd.domain import (
    PAGE_SHIFT,
    FailedPrecondition,
    InvalidArgument,
    NotTracked,
    PageTrackError,
    Vm,
    WriteEvent,
)
from pagetrackd.domain.notifiers import NotifierNode
from pagetrackd.plugins.base import AuditReport, Mismatch
from pagetrackd.plugins.ops import ShadowRoot
from pagetrackd.plugins.x86_paging import (
    ACC_ALL,
    ACC_EXEC,
    ACC_USER,
    ACC_WRITE,
    ENTRY_BYTES,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    ROOT_LEVEL,
    canonical,
    check_gva,
    gpte_access,
    index,
    is_leaf,
    leaf_base_gfn,
    level_shift,
    pages_per,
    read_gpte,
    table_gfn,
    walk_guest,
)

log = structlog.get_logger("pagetrackd.plugins.shadow_mmu")

NAME = "shadow_mmu"
#: the owner id of the plugin's references, as the API names it (OwnerCount.id)
OWNER = "plugin:shadow-mmu"
#: detect_write_flooding: zapped at the 3rd write without an intervening use
FLOOD_THRESHOLD = 3
#: KVM_MMU_NUM_PREV_ROOTS: roots a vCPU keeps for a fast CR3 switch
NUM_PREV_ROOTS = 3
#: KVM_MIN_FREE_MMU_PAGES and KVM_REFILL_PAGES (``make_mmu_pages_available``)
MIN_FREE_PAGES = 5
REFILL_PAGES = 25
#: default ``n_max_mmu_pages``; KVM derives it from guest memory (20 per mille)
DEFAULT_MAX_SHADOW_PAGES = 4096
#: KVM_MIN_ALLOC_MMU_PAGES
MIN_SHADOW_PAGES = 64
#: a software-available SPTE bit marking a gfn that is not RAM (KVM's MMIO SPTE)
SPTE_MMIO = 1 << 58

_ZAP_REASONS = ("flooded", "misaligned", "unprotected", "region_removed", "evicted", "zap_all")


@dataclass(eq=False, slots=True)
class ShadowPage:
    """A shadow page (``struct kvm_mmu_page``): 512 SPTEs shadowing one guest table.

    ``gfn`` is the guest table's gfn, or for a *direct* page (part of a split guest
    large page) the first gfn it maps. ``access`` is the role's ACC_* bits granted by
    the levels above. Only present SPTEs are stored; a link to a child page is in
    both ``sptes`` and ``children``.
    """

    sp_id: int
    gfn: int
    level: int
    access: int
    direct: bool
    gva_base: int  #: gva bits above this page's span, from the walk that created it
    sptes: dict[int, int] = field(default_factory=dict)
    children: dict[int, ShadowPage] = field(default_factory=dict)
    #: (parent page, index) pairs whose SPTE links here (``parent_ptes``)
    parents: set[tuple[ShadowPage, int]] = field(default_factory=set)
    flood: int = 0  #: write_flooding_count
    root_count: int = 0
    accounted: bool = False  #: holds a track reference on ``gfn``
    valid: bool = True

    @property
    def key(self) -> tuple[int, int, int, bool]:
        """The lookup key: gfn and role (level, access, direct)."""
        return (self.gfn, self.level, self.access, self.direct)

    def gva_of(self, idx: int) -> int:
        """The first gva that entry ``idx`` translates (via the creating walk)."""
        return canonical(self.gva_base | (idx << level_shift(self.level)))


@dataclass(slots=True)
class _VcpuMmu:
    """One vCPU's MMU context: its CR3, current root and cached previous roots."""

    cr3_gfn: int | None = None
    root: ShadowPage | None = None
    prev: list[ShadowPage] = field(default_factory=list)
    last_retry: tuple[int, int] | None = None  #: (rip, addr) of the last unprotect-retry


def _link_spte(child: ShadowPage) -> int:
    """A non-leaf SPTE: full access (the leaf enforces the role's access), pointing at
    the child; ``gfn`` stands in for the child's host address so audits can read it."""
    return (child.gfn << PAGE_SHIFT) | PTE_P | PTE_RW | PTE_US


def _leaf_spte(gfn: int, level: int, access: int, writable: bool, mmio: bool) -> int:
    spte = (gfn << PAGE_SHIFT) | PTE_P
    if writable:
        spte |= PTE_RW
    if access & ACC_USER:
        spte |= PTE_US
    if not access & ACC_EXEC:
        spte |= PTE_NX
    if level > 1:
        spte |= PTE_PS
    if mmio:
        spte |= SPTE_MMIO
    return spte


def detect_write_misaligned(gpa: int, nbytes: int, pte_size: int = ENTRY_BYTES) -> bool:
    """``detect_write_misaligned`` (mmu.c, R7.3): a single byte at a pte-aligned offset
    is fine (the clear_bit ``andb`` idiom); otherwise a write that crosses a pte
    boundary or is shorter than 4 bytes is misaligned."""
    offset = gpa & 0xFFF
    if not offset & (pte_size - 1) and nbytes == 1:
        return False
    return bool((offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)) or nbytes < 4


def _parse_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise InvalidArgument(f"option {name!r} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"option {name!r} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidArgument(f"option {name!r} must be between {lo} and {hi}, got {value}")
    return value


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _parse_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidArgument(f"option {name!r} must be true or false, got {value!r}")


class ShadowMmu:
    """KVM's shadow MMU for one VM: shadow pages, write tracking of guest tables,
    zapping on guest writes, audits. Attach with ``root=<cr3 gpa>`` (optional)."""

    name = NAME
    external = False  #: KVM's MMU is the internal tracking user

    def __init__(self) -> None:
        self._vm: Vm | None = None
        self._node: NotifierNode | None = None
        self.flood_threshold = FLOOD_THRESHOLD
        self.flood_leaf = False
        self.max_shadow_pages = DEFAULT_MAX_SHADOW_PAGES
        self.released_gfns = 0  #: gfns untracked by the last detach
        self._reset_state()

    def _reset_state(self) -> None:
        self._next_id = 1
        #: every valid shadow page by id, oldest first (``active_mmu_pages``)
        self._sps: dict[int, ShadowPage] = {}
        self._hash: dict[tuple[int, int, int, bool], ShadowPage] = {}
        #: guest table gfn -> its (indirect) shadow pages (``mmu_page_hash`` by gfn)
        self._by_gfn: dict[int, list[ShadowPage]] = {}
        #: (level, first gfn) -> leaf SPTEs mapping it, as (page, index) (rmap)
        self._rmap: dict[tuple[int, int], set[tuple[ShadowPage, int]]] = {}
        self._vcpus: dict[int, _VcpuMmu] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "faults", "guest_faults", "hits", "emulated_faults", "shadow_pages_created",
                "emulations", "pte_writes", "pde_zapped", "sptes_zapped", "zapped",
                "unprotect_calls", "retries", "retries_refused", "untrack_errors",
                "audits", "audit_checked", "audit_mismatches", "write_protected",
                *_ZAP_REASONS,
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
        threshold = _parse_int(
            "flood_threshold", options.get("flood_threshold", FLOOD_THRESHOLD), 1, 1000
        )
        flood_leaf = _parse_bool("flood_leaf", options.get("flood_leaf", False))
        max_pages = _parse_int(
            "max_shadow_pages",
            options.get("max_shadow_pages", DEFAULT_MAX_SHADOW_PAGES),
            MIN_SHADOW_PAGES,
            1 << 20,
        )
        root = options.get("root", options.get("cr3"))
        vcpu = _parse_int("vcpu", options.get("vcpu", 0), 0, vm.vcpus - 1)
        self.flood_threshold = threshold
        self.flood_leaf = flood_leaf
        self.max_shadow_pages = max_pages
        self._vm = vm
        try:
            if root is not None:
                self._set_root(vcpu, _parse_int("root", root, 0, (1 << 64) - 1))
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

    # ------------------------------------------------------------------ shadow pages

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
        self._next_id += 1
        self._sps[sp.sp_id] = sp
        self._hash[sp.key] = sp
        self.counters["shadow_pages_created"] += 1
        if not direct:
            sp.accounted = True
            self._by_gfn.setdefault(gfn, []).append(sp)
            self._write_protect(gfn)
        return sp

    def _unhook(self, vm: Vm) -> None:
        if self._tracking_started in vm.track_start_hooks:
            vm.track_start_hooks.remove(self._tracking_started)

    def _tracking_started(self, gfns: list[int]) -> None:
        """Some user's add took these gfns' counters 0 -> 1 (R3.1): write-protect every
        SPTE mapping them (kvm_mmu_slot_gfn_write_protect, mmu.c)."""
        for gfn in gfns:
            self._write_protect(gfn)

    def _write_protect(self, gfn: int) -> None:
        """Clear W in every leaf SPTE that maps ``gfn``, at every level."""
        for level in (1, 2, 3):
            base = gfn & ~(pages_per(level) - 1)
            for sp, idx in self._rmap.get((level, base), ()):
                if sp.sptes[idx] & PTE_RW:
                    sp.sptes[idx] &= ~PTE_RW
                    self.counters["write_protected"] += 1

    def _link(self, sp: ShadowPage, idx: int, child: ShadowPage) -> None:
        sp.sptes[idx] = _link_spte(child)
        sp.children[idx] = child
        child.parents.add((sp, idx))

    def _set_leaf(self, sp: ShadowPage, idx: int, spte: int) -> None:
        self._drop_spte(sp, idx)
        sp.sptes[idx] = spte
        self._rmap.setdefault((sp.level, spte_gfn(spte)), set()).add((sp, idx))

    def _drop_spte(self, sp: ShadowPage, idx: int) -> bool:
        """``mmu_page_zap_pte``: clear one SPTE; a child page loses this parent (and
        stays, maybe orphaned); a leaf leaves the rmap. True if something was there."""
        spte = sp.sptes.pop(idx, None)
        if spte is None:
            return False
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

    # ------------------------------------------------------------------ roots

    def _vcpu(self, vcpu: object) -> _VcpuMmu:
        n = _parse_int("vcpu", vcpu, 0, self.vm.vcpus - 1)
        vc = self._vcpus.get(n)
        if vc is None:
            vc = self._vcpus[n] = _VcpuMmu()
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

    def _load_root(self, vc: _VcpuMmu) -> ShadowPage:
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

    # ------------------------------------------------------------------ faults

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
        return _leaf_spte(gfn, level, access, writable, mmio)

    def _lookup(
        self, vc: _VcpuMmu, gva: int, write: bool, user: bool
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

    def _fault(self, vc: _VcpuMmu, gva: int, write: bool, user: bool) -> dict[str, Any]:
        """``FNAME(page_fault)``: walk the guest tables, then ``FNAME(fetch)`` the shadow
        path, making shadow pages as needed and resetting the flood count of every
        page on the way (``clear_sp_write_flooding_count``)."""
        self.counters["faults"] += 1
        created = self.counters["shadow_pages_created"]
        self._make_room()
        root = self._load_root(vc)
        assert vc.cr3_gfn is not None
        gw = walk_guest(self.vm, vc.cr3_gfn, gva, write=write, user=user)
        if not gw.ok:
            self.counters["guest_faults"] += 1
            made = self.counters["shadow_pages_created"] - created
            return _result(present=False, fault=gw.fault, created=made)
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
        return _result(
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
        return _result(
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

    # ------------------------------------------------------------------ unprotect

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
            gfn = _parse_int("gfn", gfn, 0, self.vm.limits.gfn_limit - 1)
            addr = gfn << PAGE_SHIFT
        else:
            raise InvalidArgument("unprotect needs 'gfn' or 'gva'")
        if rip is not None:
            rip = _parse_int("rip", rip, 0, (1 << 64) - 1)
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

    def zap_all(self) -> int:
        """``kvm_mmu_zap_all``: zap every shadow page; returns how many."""
        n = 0
        for sp in list(self._sps.values()):
            if sp.valid:
                self._zap_sp(sp, "zap_all")
                n += 1
        return n

    # ------------------------------------------------------------------ audit

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
        expected = _leaf_spte(gfn, level, access, allowed, slot is None)
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
                _parse_int("vcpu", vcpu, 0, self.vm.vcpus - 1),
                _parse_int("cr3", cr3, 0, (1 << 64) - 1),
            )
        if op in ("translate", "fault"):
            gva = args.pop("gva", None)
            if gva is None:
                raise InvalidArgument(f"{op} needs 'gva'")
            write = _parse_bool("write", args.pop("write", False))
            user = _parse_bool("user", args.pop("user", False))
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


def spte_gfn(spte: int) -> int:
    """The gfn an SPTE maps or (for a link) the gfn its child shadows."""
    return (spte & 0x000F_FFFF_FFFF_F000) >> PAGE_SHIFT


def _result(
    *,
    present: bool,
    gva: int = 0,
    spte: int = 0,
    spte_level: int = 1,
    guest_level: int = 1,
    fault: str = "",
    faulted: bool = True,
    emulated: bool = False,
    created: int = 0,
) -> dict[str, Any]:
    """A translation result, in TranslateShadowResponse's words."""
    if not present:
        return {
            "present": False,
            "gpa": 0,
            "page_bytes": 0,
            "shadow_page_bytes": 0,
            "writable": False,
            "fault": fault,
            "faulted": faulted,
            "emulated": False,
            "shadow_pages_created": created,
        }
    shift = level_shift(spte_level)
    gpa = (spte_gfn(spte) << PAGE_SHIFT) | (gva & ((1 << shift) - 1))
    return {
        "present": True,
        "gpa": gpa,
        "page_bytes": 1 << level_shift(guest_level),
        "shadow_page_bytes": 1 << shift,
        "writable": bool(spte & PTE_RW),
        "fault": "",
        "faulted": faulted,
        "emulated": emulated,
        "shadow_pages_created": created,
    }


__all__ = ["OWNER", "ShadowMmu", "ShadowPage", "detect_write_misaligned", "spte_gfn"]
