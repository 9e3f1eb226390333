"""The vGPU under batched writes behaves as under writes one by one.

``write_batch`` hands each emulated piece to the vGPU through ``track_guest_write``
(no event object), where whole aligned PTE writes take an inlined path. The reference
here writes one by one into a vGPU that sends every write through the page-track
handler's layers (``_ppgtt_write_protection_handler``, ``_handle_guest_write``). The same
guest driver stream, applied both ways, must leave the same shadow, tracking, memory,
stats and event history.
"""

from __future__ import annotations

from typing import Any

import pytest

from pagetrackd.domain import PAGE_SHIFT, Vm
from pagetrackd.domain.hub import History, Stamped
from pagetrackd.plugins.vgpu import Vgpu, find_vgpu
from pagetrackd.workloads.gpu_driver import Control, WriteChunk
from pagetrackd.workloads.gpu_ppgtt import GpuPpgttWorkload

OPTS: dict[str, Any] = {
    "ppgtts": 3,
    "initial_mappings": 32,
    "updates_per_submit": 48,
    "churn_every": 5,
    "evict_fraction": 0.3,
    "table_pages": 256,
    "data_pages": 512,
}


class ReferenceVgpu(Vgpu):
    """A vGPU whose every guest write goes through the GVT page-track handler."""

    def track_guest_write(self, vm: Vm, seq: int, vcpu: int, gpa: int, data: bytes) -> None:
        gfn = gpa >> PAGE_SHIFT
        if gfn not in self._protect:
            self.stats.foreign_writes += 1
            return
        self.stats.writes += 1
        track = self._tracks.get(gfn)
        if track is None:
            self.stats.handler_errors += 1
            return
        track.handler(track.priv, gpa, len(data))


def shadow_state(vgpu: Vgpu) -> tuple[Any, ...]:
    spts = sorted(
        (s.mfn, s.gfn, s.level, s.refcount, tuple(s.entries), tuple(sorted(s.post.items())))
        for s in vgpu._spt_by_mfn.values()
    )
    return (
        sorted(vgpu.status().items()), spts, sorted(vgpu._dma.items()),
        sorted(vgpu.protect_table), vgpu.audit(),
    )


def run(batched: bool, seed: int, options: dict[str, Any], frames: int) -> tuple[Any, ...]:
    vm = Vm("b", vcpus=4)
    history = History()
    vm.register_notifier(history)
    workload = GpuPpgttWorkload(seed, options)
    if not batched:
        ReferenceVgpu().attach(vm, partial=options.get("partial", "flush"))
    workload.setup(vm)
    driver = workload.driver
    assert driver is not None
    while workload._frames < frames:
        workload._frame(driver)
        while driver.queue:
            item = driver.queue.popleft()
            if isinstance(item, Control):
                workload._control(vm, item)
                continue
            assert isinstance(item, WriteChunk)
            if batched:
                vm.write_batch(
                    item.gpa, [item.vcpu] * len(item.gpa), item.length, b"".join(item.data)
                )
            else:
                for gpa, data in zip(item.gpa, item.data, strict=True):
                    vm.write(item.vcpu, gpa, data)
    vgpu = find_vgpu(vm)
    assert vgpu is not None and isinstance(vgpu, ReferenceVgpu) == (not batched)
    events = [
        (it.batch.seq.tolist(), it.batch.gpa.tolist(), it.batch.length.tolist(), it.batch.data)
        for it in history.since(1, vm.seq) if isinstance(it, Stamped)
    ]
    seqs: list[int] = [s for e in events for s in e[0]]
    gpas: list[int] = [g for e in events for g in e[1]]
    flat = (seqs, gpas, b"".join(e[3] for e in events))
    memory = {
        (s.slot_id, page): vm.read(((s.base_gfn + page) << 12), 4096)
        for s in vm.memslots()
        for page in range(s.npages)
        if page < 256
    }
    stats = vm.stats
    return (
        shadow_state(vgpu), flat, memory, vm.seq, stats.pieces, stats.notifications,
        stats.notifier_errors, vm.tracked_gfns().tolist(),
    )


@pytest.mark.parametrize(
    ("seed", "extra"),
    [
        (1, {}),
        (2, {"split_fraction": 0.4, "partial": "halves"}),
        (3, {"split_fraction": 0.3, "violation_fraction": 0.1}),
    ],
)
def test_gpu_driver_stream_batched_equals_one_by_one(seed: int, extra: dict[str, Any]) -> None:
    options = {**OPTS, **extra}
    one_by_one = run(False, seed, options, 30)
    batched = run(True, seed, options, 30)
    assert batched[0] == one_by_one[0]  # the shadow first, for a readable failure
    assert batched == one_by_one
    assert one_by_one[3] > 1000
