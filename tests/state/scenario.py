"""A VM with a bit of everything, built over the API, and a fingerprint of its state."""

from __future__ import annotations

from typing import Any

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.state.daemon import Daemon

PAGE = 4096
PTE = 3  # present | writable


def build_vm(d: Daemon, name: str = "vm1") -> dict[str, Any]:
    """Create ``name`` with options, three memslots, tenant and lease tracking, guest
    page tables shadowed by the vgpu plugin, some memory and some events."""
    vms, mem, tr = d.stub("VmService"), d.stub("MemoryService"), d.stub("TrackingService")
    vms.CreateVm(
        pb.CreateVmRequest(
            name=name,
            options=pb.VmOptions(
                dma_policy=pb.DMA_POLICY_NOTIFY,
                semantics=pb.SEMANTICS_LINUX_6_6,
                cost=pb.CostModel(mmio_exit_cycles=4000, emulate_cycles=1200),
                limits=pb.VmLimits(max_vcpus=3, history_events=1000),
            ),
        )
    )
    mem.SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=name, slot=0, base_gfn=0, npages=4096, log_dirty_pages=True)
    )
    mem.SetMemoryRegion(
        pb.SetMemoryRegionRequest(vm=name, slot=1, base_gfn=0x10000, npages=256, readonly=True)
    )
    mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=name, slot=2, base_gfn=0x20000, npages=1024))
    # A 4-level PPGTT at gfn 100 -> 101 -> 102 -> 103 -> data page 200.
    for table, child in ((100, 101), (101, 102), (102, 103), (103, 200)):
        mem.WriteGuest(
            pb.WriteGuestRequest(
                vm=name, vcpu=0, gpa=table * PAGE, data=(child * PAGE | PTE).to_bytes(8, "little")
            )
        )
    tr.AddTracking(pb.TrackingChangeRequest(vm=name, gfns=[1, 2, 2, 3, 0x20005]))
    lease = d.stub("LeaseService").CreateLease(
        pb.CreateLeaseRequest(ttl_ms=600_000, label="keep")
    ).lease
    tr.AddTracking(pb.TrackingChangeRequest(vm=name, gfns=[3, 7], lease_id=lease.id))
    d.stub("PluginService").AttachPlugin(
        pb.AttachPluginRequest(
            vm=name, kind=pb.PLUGIN_KIND_VGPU, options={"root_gpa": str(100 * PAGE)}
        )
    )
    mem.WriteGuest(pb.WriteGuestRequest(vm=name, vcpu=1, gpa=2 * PAGE + 16, data=b"abc"))
    mem.WriteGuest(pb.WriteGuestRequest(vm=name, vcpu=2, gpa=0x20005 * PAGE, data=b"xyz"))
    mem.WriteGuest(pb.WriteGuestRequest(vm=name, vcpu=0, gpa=50 * PAGE, data=b"q" * 3000))
    mem.DmaWrite(pb.DmaWriteRequest(vm=name, gpa=3 * PAGE, data=b"dma!"))
    return {"lease": lease.id}


def fingerprint(d: Daemon, name: str = "vm1") -> dict[str, Any]:
    """Everything that a restart must keep, as comparable values."""
    vm = d.stub("VmService").GetVm(pb.GetVmRequest(vm=name)).vm
    mem = d.stub("MemoryService")
    regions = mem.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm=name)).regions
    ranges = [pb.GfnRange(start=r.base_gfn, count=r.npages) for r in regions]
    q = d.stub("TrackingService").QueryTracking(
        pb.QueryTrackingRequest(vm=name, ranges=ranges, only_tracked=True, include_owners=True)
    )
    tracking = {
        g.gfn: (
            g.counter,
            sorted((o.kind, o.id, o.count) for o in g.owners),
            g.write_protected, g.lpage_2m_disallowed,
        )
        for g in q.gfns
    }
    memory = {
        gpa: mem.ReadGuest(pb.ReadGuestRequest(vm=name, gpa=gpa, length=PAGE)).data
        for gpa in (0, 2 * PAGE, 3 * PAGE, 50 * PAGE, 100 * PAGE, 103 * PAGE, 0x20005 * PAGE)
    }
    leases = sorted(
        (le.id, le.kind, le.ttl_ms, le.label)
        for le in d.stub("LeaseService").ListLeases(pb.ListLeasesRequest()).leases
    )
    plugins = [
        (p.kind, p.tracked_gfns, p.counters["protected_gfns"], p.counters["shadowed_tables"])
        for p in d.stub("PluginService").ListPlugins(pb.ListPluginsRequest(vm=name)).plugins
    ]
    st = d.stub("AdminService").GetStats(pb.GetStatsRequest(vm=name)).vms[0]
    stats = (
        st.guest_writes, st.writes, st.bytes_written, st.dma, st.tracked_gfns, st.head_seq,
        st.cycles, st.memory_bytes,
    )
    return {
        "vm": vm, "regions": list(regions), "tracking": tracking, "memory": memory,
        "leases": leases, "plugins": plugins, "stats": stats,
    }
