"""MemoryService against a real daemon: memslots, dirty log, guest writes, reads, DMA."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.integration.support import Api, expect_error, snapshot

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
SLOT0 = 0x100 << 12  # first byte of the fixture VM's slot 0 (64 pages, dirty-logged)
RO = 0x200 << 12  # first byte of its read-only slot 1
MMIO = 0x300 << 12  # in no slot


async def test_set_memory_region_create_move_flags_delete(api: Api, vm: str) -> None:
    """SetMemoryRegion reports CREATE, FLAGS_ONLY, MOVE, DELETE and no-op as KVM would."""
    req = pb.SetMemoryRegionRequest(vm=vm, slot=5, base_gfn=0x1000, npages=8)
    r = await api.mem.SetMemoryRegion(req)
    assert r.change == pb.MEMSLOT_CHANGE_CREATE
    assert (r.region.slot, r.region.base_gfn, r.region.npages) == (5, 0x1000, 8)
    assert (await api.mem.SetMemoryRegion(req)).change == pb.MEMSLOT_CHANGE_UNSPECIFIED
    req.log_dirty_pages = True
    r = await api.mem.SetMemoryRegion(req)
    assert r.change == pb.MEMSLOT_CHANGE_FLAGS_ONLY and r.region.log_dirty_pages
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x1001]))
    req.base_gfn = 0x2000
    r = await api.mem.SetMemoryRegion(req)
    assert r.change == pb.MEMSLOT_CHANGE_MOVE and r.old_base_gfn == 0x1000
    assert r.region.base_gfn == 0x2000 and r.region.tracked_gfns == 1  # 2016: counters kept
    q = await api.track.QueryTracking(pb.QueryTrackingRequest(vm=vm, gfns=[0x2001, 0x1001]))
    assert [g.counter for g in q.gfns] == [1, 0]
    r = await api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=vm, slot=5, npages=0))
    assert r.change == pb.MEMSLOT_CHANGE_DELETE
    assert (r.region.slot, r.region.base_gfn, r.region.npages) == (5, 0x2000, 8)
    regions = (await api.mem.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm=vm))).regions
    assert [(x.slot, x.base_gfn, x.npages, x.readonly) for x in regions] == [
        (0, 0x100, 64, False), (1, 0x200, 16, True),
    ]


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"slot": 509, "base_gfn": 0x5000, "npages": 1}, INVALID, "slot id 509"),
        ({"slot": 2**32 - 1, "base_gfn": 0x5000, "npages": 1}, INVALID, "slot id"),
        ({"slot": 7, "base_gfn": 2**40 - 1, "npages": 2}, INVALID, "gfn space"),
        ({"slot": 7, "base_gfn": 2**64 - 1, "npages": 2}, INVALID, "gfn space"),
        ({"slot": 7, "base_gfn": 0, "npages": 2**64 - 1}, INVALID, "gfn space"),
        ({"slot": 7, "base_gfn": 0x13F, "npages": 4}, INVALID, "overlap"),
        ({"slot": 0, "base_gfn": 0x100, "npages": 65}, INVALID, "change size"),
        ({"slot": 0, "base_gfn": 0x100, "npages": 64, "readonly": True}, INVALID, "READONLY"),
        ({"slot": 9, "npages": 0}, grpc.StatusCode.NOT_FOUND, "slot 9"),
    ],
)
async def test_set_memory_region_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, Any], code: grpc.StatusCode, needle: str
) -> None:
    """Bad slot ids, ranges, overlaps, size changes and missing slots are refused with
    a message naming the problem, and nothing changes."""
    before = await snapshot(api, vm)
    await expect_error(
        api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=vm, **fields)), code, needle
    )
    assert await snapshot(api, vm) == before


async def test_get_dirty_log_returns_kvm_layout_and_clears(api: Api, vm: str) -> None:
    """GetDirtyLog returns a little-endian bitmap of written pages, then clears it."""
    for page in (0, 3, 63):
        await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0 + page * 4096, data=b"d"))
    log = await api.mem.GetDirtyLog(pb.GetDirtyLogRequest(vm=vm, slot=0))
    assert (log.slot, log.base_gfn, log.npages, log.dirty_count) == (0, 0x100, 64, 3)
    bits = np.unpackbits(np.frombuffer(log.bitmap, dtype=np.uint8), bitorder="little")
    assert len(log.bitmap) == 8 and np.flatnonzero(bits).tolist() == [0, 3, 63]
    again = await api.mem.GetDirtyLog(pb.GetDirtyLogRequest(vm=vm, slot=0))
    assert again.dirty_count == 0 and again.bitmap == bytes(8)


async def test_get_dirty_log_refuses_bad_slots(api: Api, vm: str) -> None:
    """A missing slot is NOT_FOUND, a slot without dirty logging FAILED_PRECONDITION."""
    before = await snapshot(api, vm)
    await expect_error(
        api.mem.GetDirtyLog(pb.GetDirtyLogRequest(vm=vm, slot=2**32 - 1)),
        grpc.StatusCode.NOT_FOUND, "slot",
    )
    await expect_error(
        api.mem.GetDirtyLog(pb.GetDirtyLogRequest(vm=vm, slot=1)), PRECONDITION,
        "LOG_DIRTY_PAGES",
    )
    assert await snapshot(api, vm) == before


async def test_write_guest_takes_each_path(api: Api, vm: str) -> None:
    """Untracked RAM is FAST, tracked is EMULATED with a seq, no slot or read-only is
    MMIO_EXIT (not written); a write crossing a page is two pieces, both emulated when
    either page is tracked (R4.3, arch/x86/kvm/x86.c emulator_write_phys)."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x101]))
    r = await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, vcpu=3, gpa=SLOT0 + 4090,
                                                      data=b"0123456789ab"))
    assert [(p.gpa, p.length, p.path, p.HasField("seq")) for p in r.pieces] == [
        (SLOT0 + 4090, 6, pb.WRITE_PATH_EMULATED, True),
        (SLOT0 + 4096, 6, pb.WRITE_PATH_EMULATED, True),
    ]
    assert [p.seq for p in r.pieces] == [1, 2] and r.cycles == 3000  # 2 x default 1500
    r = await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0 + 3 * 4096, data=b"ok"))
    assert [p.path for p in r.pieces] == [pb.WRITE_PATH_FAST] and r.cycles == 0
    r = await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=MMIO, data=b"zz"))
    assert [p.path for p in r.pieces] == [pb.WRITE_PATH_MMIO_EXIT] and r.cycles == 5000
    r = await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=RO, data=b"zz"))
    assert [p.path for p in r.pieces] == [pb.WRITE_PATH_MMIO_EXIT]
    got = await api.mem.ReadGuest(pb.ReadGuestRequest(vm=vm, gpa=SLOT0 + 4090, length=12))
    assert got.data == b"0123456789ab"
    assert (await api.mem.ReadGuest(pb.ReadGuestRequest(vm=vm, gpa=RO, length=2))).data == (
        b"\0\0"
    )
    stats = (await api.admin.GetStats(pb.GetStatsRequest(vm=vm))).vms[0]
    assert (stats.writes.fast, stats.writes.emulated, stats.writes.mmio_exit) == (1, 2, 2)
    assert stats.guest_writes == 4 and stats.head_seq == 2


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"vcpu": 8, "gpa": SLOT0, "data": b"x"}, "vcpu 8"),
        ({"vcpu": 2**32 - 1, "gpa": SLOT0, "data": b"x"}, "vcpu"),
        ({"gpa": SLOT0, "data": b""}, "at least one byte"),
        ({"gpa": SLOT0, "data": b"x" * ((1 << 20) + 1)}, "at most"),
        ({"gpa": 2**64 - 1, "data": b"xy"}, "address space"),
        ({"gpa": (1 << 52) - 1, "data": b"xy"}, "address space"),
    ],
)
async def test_write_guest_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, object], needle: str
) -> None:
    """Bad vcpu, empty or oversized data and gpa overflow are INVALID_ARGUMENT; nothing
    is written or counted."""
    before = await snapshot(api, vm)
    await expect_error(
        api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, **fields)),  # type: ignore[arg-type]
        INVALID, needle,
    )
    assert await snapshot(api, vm) == before


async def test_compare_exchange_notifies_only_when_it_exchanges(api: Api, vm: str) -> None:
    """R4.5 through the API: on a tracked page a failed compare stores nothing, makes no
    event and returns the current value; a matching one stores and makes an event the
    stream receives; a 16-byte exchange is done as a write (x86.c
    emulator_cmpxchg_emulated)."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x101]))
    gpa = SLOT0 + 4096 + 64
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=gpa, data=b"AAAAAAAA"))  # seq 1
    stream: Any = api.watch.Watch(pb.WatchRequest(vm=vm, max_batch_delay_ms=0))
    assert (await stream.read()).WhichOneof("kind") == "registered"
    req = pb.CompareExchangeGuestRequest(vm=vm, vcpu=2, gpa=gpa, expected=b"BBBBBBBB",
                                         desired=b"CCCCCCCC")
    r = await api.mem.CompareExchangeGuest(req)
    assert (r.exchanged, r.current, r.as_write) == (False, b"AAAAAAAA", False)
    assert [(p.path, p.HasField("seq")) for p in r.pieces] == [(pb.WRITE_PATH_EMULATED, False)]
    req.expected = b"AAAAAAAA"
    r = await api.mem.CompareExchangeGuest(req)
    assert (r.exchanged, r.current, r.pieces[0].seq, r.cycles) == (True, b"AAAAAAAA", 2, 1500)
    msg = await stream.read()
    assert list(msg.events.seq) == [2] and msg.events.data == b"CCCCCCCC"
    assert list(msg.events.vcpu) == [2]
    stream.cancel()
    got = await api.mem.ReadGuest(pb.ReadGuestRequest(vm=vm, gpa=gpa, length=8))
    assert got.data == b"CCCCCCCC"
    r = await api.mem.CompareExchangeGuest(pb.CompareExchangeGuestRequest(
        vm=vm, gpa=gpa, expected=bytes(16), desired=b"D" * 16))
    assert (r.exchanged, r.as_write, r.current) == (True, True, b"")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"gpa": SLOT0, "expected": b"ab", "desired": b"abcd"}, "same number of bytes"),
        ({"gpa": SLOT0, "expected": b"", "desired": b""}, "at least one byte"),
        ({"vcpu": 8, "gpa": SLOT0, "expected": b"a", "desired": b"b"}, "vcpu 8"),
        ({"gpa": 2**64 - 1, "expected": b"a", "desired": b"b"}, "address space"),
    ],
)
async def test_compare_exchange_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, object], needle: str
) -> None:
    """Mismatched sizes, no bytes, a bad vcpu or gpa are INVALID_ARGUMENT; nothing changes."""
    before = await snapshot(api, vm)
    await expect_error(
        api.mem.CompareExchangeGuest(
            pb.CompareExchangeGuestRequest(vm=vm, **fields)  # type: ignore[arg-type]
        ),
        INVALID, needle,
    )
    assert await snapshot(api, vm) == before


async def test_write_guest_batch_applies_in_order_with_pieces(api: Api, vm: str) -> None:
    """A batch is applied in order; counts, seqs and per-piece columns match."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x102, 0x103]))
    gpas = [SLOT0 + 2 * 4096, SLOT0 + 3 * 4096 - 2, MMIO, SLOT0]
    lengths = [4, 4, 2, 1]
    data = b"AAAA" + b"BBBB" + b"CC" + b"D"
    r = await api.mem.WriteGuestBatch(
        pb.WriteGuestBatchRequest(vm=vm, gpa=gpas, vcpu=[0, 1, 2, 3], length=lengths,
                                  data=data, want_pieces=True)
    )
    assert r.writes == 4
    assert (r.pieces.mmio_exit, r.pieces.fast, r.pieces.emulated) == (1, 1, 3)
    assert (r.first_seq, r.last_seq) == (1, 3)
    assert list(r.piece_path) == [
        pb.WRITE_PATH_EMULATED, pb.WRITE_PATH_EMULATED, pb.WRITE_PATH_EMULATED,
        pb.WRITE_PATH_MMIO_EXIT, pb.WRITE_PATH_FAST,
    ]
    assert list(r.piece_write) == [0, 1, 1, 2, 3]
    assert r.cycles == 3 * 1500 + 5000
    got = await api.mem.ReadGuest(pb.ReadGuestRequest(vm=vm, gpa=SLOT0 + 2 * 4096, length=4))
    assert got.data == b"AAAA"
    got = await api.mem.ReadGuest(pb.ReadGuestRequest(vm=vm, gpa=SLOT0 + 3 * 4096 - 2,
                                                      length=6))
    assert got.data == b"BBBB\0\0"
    plain = await api.mem.WriteGuestBatch(
        pb.WriteGuestBatchRequest(vm=vm, gpa=[SLOT0], vcpu=[0], length=[1], data=b"E")
    )
    assert not plain.HasField("first_seq") and not plain.piece_path


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"gpa": [SLOT0, SLOT0], "vcpu": [0], "length": [1], "data": b"x"}, "length"),
        ({"gpa": [SLOT0], "vcpu": [0], "length": [1, 1], "data": b"xx"}, "length"),
        ({"gpa": [SLOT0] * 3, "vcpu": [0, 0], "length": [1] * 3, "data": b"xyz"}, "vcpu"),
        ({"gpa": [SLOT0], "vcpu": [], "length": [1], "data": b"x"}, "vcpu"),
        ({"gpa": [SLOT0, SLOT0], "vcpu": [0], "length": [4, 4], "data": b"x"}, "data"),
        ({"gpa": [SLOT0], "vcpu": [0], "length": [1], "data": b"xy"}, "data"),
        ({"gpa": [SLOT0], "vcpu": [0], "length": [0], "data": b""}, "bytes"),
        ({"gpa": [SLOT0], "vcpu": [0], "length": [2**32 - 1], "data": b"x"}, "bytes"),
        ({"gpa": [SLOT0, 2**64 - 1], "vcpu": [0], "length": [1, 1], "data": b"xy"}, "address"),
        ({"gpa": [2**63 - 2], "vcpu": [0], "length": [4], "data": b"wxyz"}, "address"),
        ({"gpa": [(1 << 52) - 2], "vcpu": [0], "length": [4], "data": b"wxyz"}, "address"),
        ({"gpa": [SLOT0], "vcpu": [8], "length": [1], "data": b"x"}, "vcpu"),
        ({"gpa": [SLOT0, SLOT0], "vcpu": [0, 2**32 - 1], "length": [1, 1], "data": b"xy"},
         "vcpu"),
        ({"gpa": [], "vcpu": [], "length": [], "data": b""}, "at least one write"),
    ],
)
async def test_write_guest_batch_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, object], needle: str
) -> None:
    """Mismatched columns, short or long data, bad lengths, gpa overflow and bad vcpus
    are INVALID_ARGUMENT naming the problem; no write of the batch lands."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x100]))
    before = await snapshot(api, vm)
    await expect_error(
        api.mem.WriteGuestBatch(pb.WriteGuestBatchRequest(vm=vm, **fields)),  # type: ignore[arg-type]
        INVALID, needle,
    )
    assert await snapshot(api, vm) == before


async def test_read_guest_reads_zeros_and_reports_mmio(api: Api, vm: str) -> None:
    """Never-written pages read as zeros; a range outside every slot reads as zeros and
    is listed in ``mmio``."""
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=SLOT0 + 64 * 4096 - 1, data=b"Z"))
    got = await api.mem.ReadGuest(
        pb.ReadGuestRequest(vm=vm, gpa=SLOT0 + 64 * 4096 - 2, length=4)
    )
    assert got.data == b"\0Z\0\0"
    assert [(m.gpa, m.length) for m in got.mmio] == [(SLOT0 + 64 * 4096, 2)]
    inside = await api.mem.ReadGuest(pb.ReadGuestRequest(vm=vm, gpa=SLOT0, length=8))
    assert inside.data == bytes(8) and not inside.mmio


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"gpa": SLOT0, "length": 0}, "length"),
        ({"gpa": SLOT0, "length": (1 << 20) + 1}, "length"),
        ({"gpa": SLOT0, "length": 2**32 - 1}, "length"),
        ({"gpa": 2**64 - 1, "length": 4}, "address space"),
    ],
)
async def test_read_guest_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, int], needle: str
) -> None:
    """A zero or oversized length and an address past the gfn space are INVALID_ARGUMENT."""
    await expect_error(api.mem.ReadGuest(pb.ReadGuestRequest(vm=vm, **fields)), INVALID, needle)


async def test_dma_write_by_policy(api: Api, vm: str) -> None:
    """BYPASS writes a tracked page silently, NOTIFY makes an event, REJECT refuses
    and writes nothing; untracked pages are APPLIED in every policy."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x100]))
    r = await api.mem.DmaWrite(pb.DmaWriteRequest(vm=vm, gpa=SLOT0 + 4094, data=b"wxyz"))
    assert [(p.path, p.length) for p in r.pieces] == [
        (pb.DMA_PATH_BYPASSED, 2), (pb.DMA_PATH_APPLIED, 2),
    ]
    assert (await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.head_seq == 0
    await api.vm.SetVmPolicy(pb.SetVmPolicyRequest(vm=vm, dma_policy=pb.DMA_POLICY_NOTIFY))
    r = await api.mem.DmaWrite(pb.DmaWriteRequest(vm=vm, gpa=SLOT0, data=b"n"))
    assert [(p.path, p.seq) for p in r.pieces] == [(pb.DMA_PATH_NOTIFIED, 1)]
    await api.vm.SetVmPolicy(pb.SetVmPolicyRequest(vm=vm, dma_policy=pb.DMA_POLICY_REJECT))
    before = await snapshot(api, vm, stats=False)
    await expect_error(
        api.mem.DmaWrite(pb.DmaWriteRequest(vm=vm, gpa=SLOT0 + 4094, data=b"rrrr")),
        PRECONDITION, "reject",
    )
    assert await snapshot(api, vm, stats=False) == before
    stats = (await api.admin.GetStats(pb.GetStatsRequest(vm=vm))).vms[0]
    assert stats.dma.rejected == 1 and stats.dma.notified == 1
    r = await api.mem.DmaWrite(pb.DmaWriteRequest(vm=vm, gpa=SLOT0 + 8192, data=b"ok"))
    assert [p.path for p in r.pieces] == [pb.DMA_PATH_APPLIED]


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"gpa": SLOT0, "data": b""}, INVALID, "at least one byte"),
        ({"gpa": SLOT0, "data": b"x" * ((1 << 20) + 1)}, INVALID, "at most"),
        ({"gpa": 2**64 - 1, "data": b"xy"}, INVALID, "address space"),
        ({"gpa": SLOT0 + 64 * 4096 - 1, "data": b"xy"}, PRECONDITION, "nothing was written"),
        ({"gpa": RO, "data": b"xy"}, PRECONDITION, "nothing was written"),
    ],
)
async def test_dma_write_refuses_bad_fields(
    api: Api, vm: str, fields: dict[str, object], code: grpc.StatusCode, needle: str
) -> None:
    """Empty, oversized, overflowing and partly unmapped DMA writes are refused whole."""
    before = await snapshot(api, vm)
    await expect_error(
        api.mem.DmaWrite(pb.DmaWriteRequest(vm=vm, **fields)),  # type: ignore[arg-type]
        code, needle,
    )
    assert await snapshot(api, vm) == before


@pytest.mark.parametrize(
    "call",
    ["SetMemoryRegion", "ListMemoryRegions", "GetDirtyLog", "WriteGuest", "WriteGuestBatch",
     "CompareExchangeGuest", "ReadGuest", "DmaWrite"],
)
async def test_memory_calls_on_unknown_vm_are_not_found(api: Api, call: str) -> None:
    """Every MemoryService call names the unknown VM in a NOT_FOUND."""
    request_type = getattr(pb, f"{call}Request")
    await expect_error(
        getattr(api.mem, call)(request_type(vm="ghost-vm")), grpc.StatusCode.NOT_FOUND,
        "ghost-vm",
    )
