"""What a tenant's vGPU shadow makes the daemon hold (issue 17, plugin state).

A PPGTT of 65,666 guest page tables (128 page directories of 512 empty page tables),
written by the guest as 8-byte entries (about 130 written guest pages), then BuildPpgtt
with the default config. Prints the daemon's RSS growth, how long the call took and its
outcome. With the plugin_state_bytes quota (default 256 MiB) the build is refused at the
quota and what it shadowed is freed; before it, every table was shadowed.

    .venv/bin/python bench/plugin_state.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc

from pagetrack.v1 import pagetrack_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.robustness.starve_support import ATTACKER, MiB, Tenant, daemon  # noqa: E402

PML4, PDP, FIRST_PD, FIRST_PT = 0x100, 0x101, 0x200, 0x1000
PDS = 128


def entries() -> tuple[list[int], list[int]]:
    """(gpa, value) of every entry of the PPGTT."""
    gpa, value = [PML4 << 12], [PDP]
    for k in range(PDS):
        gpa.append((PDP << 12) + 8 * k)
        value.append(FIRST_PD + k)
        for j in range(512):
            gpa.append(((FIRST_PD + k) << 12) + 8 * j)
            value.append(FIRST_PT + 512 * k + j)
    return gpa, value


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, daemon(Path(tmp)) as d:
        att = Tenant(d.tcp, ATTACKER)
        vm = await att.new_vm(1 << 18)
        gpa, value = entries()
        for a in range(0, len(gpa), 8192):
            g, v = gpa[a : a + 8192], value[a : a + 8192]
            data = b"".join(((x << 12) | 3).to_bytes(8, "little") for x in v)
            await att.call(att.api.mem.WriteGuestBatch, pb.WriteGuestBatchRequest(
                vm=vm, gpa=g, vcpu=[0], length=[8] * len(g), data=data))
        await att.call(att.api.plugin.AttachPlugin, pb.AttachPluginRequest(
            vm=vm, kind=pb.PLUGIN_KIND_VGPU))
        rss0 = d.rss_bytes()
        t0 = time.perf_counter()
        try:
            built = await att.call(att.api.plugin.BuildPpgtt, pb.BuildPpgttRequest(
                vm=vm, root_gpa=PML4 << 12))
            outcome = f"built, {built.shadow_tables} shadow tables"
        except grpc.aio.AioRpcError as exc:
            outcome = f"{exc.code().name}: {(exc.details() or '')[:100]}"
        print(f"build_call_s: {time.perf_counter() - t0:.2f}")
        print(f"tables_in_ppgtt: {2 + PDS + PDS * 512}")
        print(f"rss_growth_mib: {(d.rss_bytes() - rss0) / MiB:.0f}")
        print(f"outcome: {outcome}")
        await att.close()


if __name__ == "__main__":
    asyncio.run(main())
