"""VmService: VM lifecycle and policies."""

from __future__ import annotations

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.application import Engine
from pagetrackd.application.views import vm_view
from pagetrackd.auth import current_caller
from pagetrackd.domain import CostModel, InvalidArgument, VmLimits
from pagetrackd.limits import DEFAULT_VCPUS, MAX_GFN_BITS, MAX_MEMSLOTS, MIN_GFN_BITS
from pagetrackd.transport import convert as cv
from pagetrackd.transport.services._common import Ctx, tenant
from pagetrackd.transport.status import unary
from pagetrackd.transport.views_pb import vm_pb

#: the most VMs one ListVms page holds
MAX_PAGE_SIZE = 1000


class VmService(pbg.VmServiceServicer):
    """VM lifecycle and policies."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @unary
    async def CreateVm(self, request: pb.CreateVmRequest, context: Ctx) -> pb.CreateVmResponse:
        opts = request.options
        cv.enum_value(cv.DMA_POLICY, opts.dma_policy, "options.dma_policy")
        cv.enum_value(cv.SEMANTICS, opts.semantics, "options.semantics")
        lim = opts.limits
        base = VmLimits()
        max_slots = lim.max_memslots if lim.HasField("max_memslots") else base.max_slots
        gfn_bits = lim.gfn_bits if lim.HasField("gfn_bits") else base.gfn_bits
        if not 1 <= max_slots <= MAX_MEMSLOTS:
            raise InvalidArgument(
                f"options.limits.max_memslots {max_slots} must be 1..{MAX_MEMSLOTS}"
            )
        if not MIN_GFN_BITS <= gfn_bits <= MAX_GFN_BITS:
            raise InvalidArgument(
                f"options.limits.gfn_bits {gfn_bits} must be {MIN_GFN_BITS}..{MAX_GFN_BITS}"
            )
        entry = self.engine.create_vm(
            tenant(),
            request.name,
            vcpus=lim.max_vcpus if lim.HasField("max_vcpus") else DEFAULT_VCPUS,
            dma_policy=cv.DMA_POLICY.get(opts.dma_policy, cv.DMA_POLICY[pb.DMA_POLICY_BYPASS]),
            semantics=cv.SEMANTICS.get(opts.semantics, cv.SEMANTICS[pb.SEMANTICS_2016]),
            cost=cv.cost_model(opts.cost, CostModel()),
            limits=VmLimits(max_slots=max_slots, gfn_bits=gfn_bits),
            history_events=lim.history_events if lim.HasField("history_events") else None,
            history_bytes=lim.history_bytes if lim.HasField("history_bytes") else None,
            record=opts.record,
        )
        return pb.CreateVmResponse(vm=vm_pb(vm_view(self.engine, entry)))

    @unary
    async def GetVm(self, request: pb.GetVmRequest, context: Ctx) -> pb.GetVmResponse:
        entry = self.engine.vm(tenant(), request.vm)
        return pb.GetVmResponse(vm=vm_pb(vm_view(self.engine, entry)))

    @unary
    async def ListVms(self, request: pb.ListVmsRequest, context: Ctx) -> pb.ListVmsResponse:
        caller = current_caller.get()
        if request.all_tenants:
            caller.require_admin("listing every tenant's VMs")
        size = request.page_size or MAX_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size {size}: at most {MAX_PAGE_SIZE}")
        start = 0
        if request.page_token:
            try:
                start = int(request.page_token)
            except ValueError:
                raise InvalidArgument("page_token is not one this server gave out") from None
        page, total = self.engine.list_vms_page(
            None if request.all_tenants else caller.tenant, max(start, 0), size
        )
        if not 0 <= start <= total:
            raise InvalidArgument("page_token is out of date; list again from the start")
        token = str(start + size) if start + size < total else ""
        return pb.ListVmsResponse(
            vms=[vm_pb(vm_view(self.engine, e)) for e in page], next_page_token=token
        )

    @unary
    async def DeleteVm(self, request: pb.DeleteVmRequest, context: Ctx) -> pb.DeleteVmResponse:
        last = self.engine.delete_vm(tenant(), request.vm)
        return pb.DeleteVmResponse(last_seq=last)

    @unary
    async def SetVmPolicy(
        self, request: pb.SetVmPolicyRequest, context: Ctx
    ) -> pb.SetVmPolicyResponse:
        cv.enum_value(cv.DMA_POLICY, request.dma_policy, "dma_policy")
        cv.enum_value(cv.SEMANTICS, request.semantics, "semantics")
        entry = self.engine.vm(tenant(), request.vm)
        cost = (
            cv.cost_model(request.cost, entry.vm.cost) if request.HasField("cost") else None
        )
        entry = self.engine.set_vm_policy(
            entry, dma_policy=cv.DMA_POLICY.get(request.dma_policy),
            semantics=cv.SEMANTICS.get(request.semantics), cost=cost,
        )
        return pb.SetVmPolicyResponse(vm=vm_pb(vm_view(self.engine, entry)))
