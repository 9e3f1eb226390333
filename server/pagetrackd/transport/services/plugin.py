"""PluginService: in-process consumers (built-in and allowed third-party plugins)."""

from __future__ import annotations

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from pagetrackd.application import Engine
from pagetrackd.application import plugin_ops as app
from pagetrackd.domain import InvalidArgument
from pagetrackd.limits import ServerLimits
from pagetrackd.plugins.catalog import canonical_name
from pagetrackd.transport import convert as cv
from pagetrackd.transport.services._common import Ctx, int_options, tenant
from pagetrackd.transport.status import unary
from pagetrackd.transport.views_pb import plugin_status_pb

#: the most GPU addresses one SubmitVgpu translates
MAX_GPU_ADDRS = 10000


def plugin_name(kind: pb.PluginKind.ValueType, name: str = "") -> str:
    """The plugin a request names, by kind or by name."""
    if name:
        by_name = canonical_name(name)
        if kind != pb.PLUGIN_KIND_UNSPECIFIED and cv.PLUGIN_KIND.get(kind) != by_name:
            raise InvalidArgument(
                f"kind {kind} and name {name[:80]!r} name different plugins; give one",
                field="name",
            )
        return by_name
    found = cv.PLUGIN_KIND.get(kind)
    if found is None:
        raise InvalidArgument(
            f"kind: unknown plugin kind {kind}; use SHADOW_MMU or VGPU, or give a name"
        )
    return found


class PluginService(pbg.PluginServiceServicer):
    """The in-process consumers: shadow MMU, vGPU and allowed third-party plugins."""

    def __init__(self, engine: Engine, limits: ServerLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or ServerLimits()

    @unary
    async def AttachPlugin(
        self, request: pb.AttachPluginRequest, context: Ctx
    ) -> pb.AttachPluginResponse:
        who = tenant()
        self.engine.vm(who, request.vm)  # an unknown VM is refused first
        name = plugin_name(request.kind, request.name)
        view = await app.attach(self.engine, who, request.vm, name, int_options(request.options))
        return pb.AttachPluginResponse(status=plugin_status_pb(view))

    @unary
    async def DetachPlugin(
        self, request: pb.DetachPluginRequest, context: Ctx
    ) -> pb.DetachPluginResponse:
        entry = self.engine.vm(tenant(), request.vm)
        refs = self.engine.detach_plugin(entry, plugin_name(request.kind, request.name))
        return pb.DetachPluginResponse(released_references=refs)

    @unary
    async def ListPlugins(
        self, request: pb.ListPluginsRequest, context: Ctx
    ) -> pb.ListPluginsResponse:
        views = app.plugin_views(self.engine, tenant(), request.vm)
        return pb.ListPluginsResponse(plugins=[plugin_status_pb(v) for v in views])

    @unary
    async def AuditPlugin(
        self, request: pb.AuditPluginRequest, context: Ctx
    ) -> pb.AuditPluginResponse:
        cap = self.limits.max_audit_mismatches
        if request.max_mismatches > cap:
            raise InvalidArgument(f"max_mismatches {request.max_mismatches}: at most {cap}")
        who = tenant()
        self.engine.vm(who, request.vm)  # an unknown VM is refused first
        report = app.audit(
            self.engine, who, request.vm, plugin_name(request.kind, request.name)
        )
        limit = request.max_mismatches or cap
        family = "ppgtt" if request.kind == pb.PLUGIN_KIND_VGPU else "shadow"
        return pb.AuditPluginResponse(
            checked_entries=report.checked,
            mismatch_count=len(report.mismatches),
            mismatches=[
                pb.AuditMismatch(
                    table=m.table or family,
                    table_gfn=m.table_gfn,
                    level=m.level,
                    index=m.index,
                    guest_entry=m.guest,
                    expected=m.expected if m.expected is not None else 0,
                    actual=m.shadow,
                    reason=m.reason,
                )
                for m in report.mismatches[:limit]
            ],
        )

    @unary
    async def SetShadowRoot(
        self, request: pb.SetShadowRootRequest, context: Ctx
    ) -> pb.SetShadowRootResponse:
        out = app.set_shadow_root(self.engine, tenant(), request.vm, request.cr3, request.vcpu)
        return pb.SetShadowRootResponse(root_gfn=out.root_gfn, shadow_pages=out.shadow_pages)

    @unary
    async def TranslateShadow(
        self, request: pb.TranslateShadowRequest, context: Ctx
    ) -> pb.TranslateShadowResponse:
        out = app.translate_shadow(
            self.engine, tenant(), request.vm, request.gva, request.write, request.vcpu
        )
        return pb.TranslateShadowResponse(
            present=out.present, gpa=out.gpa, page_bytes=out.page_bytes,
            writable=out.writable, fault=out.fault,
            shadow_pages_created=out.shadow_pages_created,
        )

    @unary
    async def BuildPpgtt(
        self, request: pb.BuildPpgttRequest, context: Ctx
    ) -> pb.BuildPpgttResponse:
        if request.levels not in (0, 4):
            raise InvalidArgument(f"levels {request.levels}: only 4-level PPGTTs are modelled")
        if request.options:
            raise InvalidArgument(
                f"unknown BuildPpgtt options: {', '.join(sorted(request.options))}"
            )
        if request.root_gpa & 0xFFF:
            raise InvalidArgument(f"root_gpa {request.root_gpa:#x} is not page aligned")
        built = await app.build_ppgtt(self.engine, tenant(), request.vm, request.root_gpa or None)
        return pb.BuildPpgttResponse(
            ppgtt_id=built.ppgtt, shadow_tables=built.tables,
            scratch_entries=built.scratch_entries, violations=built.violations,
        )

    @unary
    async def SubmitVgpu(
        self, request: pb.SubmitVgpuRequest, context: Ctx
    ) -> pb.SubmitVgpuResponse:
        if len(request.gpu_addrs) > MAX_GPU_ADDRS:
            raise InvalidArgument(
                f"{len(request.gpu_addrs)} gpu_addrs; at most {MAX_GPU_ADDRS}"
            )
        done = await app.submit_vgpu(
            self.engine, tenant(), request.vm, request.ppgtt_id, list(request.gpu_addrs)
        )
        return pb.SubmitVgpuResponse(
            flushed_entries=done.flushed, gpa=done.gpa, scratch=done.scratch
        )

    @unary
    async def DestroyPpgtt(
        self, request: pb.DestroyPpgttRequest, context: Ctx
    ) -> pb.DestroyPpgttResponse:
        released = app.destroy_ppgtt(self.engine, tenant(), request.vm, request.ppgtt_id)
        return pb.DestroyPpgttResponse(released_references=released)
