"""The built-in plugins' state is the daemon's memory, made because of what a tenant's
guest wrote: each empty guest page table linked into a PPGTT costs the vGPU a shadow
table of 512 entries (some 5 KiB), for 8 bytes of guest memory. It is counted against
the tenant's plugin_state_bytes quota (before this quota, nothing bounded it)."""

from __future__ import annotations

from pathlib import Path

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.robustness.starve_support import ATTACKER, MiB, Tenant, daemon, refused

PML4 = 0x100


def ppgtt_writes(pml4: int, pds: int) -> pb.WriteGuestBatchRequest:
    """Entries of a PPGTT at ``pml4`` (its PDP next to it) with ``pds`` page
    directories, each linking 512 (empty, all-zero) page tables of its own."""
    pdp = pml4 + 0x10
    first_pd = pml4 * 16
    first_pt = pml4 * 256
    gpa = [pml4 << 12]
    value = [pdp]
    for d in range(pds):
        gpa.append((pdp << 12) + 8 * d)
        value.append(first_pd + d)
        for j in range(512):
            gpa.append(((first_pd + d) << 12) + 8 * j)
            value.append(first_pt + 512 * d + j)
    data = b"".join(((v << 12) | 3).to_bytes(8, "little") for v in value)
    return pb.WriteGuestBatchRequest(vm="", gpa=gpa, vcpu=[0], length=[8] * len(gpa), data=data)


async def _vgpu(att: Tenant, vm: str) -> pb.PluginStatus:
    listed: pb.ListPluginsResponse = await att.call(
        att.api.plugin.ListPlugins, pb.ListPluginsRequest(vm=vm)
    )
    (status,) = listed.plugins
    return status


async def test_shadowing_a_ppgtt_stops_at_plugin_state_bytes(tmp_path: Path) -> None:
    quota = 8 * MiB
    with daemon(tmp_path, f"[tenant_quotas.attacker]\nplugin_state_bytes = {quota}\n") as d:
        att = Tenant(d.tcp, ATTACKER)
        vm = await att.new_vm(1 << 18)
        big = ppgtt_writes(PML4, 4)  # 2,048 page tables: some 10 MiB of shadow tables
        big.vm = vm
        await att.call(att.api.mem.WriteGuestBatch, big)
        await att.call(att.api.plugin.AttachPlugin, pb.AttachPluginRequest(
            vm=vm, kind=pb.PLUGIN_KIND_VGPU))
        await refused(att.call(att.api.plugin.BuildPpgtt, pb.BuildPpgttRequest(
            vm=vm, root_gpa=PML4 << 12)), "plugin_state_bytes")
        # Refused whole: nothing shadowed, nothing tracked, nothing held.
        status = await _vgpu(att, vm)
        assert status.tracked_gfns == 0
        assert status.counters["shadow_tables"] == 0 and status.counters["state_bytes"] == 0
        assert status.counters["quota_refusals"] == 1
        # A PPGTT that fits is shadowed; the quota counts it and still holds.
        small = ppgtt_writes(PML4 + 1, 1)  # 512 page tables
        small.vm = vm
        await att.call(att.api.mem.WriteGuestBatch, small)
        await refused(att.call(att.api.plugin.BuildPpgtt, pb.BuildPpgttRequest(
            vm=vm, root_gpa=PML4 << 12)), "plugin_state_bytes")
        built = await att.call(att.api.plugin.BuildPpgtt, pb.BuildPpgttRequest(
            vm=vm, root_gpa=(PML4 + 1) << 12))
        assert built.shadow_tables >= 512
        status = await _vgpu(att, vm)
        assert 512 * 4096 <= status.counters["state_bytes"] <= quota
        # Detaching gives the bytes back to the tenant.
        await att.call(att.api.plugin.DetachPlugin, pb.DetachPluginRequest(
            vm=vm, kind=pb.PLUGIN_KIND_VGPU))
        other = await att.new_vm(1 << 18)
        small.vm = other
        await att.call(att.api.mem.WriteGuestBatch, small)
        await att.call(att.api.plugin.AttachPlugin, pb.AttachPluginRequest(
            vm=other, kind=pb.PLUGIN_KIND_VGPU, options={"root_gpa": str((PML4 + 1) << 12)}))
        assert (await _vgpu(att, other)).counters["shadow_tables"] >= 512
        await att.close()
