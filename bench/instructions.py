"""Instructions per unit of work on the hot paths, this tree next to another commit's.

Run from the repository root with the project's venv (needs ``valgrind`` and ``git``)::

    .venv/bin/python bench/instructions.py                     # the working tree vs HEAD
    .venv/bin/python bench/instructions.py --baseline cb4c83f  # vs an older commit

Wall-clock benchmarks on a shared machine move 10-20% from one minute to the next, which
hides a change of a few percent. The number of instructions a piece of work executes does
not move: valgrind's cachegrind counts them, and with the hash seed and numpy's BLAS threads
fixed two runs agree to within a few hundred instructions in millions. Each unit runs in a
fresh interpreter under cachegrind twice, once with no work (gpu_ppgtt: the warm-up only)
and once with N units more, and the difference divided by N is its cost, so imports and
set-up cancel out. The baseline is
``git archive REV server client`` unpacked in a temporary directory and run with the same
interpreter and packages.

Units (all in process, no sockets, so what they measure is the daemon's own code):

* ``gpu_ppgtt``: the gpu-ppgtt workload applied with ``Vm.write_batch``, the vGPU attached,
  per tracked guest write in the steady state (after a warm-up of 60 frames). As in the
  daemon, where the tree has them: the VM carries the quota guard's wrappers and the vGPU
  a plugin-state budget;
* ``batch_4096``: a domain ``write_batch`` of 4,096 tracked 8-byte writes spread over 4,096
  pages (as bench/streams.py writes), the event history registered, per batch;
* ``write_guest_batch``: ``MemoryService.WriteGuestBatch`` called directly (servicer,
  application layer and domain) with the same 4,096 writes, per call;
* ``write_guest_batch_100``: the same with 100 tracked 8-byte writes into 16 pages, per
  call (the call ``bench/scale.py``'s watchers workload makes 1,000 times a second);
* ``write_guest``: ``MemoryService.WriteGuest`` called directly, one tracked 8-byte write
  into bytes already written (a guest rewriting its page tables or counters), the event
  history registered, per call. The RPC interceptor (authentication, the VM's lock) is
  not in it.

Prints ``name: value`` lines: for each unit ``<unit>_instructions`` (this tree),
``<unit>_instructions_baseline`` and ``ratio_<unit>_vs_baseline`` (this tree / baseline; a
ratio below 1 is fewer instructions). Instructions are not time (memory traffic does not
show), so this complements the wall-clock benchmarks, it does not replace them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: what each unit runs: set-up, then ``units`` repetitions of the work (``units`` 0 or N)
_COMMON = """
import sys, numpy as np
units = int(sys.argv[1])
"""

#: gpu-ppgtt frames run before the counted ones (in both runs): the first frames build
#: the contexts' tables, so the difference is the steady state a long run spends its time in
WARM_FRAMES = 60

_GPU_PPGTT = _COMMON + f"WARM_FRAMES = {WARM_FRAMES}\n" + """
import json
from pagetrackd.domain import Vm
from pagetrackd.domain.hub import History
from pagetrackd.workloads.gpu_ppgtt import GpuPpgttWorkload
from pagetrackd.workloads.gpu_driver import Control
vm = Vm("bench", vcpus=4)
try:  # the daemon puts quota wrappers on every VM (trees that have them)
    from pagetrackd.quota_guard import guard

    class Unlimited:  # a tenant with no limits: the wrappers run, nothing is refused
        def check_guest_pages(self, tenant, n): pass
        def check_tracked(self, tenant, n): pass
        def charge_writes(self, tenant, n): pass
        def refund_writes(self, tenant, n): pass

    guard(Unlimited(), "bench", vm)
except ImportError:
    pass
vm.register_notifier(History())
w = GpuPpgttWorkload(1, {})
w.setup(vm)
try:  # the daemon charges plugin state to the tenant's quota (trees that have one)
    from pagetrackd.plugins.budget import StateBudget
    from pagetrackd.plugins.vgpu import find_vgpu
    find_vgpu(vm).state_meter.join(StateBudget(lambda: 1 << 40), lambda: False)
except ImportError:
    pass
d = w.driver
tracked = 0
while w._frames < WARM_FRAMES + units:
    w._frame(d)
    while d.queue:
        item = d.queue.popleft()
        if isinstance(item, Control):
            w._control(vm, item)
            continue
        r = vm.write_batch(item.gpa, [item.vcpu] * len(item.gpa), item.length,
                           b"".join(item.data))
        tracked += r.counts[2]
print("tracked", tracked, file=sys.stderr)
"""

_BATCH = _COMMON + """
from pagetrackd.domain import Vm
from pagetrackd.domain.hub import History
vm = Vm("bench", vcpus=4)
vm.set_memslot(0, 0, 65536)
vm.track_add(list(range(4096)))
vm.register_notifier(History())
rng = np.random.default_rng(3)
gpas = [(rng.integers(0, 4096, 4096) << 12).astype(np.int64) for _ in range(8)]
vcpu, length, data = np.zeros(4096, np.int64), np.full(4096, 8, np.int64), b"Z" * 8 * 4096
vm.write_batch(gpas[0], vcpu, length, data)
for i in range(units):
    vm.write_batch(gpas[i % 8], vcpu, length, data)
"""

#: the gRPC services called directly (no server), a VM with a 65,536-page slot; older
#: trees kept them elsewhere
_SERVICES = _COMMON + """
import asyncio
from pagetrack.v1 import pagetrack_pb2 as pb
try:
    from pagetrackd.application import Engine
    from pagetrackd.limits import ServerLimits
    from pagetrackd.transport.services import MemoryService, TrackingService, VmService
except ImportError:  # before the application layer (issue 13)
    from pagetrackd.engine import Engine
    from pagetrackd.transport.limits import ServerLimits
    from pagetrackd.transport.servicer import MemoryService, TrackingService, VmService

async def services(tracked):  # the engine and the memory service; "bench" tracks 0..tracked-1
    engine, lim = Engine(), ServerLimits()
    vms, mem, trk = VmService(engine), MemoryService(engine, lim), TrackingService(engine, lim)
    await vms.CreateVm(pb.CreateVmRequest(name="bench"), None)
    await mem.SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm="bench", slot=0, base_gfn=0, npages=65536), None)
    await trk.AddTracking(
        pb.TrackingChangeRequest(vm="bench", ranges=[pb.GfnRange(start=0, count=tracked)]), None)
    return engine, mem
"""

_SERVICER = _SERVICES + """
async def main():
    engine, mem = await services(4096)
    rng = np.random.default_rng(3)
    reqs = [pb.WriteGuestBatchRequest(
        vm="bench", gpa=(rng.integers(0, 4096, 4096) << 12).tolist(), vcpu=[0],
        length=[8] * 4096, data=b"Z" * 8 * 4096) for _ in range(8)]
    await mem.WriteGuestBatch(reqs[0], None)
    for i in range(units):
        await mem.WriteGuestBatch(reqs[i % 8], None)
    engine.history_gone = True

asyncio.run(main())
"""

#: the call bench/scale.py's watchers workload makes 1,000 times a second: 100 8-byte writes
#: into 16 tracked pages of a small VM
_SERVICER_100 = _SERVICES + """
async def main():
    engine, mem = await services(16)
    gpas = [(k % 16) * 4096 + 8 * (k // 16) for k in range(100)]
    req = pb.WriteGuestBatchRequest(vm="bench", gpa=gpas, vcpu=[0], length=[8] * 100,
                                    data=b"Z" * 800)
    for _ in range(20):  # the pages hold these bytes from now on
        await mem.WriteGuestBatch(req, None)
    for i in range(units):
        await mem.WriteGuestBatch(req, None)
    engine.history_gone = True

asyncio.run(main())
"""

_UNARY = _SERVICES + """
async def main():
    engine, mem = await services(1024)
    reqs = [pb.WriteGuestRequest(vm="bench", vcpu=i % 4, gpa=i << 12, data=b"Z" * 8)
            for i in range(1024)]
    for r in reqs:  # the pages hold these bytes from now on
        await mem.WriteGuest(r, None)
    for i in range(units):
        await mem.WriteGuest(reqs[i % 1024], None)
    engine.history_gone = True

asyncio.run(main())
"""

#: name -> (script, units measured: gpu-ppgtt frames after the warm-up, or batches, or calls)
UNITS = {
    "gpu_ppgtt": (_GPU_PPGTT, 240),
    "batch_4096": (_BATCH, 30),
    "write_guest_batch": (_SERVICER, 30),
    "write_guest_batch_100": (_SERVICER_100, 1000),
    "write_guest": (_UNARY, 3000),
}

_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")
_TRACKED = re.compile(r"^tracked (\d+)$", re.M)


def _count(script: str, units: int, pythonpath: str) -> tuple[int, int]:
    """(instructions, tracked writes) of ``script`` run for ``units`` under cachegrind."""
    env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONHASHSEED="0",
               OPENBLAS_NUM_THREADS="1", PAGETRACKD_LOG_LEVEL="error")
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-c", script, str(units)],
        env=env, capture_output=True, text=True, check=False, timeout=1800,
    )
    found = _IREFS.search(out.stderr)
    if out.returncode or found is None:
        raise SystemExit(f"the unit failed under valgrind (exit {out.returncode}):\n"
                         f"{out.stderr[-3000:]}")
    tracked = _TRACKED.search(out.stderr)
    return int(found.group(1).replace(",", "")), int(tracked.group(1)) if tracked else 0


def measure(name: str, pythonpath: str) -> float:
    """Instructions per unit of ``name`` (per tracked write for gpu_ppgtt)."""
    script, n = UNITS[name]
    idle, tracked_idle = _count(script, 0, pythonpath)
    busy, tracked = _count(script, n, pythonpath)
    return (busy - idle) / (tracked - tracked_idle if name == "gpu_ppgtt" else n)


def _unpack(rev: str, into: Path) -> str:
    """``server`` and ``client`` of ``rev`` under ``into``; returns the PYTHONPATH."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "server", "client"],
                         capture_output=True, check=False)
    if tar.returncode:
        raise SystemExit(f"git archive {rev}: {tar.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(tar.stdout)) as t:
        t.extractall(into, filter="data")
    return f"{into / 'server'}:{into / 'client'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="HEAD", metavar="REV",
                   help="the commit to compare the working tree with (default HEAD)")
    p.add_argument("--only", nargs="+", choices=sorted(UNITS), help="some units only")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("bench/instructions.py needs valgrind (apt-get install valgrind)")
    ours = f"{ROOT / 'server'}:{ROOT / 'client'}"
    with tempfile.TemporaryDirectory(prefix="pt-baseline-") as tmp:
        theirs = _unpack(args.baseline, Path(tmp))
        for name in args.only or UNITS:
            mine, base = measure(name, ours), measure(name, theirs)
            print(f"{name}_instructions: {mine:.0f}", flush=True)
            print(f"{name}_instructions_baseline: {base:.0f}", flush=True)
            print(f"ratio_{name}_vs_baseline: {mine / base:.3f}", flush=True)


if __name__ == "__main__":
    main()
