"""Seq reservations made ahead: in a thread once half a block is used, and for every VM
in one write at start. A seq is never handed out past the mark that is on disk."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from pagetrackd.application import Engine
from pagetrackd.domain import SlotFlags, TenantId
from pagetrackd.seqs import MIN_BLOCK, SeqReservations

T = TenantId("acme")


def _on_disk(path: Path) -> int:
    marks = json.loads(path.read_bytes())["marks"]
    return max((m[2] for m in marks), default=0)


async def test_no_seq_is_handed_out_past_the_mark_on_disk(tmp_path: Path) -> None:
    """Writes run across several blocks; after every event the file holds a mark at or
    past its seq, and most blocks were reserved in the background."""
    seqs = SeqReservations(tmp_path / "seqs.json")
    e = Engine()
    e.on_vm_created.append(seqs.attach)
    vm = e.create_vm(T, "box").vm
    vm.set_memslot(0, 0, 16, SlotFlags.NONE)
    vm.track_add([0])
    for i in range(3 * MIN_BLOCK):
        vm.write(0, 8 * (i % 512), b"12345678")
        assert _on_disk(seqs.path) >= vm.seq
        if i % 64 == 0:
            await asyncio.sleep(0.001)  # let a background reservation finish
    assert seqs.background_writes >= 1


async def test_every_vm_gets_a_block_in_one_write_at_start(tmp_path: Path) -> None:
    """reserve_ahead gives each VM MIN_BLOCK seqs past its own in one file write, so
    their first writes after a restart do not each wait for one."""
    seqs = SeqReservations(tmp_path / "seqs.json")
    e = Engine()
    entries = [e.create_vm(T, f"vm{i}") for i in range(50)]
    for entry in entries:
        entry.vm.seq = 7
        seqs.attach(entry)
    seqs.reserve_ahead(entries)
    assert seqs.writes == 1
    assert all(seqs.mark(T, f"vm{i}") == 7 + MIN_BLOCK for i in range(50))
    assert all(entry.hub.history.seq_limit is not None
               and entry.hub.history.seq_limit > 7 for entry in entries)
