"""Helpers shared by the stream tests: a VM with tracked pages and a background writer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg

TRACKED = 512  #: gfns 0..TRACKED-1 are tracked by setup_vm
BATCH = 256  #: writes per WriteGuestBatch of the background writer


async def setup_vm(
    ch: grpc.aio.Channel, vm: str, options: pb.VmOptions | None = None
) -> None:
    """A VM with one 4096-page slot and gfns 0..TRACKED-1 tracked by the tenant."""
    await pbg.VmServiceStub(ch).CreateVm(pb.CreateVmRequest(name=vm, options=options))
    await pbg.MemoryServiceStub(ch).SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=vm, slot=0, npages=4096)
    )
    await pbg.TrackingServiceStub(ch).AddTracking(
        pb.TrackingChangeRequest(vm=vm, ranges=[pb.GfnRange(start=0, count=TRACKED)])
    )


@contextlib.asynccontextmanager
async def writing(
    target: str, vm: str, in_flight: int = 2, pause: float = 0.0, length: int = 8
) -> AsyncIterator[list[int]]:
    """Tracked writes of ``length`` bytes (at most a page) on their own channel,
    ``in_flight`` batches of BATCH at a time (each followed by ``pause`` seconds), until
    the block exits. Yields a one-element
    list counting the writes made so far; the first batch has landed when it yields."""
    made = [0]
    stop = asyncio.Event()
    landed = asyncio.Event()
    rng = np.random.default_rng(11)
    gpa = (rng.integers(0, TRACKED, BATCH) << 12).tolist()
    req = pb.WriteGuestBatchRequest(vm=vm, gpa=gpa, vcpu=[1], length=[length] * BATCH,
                                    data=b"\x11" * length * BATCH)
    async with grpc.aio.insecure_channel(target) as ch:
        mem = pbg.MemoryServiceStub(ch)

        async def loop() -> None:
            while not stop.is_set():
                await mem.WriteGuestBatch(req)
                made[0] += BATCH
                landed.set()
                if pause:
                    await asyncio.sleep(pause)

        tasks = [asyncio.create_task(loop()) for _ in range(in_flight)]
        try:
            await landed.wait()
            yield made
        finally:
            stop.set()
            await asyncio.gather(*tasks)
