"""The vGPU's own RPCs (BuildPpgtt, SubmitVgpu, DestroyPpgtt) on a real daemon: a guest
driver builds a 4-level PPGTT with guest writes, the vGPU shadows it, a later tracked
write re-shadows an entry (drivers/gpu/drm/i915/gvt/gtt.c ppgtt_handle_guest_write_page_table)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import pagetrack
from tests.daemon_process import DaemonProcess, start_daemon

PRESENT_RW = 0b11
ROOT, PDP, PD, PT = 0x10, 0x11, 0x12, 0x13  # table gfns
DATA, DATA2 = 0x20, 0x21


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path, "--log-level", "warning")
    yield d
    assert d.stop() == 0


def _entry(pt: pagetrack.Client, table: int, index: int, gfn: int) -> None:
    value = (gfn << 12) | PRESENT_RW
    pt.write("g", (table << 12) + 8 * index, value.to_bytes(8, "little"))


def test_build_submit_rewrite_destroy(daemon: DaemonProcess) -> None:
    """Shadow a guest PPGTT, translate through it, follow a tracked entry write, drop it."""
    with pagetrack.Client(daemon.tcp) as pt:
        pt.create_vm("g")
        pt.set_memory_region("g", slot=0, base_gfn=0, npages=256)
        _entry(pt, ROOT, 0, PDP)
        _entry(pt, PDP, 0, PD)
        _entry(pt, PD, 0, PT)
        _entry(pt, PT, 1, DATA)  # GPU va 0x1000 -> gfn 0x20
        pt.attach_plugin("g", "vgpu")
        built = pt.build_ppgtt("g", ROOT << 12)
        assert built.shadow_tables == 4
        tracked = {s.gfn for s in pt.query_tracking("g", only_tracked=True)}
        assert tracked == {ROOT, PDP, PD, PT}
        sub = pt.submit_vgpu("g", built.ppgtt_id, [0x1234, 0x5008])
        assert sub.gpa[0] == (DATA << 12) | 0x234 and sub.scratch == (False, True)
        new_pte = ((DATA2 << 12) | PRESENT_RW).to_bytes(8, "little")
        result = pt.write("g", (PT << 12) + 8 * 5, new_pte)
        assert [p.path for p in result.pieces] == [pagetrack.WritePath.EMULATED]
        sub = pt.submit_vgpu("g", built.ppgtt_id, [0x5008])
        assert sub.gpa == ((DATA2 << 12) | 0x8,) and sub.scratch == (False,)
        assert pt.audit_plugin("g", "vgpu").mismatch_count == 0
        assert pt.destroy_ppgtt("g", built.ppgtt_id) == 4
        assert pt.query_tracking("g", only_tracked=True) == []


def test_bad_arguments_change_nothing(daemon: DaemonProcess) -> None:
    """Unaligned roots, 3-level tables, unknown options and ids are refused clearly."""
    with pagetrack.Client(daemon.tcp) as pt:
        pt.create_vm("g")
        pt.set_memory_region("g", slot=0, base_gfn=0, npages=64)
        pt.attach_plugin("g", "vgpu")
        for kwargs, text in (
            ({"root_gpa": 0x10010}, "not page aligned"),
            ({"root_gpa": 0x10000, "levels": 3}, "4-level"),
            ({"root_gpa": 0x10000, "options": {"x": "1"}}, "unknown BuildPpgtt options"),
        ):
            with pytest.raises(pagetrack.InvalidArgument, match=text):
                pt.build_ppgtt("g", **kwargs)
        with pytest.raises(pagetrack.PageTrackError):
            pt.submit_vgpu("g", 99, [])
        assert pt.query_tracking("g", only_tracked=True) == []
