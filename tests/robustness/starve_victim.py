"""The victim tenant, as its own process (so the attacking test's own work cannot slow
it): ``python -m tests.robustness.starve_victim TARGET TOKEN DIR``. It makes a VM, then
writes to and reads it one request at a time until DIR/stop exists, and prints the
latency of each request (seconds) and when it was answered (``time.time()``) as JSON.
DIR/ready appears after the first answer."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import grpc

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg


def main(target: str, token: str, folder: str) -> int:
    md = (("authorization", f"Bearer {token}"),)
    stop = Path(folder) / "stop"
    deadline = time.monotonic() + 600  # a test that forgets to stop it
    parent = os.getppid()  # a test killed outright: stop with it
    with grpc.insecure_channel(target) as ch:
        vms = pbg.VmServiceStub(ch)
        mem = pbg.MemoryServiceStub(ch)
        vm = f"victim{uuid.uuid4().hex[:8]}"
        vms.CreateVm(pb.CreateVmRequest(name=vm), metadata=md)
        mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=vm, slot=0, npages=64), metadata=md)
        pbg.TrackingServiceStub(ch).AddTracking(
            pb.TrackingChangeRequest(vm=vm, gfns=[1], mode=pb.TRACK_MODE_WRITE), metadata=md
        )
        samples: list[float] = []
        ends: list[float] = []
        errors: list[str] = []
        i = 0
        while not stop.exists() and time.monotonic() < deadline and os.getppid() == parent:
            t0 = time.perf_counter()
            try:
                if i % 2:
                    mem.WriteGuest(pb.WriteGuestRequest(
                        vm=vm, gpa=4096 + 8 * (i % 512), data=b"v" * 8), metadata=md, timeout=60)
                else:
                    vms.GetVm(pb.GetVmRequest(vm=vm), metadata=md, timeout=60)
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
            samples.append(time.perf_counter() - t0)
            ends.append(time.time())
            if i == 0:
                (Path(folder) / "ready").write_text("")
            i += 1
            time.sleep(0.002)
        vms.DeleteVm(pb.DeleteVmRequest(vm=vm), metadata=md)
    print(json.dumps({"samples": samples, "ends": ends, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
