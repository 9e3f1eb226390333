"""The seed thread's DMA debate, reproducible (DESIGN §1 DMA path, issue 6).

Paolo Bonzini's point: device DMA into guest memory does not go through the write
path, so KVM never tells page-track users (R4.7) and a shadow of a page written by DMA
goes stale. GVT-g's answer is a rule for the guest driver ("DMA to PPGTT is not
supported"); drivers/gpu/drm/i915/gvt/gtt.c and kvmgt.c neither follow nor refuse such a
DMA, so under GVT-g it bypasses the vGPU. pagetrack offers three policies: ``bypass``
(KVM and GVT-g), ``notify`` (an extension: deliver DMA as events with source DMA) and
``reject`` (an extension that enforces the guest-side rule). See docs/dma-debate.md.
"""

from __future__ import annotations

import pytest

from pagetrackd.domain import DmaPolicy, DmaRejected, Source, WritePath

from .vgpu_helpers import DATA_BASE, PD, PT, Sink, attach, entry_gpa, gfn_of, make_vm, pte, va_of

#: the DMA: entries 2, 3 and 4 of the leaf table, rewritten in one 24-byte transfer
NEW = [DATA_BASE + 200, DATA_BASE + 201, DATA_BASE + 202]
PAYLOAD = b"".join(pte(g).to_bytes(8, "little") for g in NEW)


def test_bypass_dma_leaves_the_shadow_stale_and_audit_reports_exactly_those_entries() -> None:
    """dma_policy=bypass: memory changes, nobody is told, the shadow still maps the old
    pages, and the audit names exactly the three entries, by GPU va and level."""
    vm = make_vm(leaves=8, dma_policy=DmaPolicy.BYPASS)
    vgpu = attach(vm)
    sink = Sink()
    vm.register_notifier(sink)
    result = vm.dma_write(entry_gpa(PT, 2), PAYLOAD)
    assert [p.path for p in result.pieces] == [WritePath.FAST]
    assert sink.events == [] and vgpu.status()["dma_events"] == 0
    assert vm.read(entry_gpa(PT, 2), 24) == PAYLOAD
    assert [gfn_of(vgpu, va_of(i)) for i in (2, 3, 4)] == [DATA_BASE + i for i in (2, 3, 4)]
    audit = vgpu.audit()
    assert [(m.address, m.level) for m in audit.mismatches] == [
        (va_of(2), 1), (va_of(3), 1), (va_of(4), 1)
    ]
    assert [m.guest for m in audit.mismatches] == [pte(g) for g in NEW]
    assert all(m.reason == "stale shadow entry" for m in audit.mismatches)


def test_bypass_dma_into_a_directory_reports_the_one_stale_link() -> None:
    """A DMA that relinks a PD entry: one stale level-2 entry; the old subtree is still
    checked against its own guest table and is fine."""
    vm = make_vm(leaves=4, dma_policy=DmaPolicy.BYPASS)
    vgpu = attach(vm)
    vm.dma_write(entry_gpa(PD, 0), pte(0x120).to_bytes(8, "little"))
    audit = vgpu.audit()
    assert [(m.address, m.level) for m in audit.mismatches] == [(0, 2)]


def test_bypass_is_undone_by_the_next_guest_write_to_the_entry() -> None:
    vm = make_vm(leaves=8, dma_policy=DmaPolicy.BYPASS)
    vgpu = attach(vm)
    vm.dma_write(entry_gpa(PT, 2), PAYLOAD)
    vm.write(0, entry_gpa(PT, 2), PAYLOAD[:8])  # the guest rewrites entry 2 itself
    assert [m.address for m in vgpu.audit().mismatches] == [va_of(3), va_of(4)]


def test_notify_dma_is_followed_and_the_audit_is_clean() -> None:
    """dma_policy=notify: the vGPU gets one event with source DMA and re-shadows every
    entry it covers, whatever its length (not a 4/8-byte guest write)."""
    vm = make_vm(leaves=8, dma_policy=DmaPolicy.NOTIFY)
    vgpu = attach(vm)
    sink = Sink()
    vm.register_notifier(sink)
    result = vm.dma_write(entry_gpa(PT, 2), PAYLOAD)
    assert [p.path for p in result.pieces] == [WritePath.EMULATED]
    assert [(e[2], e[3], e[4]) for e in sink.events] == [
        (entry_gpa(PT, 2), PAYLOAD, int(Source.DMA))
    ]
    s = vgpu.status()
    assert s["dma_events"] == 1 and s["ignored_writes"] == 0
    assert [gfn_of(vgpu, va_of(i)) for i in (2, 3, 4)] == NEW
    assert vgpu.audit().clean


def test_notify_dma_completes_a_pending_partial_entry() -> None:
    vm = make_vm(leaves=8, dma_policy=DmaPolicy.NOTIFY)
    vgpu = attach(vm, partial="flush")
    vm.write(0, entry_gpa(PT, 2), PAYLOAD[:4])
    assert vgpu.status()["pending"] == 1
    vm.dma_write(entry_gpa(PT, 2), PAYLOAD)
    assert vgpu.status()["pending"] == 0
    assert gfn_of(vgpu, va_of(2)) == NEW[0]
    assert vgpu.audit().clean


def test_reject_dma_fails_and_guest_memory_is_unchanged() -> None:
    """dma_policy=reject (pagetrack's, enforcing what GVT-g only asks of the guest
    driver: "DMA to PPGTT is not supported") -- the transfer is refused
    (FAILED_PRECONDITION on the wire), nothing is written, the shadow stays right."""
    vm = make_vm(leaves=8, dma_policy=DmaPolicy.REJECT)
    vgpu = attach(vm)
    before = vm.read(PT << 12, 4096)
    with pytest.raises(DmaRejected):
        vm.dma_write(entry_gpa(PT, 2), PAYLOAD)
    assert vm.read(PT << 12, 4096) == before
    assert vm.stats.dma_rejected == 1
    assert vgpu.audit().clean
    # DMA into an untracked data page is still fine.
    vm.dma_write(DATA_BASE << 12, b"pixels")
    assert vm.read(DATA_BASE << 12, 6) == b"pixels"


def test_reject_refuses_a_dma_that_only_partly_touches_a_table() -> None:
    vm = make_vm(leaves=8, dma_policy=DmaPolicy.REJECT)
    attach(vm)
    start = (PT << 12) - 8  # last 8 bytes of the PD's page... and into the PT
    before = vm.read(start, 16)
    with pytest.raises(DmaRejected):
        vm.dma_write(start, bytes(range(16)))
    assert vm.read(start, 16) == before
