"""VmService against a real daemon: create, get, list, delete, set policy."""

from __future__ import annotations

import grpc
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from tests.integration.support import Api, expect_error, new_name, snapshot, vm_names

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def test_create_vm_fills_every_effective_option(api: Api) -> None:
    """A CreateVm with no options answers with the defaults, all set."""
    name = new_name()
    vm = (await api.vm.CreateVm(pb.CreateVmRequest(name=name))).vm
    try:
        assert vm.name == name and vm.tenant == "default"
        o = vm.options
        assert o.dma_policy == pb.DMA_POLICY_BYPASS and o.semantics == pb.SEMANTICS_2016
        assert o.cost.mmio_exit_cycles == 5000 and o.cost.host_hz > 0
        assert o.limits.max_memslots >= 1 and o.limits.gfn_bits == 40 and o.limits.max_vcpus >= 1
        assert vm.head_seq == 0 and vm.oldest_seq == 1 and vm.memslot_count == 0
        assert vm.notifier_count == 0 and vm.created_at_ns > 0
        got = (await api.vm.GetVm(pb.GetVmRequest(vm=name))).vm
        assert got == vm
    finally:
        await api.vm.DeleteVm(pb.DeleteVmRequest(vm=name))


async def test_create_vm_with_options(api: Api) -> None:
    """Options given at creation are in force and reported back."""
    name = new_name()
    opts = pb.VmOptions(
        dma_policy=pb.DMA_POLICY_NOTIFY,
        semantics=pb.SEMANTICS_LINUX_6_6,
        cost=pb.CostModel(mmio_exit_cycles=7, emulate_cycles=11, host_hz=2_000_000),
        limits=pb.VmLimits(max_memslots=4, gfn_bits=20, max_vcpus=2, history_events=16),
    )
    vm = (await api.vm.CreateVm(pb.CreateVmRequest(name=name, options=opts))).vm
    try:
        assert vm.options.dma_policy == pb.DMA_POLICY_NOTIFY
        assert vm.options.semantics == pb.SEMANTICS_LINUX_6_6
        assert (vm.options.cost.mmio_exit_cycles, vm.options.cost.emulate_cycles) == (7, 11)
        assert vm.options.cost.host_hz == 2_000_000
        lim = vm.options.limits
        assert (lim.max_memslots, lim.gfn_bits, lim.max_vcpus, lim.history_events) == (
            4, 20, 2, 16,
        )
        await expect_error(
            api.mem.WriteGuest(pb.WriteGuestRequest(vm=name, vcpu=2, gpa=0, data=b"x")),
            INVALID, "vcpu 2",
        )
        await expect_error(
            api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=name, slot=4, npages=1)),
            INVALID, "slot id 4",
        )
    finally:
        await api.vm.DeleteVm(pb.DeleteVmRequest(vm=name))


BAD_CREATE = [
    ("", None, "empty"),
    ("x" * 64, None, "at most 63"),
    ("Has Space", None, "may hold only"),
    ("-dash", None, "start and end"),
    ("ok", pb.VmOptions(dma_policy=99), "dma_policy"),  # type: ignore[arg-type]
    ("ok", pb.VmOptions(semantics=42), "semantics"),  # type: ignore[arg-type]
    ("ok", pb.VmOptions(cost=pb.CostModel(mmio_exit_cycles=10**10)), "mmio_exit_cycles"),
    ("ok", pb.VmOptions(cost=pb.CostModel(emulate_cycles=2**64 - 1)), "emulate_cycles"),
    ("ok", pb.VmOptions(cost=pb.CostModel(fast_cycles=10**9 + 1)), "fast_cycles"),
    ("ok", pb.VmOptions(cost=pb.CostModel(dma_cycles=10**12)), "dma_cycles"),
    ("ok", pb.VmOptions(cost=pb.CostModel(host_hz=0)), "host_hz"),
    ("ok", pb.VmOptions(cost=pb.CostModel(host_hz=10**12)), "host_hz"),
    ("ok", pb.VmOptions(limits=pb.VmLimits(max_memslots=0)), "max_memslots"),
    ("ok", pb.VmOptions(limits=pb.VmLimits(max_memslots=40000)), "max_memslots"),
    ("ok", pb.VmOptions(limits=pb.VmLimits(gfn_bits=0)), "gfn_bits"),
    ("ok", pb.VmOptions(limits=pb.VmLimits(gfn_bits=64)), "gfn_bits"),
    ("ok", pb.VmOptions(limits=pb.VmLimits(max_vcpus=0)), "vcpus"),
    ("ok", pb.VmOptions(limits=pb.VmLimits(max_vcpus=2**32 - 1)), "vcpus"),
    ("ok", pb.VmOptions(limits=pb.VmLimits(history_events=2**64 - 1)), "history_events"),
    ("ok", pb.VmOptions(limits=pb.VmLimits(history_bytes=2**40)), "history_bytes"),
]


@pytest.mark.parametrize(("name", "options", "needle"), BAD_CREATE)
async def test_create_vm_refuses_bad_fields(
    api: Api, name: str, options: pb.VmOptions | None, needle: str
) -> None:
    """Each malformed CreateVm field is INVALID_ARGUMENT naming it; no VM appears."""
    before = await vm_names(api)
    req = pb.CreateVmRequest(name=name if name != "ok" else new_name())
    if options is not None:
        req.options.CopyFrom(options)
    await expect_error(api.vm.CreateVm(req), INVALID, needle)
    assert await vm_names(api) == before


async def test_create_vm_twice_is_already_exists(api: Api, vm: str) -> None:
    """A taken name is ALREADY_EXISTS and leaves the first VM as it was."""
    before = await snapshot(api, vm)
    await expect_error(
        api.vm.CreateVm(pb.CreateVmRequest(name=vm, options=pb.VmOptions(
            dma_policy=pb.DMA_POLICY_REJECT))),
        grpc.StatusCode.ALREADY_EXISTS, vm,
    )
    assert await snapshot(api, vm) == before


async def test_get_and_delete_unknown_vm_are_not_found(api: Api) -> None:
    """GetVm, DeleteVm and SetVmPolicy of an unknown name are NOT_FOUND naming it."""
    before = await vm_names(api)
    for call in (
        api.vm.GetVm(pb.GetVmRequest(vm="no-such-vm")),
        api.vm.DeleteVm(pb.DeleteVmRequest(vm="no-such-vm")),
        api.vm.SetVmPolicy(pb.SetVmPolicyRequest(vm="no-such-vm")),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, "no-such-vm")
    assert await vm_names(api) == before


async def test_list_vms_pages_through_every_vm(api: Api) -> None:
    """ListVms with page_size 1 walks every VM once, in name order."""
    names = sorted(new_name() for _ in range(3))
    for n in names:
        await api.vm.CreateVm(pb.CreateVmRequest(name=n))
    try:
        seen: list[str] = []
        token = ""
        while True:
            r = await api.vm.ListVms(pb.ListVmsRequest(page_size=1, page_token=token))
            assert len(r.vms) <= 1
            seen.extend(v.name for v in r.vms)
            token = r.next_page_token
            if not token:
                break
        assert seen == sorted(seen)
        assert set(names) <= set(seen)
        everyone = await api.vm.ListVms(pb.ListVmsRequest(all_tenants=True))
        assert set(names) <= {v.name for v in everyone.vms}
    finally:
        for n in names:
            await api.vm.DeleteVm(pb.DeleteVmRequest(vm=n))


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (pb.ListVmsRequest(page_size=1001), "page_size"),
        (pb.ListVmsRequest(page_size=2**32 - 1), "page_size"),
        (pb.ListVmsRequest(page_token="not-a-token"), "page_token"),
        (pb.ListVmsRequest(page_token="-3"), "page_token"),
        (pb.ListVmsRequest(page_token="9" * 40), "page_token"),
    ],
)
async def test_list_vms_refuses_bad_paging(api: Api, req: pb.ListVmsRequest, needle: str) -> None:
    """Bad page_size and page_token are INVALID_ARGUMENT naming the field."""
    await expect_error(api.vm.ListVms(req), INVALID, needle)


async def test_delete_vm_returns_last_seq_and_frees_the_name(api: Api, vm: str) -> None:
    """DeleteVm answers the last seq; the VM is gone and its name can be reused."""
    await api.track.AddTracking(pb.TrackingChangeRequest(vm=vm, gfns=[0x100]))
    await api.mem.WriteGuest(pb.WriteGuestRequest(vm=vm, gpa=0x100 << 12, data=b"abc"))
    assert (await api.vm.DeleteVm(pb.DeleteVmRequest(vm=vm))).last_seq == 1
    await expect_error(api.vm.GetVm(pb.GetVmRequest(vm=vm)), grpc.StatusCode.NOT_FOUND)
    again = (await api.vm.CreateVm(pb.CreateVmRequest(name=vm))).vm
    assert again.head_seq == 0 and again.memslot_count == 0


async def test_set_vm_policy_changes_only_what_is_set(api: Api, vm: str) -> None:
    """SetVmPolicy changes the given fields and keeps the unset ones."""
    before = (await api.vm.GetVm(pb.GetVmRequest(vm=vm))).vm.options
    after = (
        await api.vm.SetVmPolicy(
            pb.SetVmPolicyRequest(
                vm=vm, dma_policy=pb.DMA_POLICY_REJECT, cost=pb.CostModel(fast_cycles=3)
            )
        )
    ).vm.options
    assert after.dma_policy == pb.DMA_POLICY_REJECT
    assert after.semantics == before.semantics
    assert after.cost.fast_cycles == 3
    assert after.cost.mmio_exit_cycles == before.cost.mmio_exit_cycles
    assert after.limits == before.limits
    again = (await api.vm.SetVmPolicy(pb.SetVmPolicyRequest(vm=vm))).vm.options
    assert again == after


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (pb.SetVmPolicyRequest(dma_policy=7), "dma_policy"),  # type: ignore[arg-type]
        (pb.SetVmPolicyRequest(semantics=3), "semantics"),  # type: ignore[arg-type]
        (pb.SetVmPolicyRequest(cost=pb.CostModel(mmio_exit_cycles=2**64 - 1)), "mmio_exit"),
        (pb.SetVmPolicyRequest(cost=pb.CostModel(emulate_cycles=10**10)), "emulate_cycles"),
        (pb.SetVmPolicyRequest(cost=pb.CostModel(fast_cycles=10**10)), "fast_cycles"),
        (pb.SetVmPolicyRequest(cost=pb.CostModel(dma_cycles=10**10)), "dma_cycles"),
        (pb.SetVmPolicyRequest(cost=pb.CostModel(host_hz=1)), "host_hz"),
    ],
)
async def test_set_vm_policy_refuses_bad_fields(
    api: Api, vm: str, req: pb.SetVmPolicyRequest, needle: str
) -> None:
    """Each malformed SetVmPolicy field is INVALID_ARGUMENT naming it; nothing changes,
    not even the fields that were valid."""
    req.vm = vm
    if req.HasField("cost"):
        req.dma_policy = pb.DMA_POLICY_NOTIFY  # valid, must not be applied either
    before = await snapshot(api, vm)
    await expect_error(api.vm.SetVmPolicy(req), INVALID, needle)
    assert await snapshot(api, vm) == before
