"""Many watchers: 1,000 concurrent Watch streams over 100 VMs on one daemon, each getting
exactly its own VM's events, all of them, once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import DaemonProcess, start_daemon
from tests.waiting import HANG_S

VMS = 100
PER_VM = 10  #: streams per VM
CHANNELS = 10  #: client connections the streams are spread over
ROUNDS = 3  #: write rounds per VM, interleaved across VMs


def _events(i: int) -> int:
    """Events written to VM i per round (a different count for each VM)."""
    return 5 + i % 17


@pytest.fixture
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("many")
    # More VMs and streams than one tenant may have by default: raised as an operator would.
    config = tmp / "pagetrackd.toml"
    config.write_text(
        "[quotas]\nvms = 128\nwatchers = 1024\nhistory_bytes = 4294967296\n"
        "stream_queue_bytes = 8589934592\n"
    )
    d = start_daemon(tmp, "--config", str(config))
    yield d
    assert d.stop() == 0


async def _process(ch: grpc.aio.Channel) -> pb.ProcessInfo:
    return (await pbg.AdminServiceStub(ch).GetServerInfo(pb.GetServerInfoRequest())).process


async def _collect(stream: Any, vm_index: int, want: int) -> list[tuple[int, int, bytes]]:
    """(seq, gpa, data) of every event until ``want`` arrived; fails on anything else."""
    out: list[tuple[int, int, bytes]] = []
    while len(out) < want:
        msg = await stream.read()
        assert msg is not grpc.aio.EOF, f"vm {vm_index}: stream ended after {len(out)}"
        kind = msg.WhichOneof("kind")
        if kind == "progress":
            continue
        assert kind == "events", f"vm {vm_index}: unexpected {kind}"
        b = msg.events
        off = 0
        for seq, gpa, length in zip(b.seq, b.gpa, b.length, strict=True):
            out.append((seq, gpa, b.data[off : off + length]))
            off += length
    return out


async def test_thousand_streams_over_hundred_vms_each_get_their_own_events(
    daemon: DaemonProcess,
) -> None:
    """10 streams on each of 100 VMs, over 10 connections. Every VM gets its own number
    of writes in interleaved rounds, each carrying the VM's marker byte at a VM-specific
    gpa; every stream receives exactly its VM's events, seqs 1..n, nothing foreign, no
    gap. All 1,000 are counted as watchers while open and none is left afterwards."""
    channels = [
        grpc.aio.insecure_channel(daemon.tcp, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    try:
        admin = channels[0]
        base = await _process(admin)
        vms = pbg.VmServiceStub(admin)
        mem = pbg.MemoryServiceStub(admin)
        track = pbg.TrackingServiceStub(admin)
        names = [f"many-{i:03d}" for i in range(VMS)]
        for name in names:
            await vms.CreateVm(pb.CreateVmRequest(name=name))
            await mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=name, slot=0, npages=256))
            await track.AddTracking(
                pb.TrackingChangeRequest(vm=name, ranges=[pb.GfnRange(start=0, count=256)]))
        streams: list[tuple[int, Any]] = []
        for i, name in enumerate(names):
            for j in range(PER_VM):
                watch = pbg.WatchServiceStub(channels[(i * PER_VM + j) % CHANNELS])
                streams.append((i, watch.Watch(pb.WatchRequest(
                    vm=name, max_batch_delay_ms=1, heartbeat_interval_ms=60000))))
        regs = await asyncio.gather(*(s.read() for _, s in streams))
        assert all(r.HasField("registered") and r.registered.head_seq == 0 for r in regs)
        assert len({(i, r.registered.notifier_id) for (i, _), r in zip(streams, regs,
                                                                          strict=True)}) == 1000
        during = await _process(admin)
        assert during.watchers == base.watchers + VMS * PER_VM
        assert during.notifiers == base.notifiers + VMS * (PER_VM + 1)  # + each history
        readers = [
            asyncio.create_task(_collect(s, i, ROUNDS * _events(i))) for i, s in streams
        ]
        for r in range(ROUNDS):
            for i, name in enumerate(names):
                n = _events(i)
                gfn = (i * 7 + r * 31) % 256
                await mem.WriteGuestBatch(pb.WriteGuestBatchRequest(
                    vm=name, gpa=[(gfn << 12) + 8 * k for k in range(n)], vcpu=[0],
                    length=[8] * n, data=bytes([i]) * 8 * n))
        results = await asyncio.wait_for(asyncio.gather(*readers), HANG_S)
        for (i, _), got in zip(streams, results, strict=True):
            n = _events(i)
            assert [seq for seq, _, _ in got] == list(range(1, ROUNDS * n + 1)), i
            want_gpa = [
                (((i * 7 + r * 31) % 256) << 12) + 8 * k for r in range(ROUNDS) for k in range(n)
            ]
            assert [gpa for _, gpa, _ in got] == want_gpa, i
            assert all(data == bytes([i]) * 8 for _, _, data in got), i
        for _, s in streams:
            s.cancel()
        deadline = asyncio.get_running_loop().time() + HANG_S
        while True:
            now = await _process(admin)
            if (now.watchers, now.leases, now.tasks) == (base.watchers, base.leases, base.tasks):
                break
            assert asyncio.get_running_loop().time() < deadline, (base, now)
            await asyncio.sleep(0.1)
        assert now.notifiers == base.notifiers + VMS
    finally:
        for ch in channels:
            await ch.close()
