"""The vGPU's PPGTTs and operations: build, destroy, submit, translate (``gtt.c``
``intel_vgpu_get_ppgtt_mm``, ``intel_vgpu_put_ppgtt_mm``; the plugin's ``call``)."""

from __future__ import annotations

from typing import Any

from pagetrackd.domain import (
    PAGE_SHIFT,
    PAGE_SIZE,
    FailedPrecondition,
    GfnNotInSlot,
    InvalidArgument,
    NotFound,
)
from pagetrackd.plugins.base import Steps, run_all
from pagetrackd.plugins.vgpu_shadow import VgpuShadow
from pagetrackd.plugins.vgpu_tables import (
    ADDR_MASK,
    LEVELS,
    PTE_PRESENT,
    Mm,
    ShadowFailed,
    ShadowNoMemory,
    int_arg,
    only_args,
    root_gfn_arg,
    va_arg,
    va_index,
)


class VgpuPpgtts(VgpuShadow):
    """PPGTT mms over the shadow, and the plugin operations."""

    def _find_mm(self, args: dict[str, Any]) -> Mm:
        if "ppgtt" in args and args["ppgtt"] is not None:
            mm = self._mms.get(int_arg(args, "ppgtt"))
            if mm is None:
                raise NotFound(
                    f"no PPGTT {args['ppgtt']}; known: {sorted(self._mms)}",
                    name=str(args["ppgtt"]),
                )
            return mm
        if args.get("root_gpa") is not None:
            root_gfn = root_gfn_arg(args)
            for mm in self._mms.values():
                if mm.root_gfn == root_gfn:
                    return mm
            raise NotFound(
                f"no PPGTT with root gpa {root_gfn << PAGE_SHIFT:#x}",
                name=f"{root_gfn << PAGE_SHIFT:#x}",
            )
        if len(self._mms) == 1:
            return next(iter(self._mms.values()))
        raise InvalidArgument("name the PPGTT: give ppgtt=<id> or root_gpa=<gpa>")

    def _create_mm(self, root_gfn: int) -> Steps[Mm]:
        """``intel_vgpu_create_ppgtt_mm`` + ``shadow_ppgtt_mm`` for an L4 root, a table
        at a time."""
        if not self._valid_gfn(root_gfn):
            raise GfnNotInSlot(
                f"PPGTT root gpa {root_gfn << PAGE_SHIFT:#x} is not in any memslot"
            )
        try:
            root = yield from self._populate_steps(root_gfn, LEVELS)
        except ShadowNoMemory as e:
            raise e.args[1] from None  # the QuotaExceeded: nothing stayed shadowed
        except ShadowFailed as e:
            raise FailedPrecondition(
                f"shadowing the PPGTT at {root_gfn << PAGE_SHIFT:#x} failed: it links a table"
                f" at gfn {e.args[0]:#x}, which is in no memslot (as gtt.c; attach with"
                " missing_table=scratch to map the scratch table instead)"
            ) from None
        mm = Mm(self._next_ppgtt, root_gfn, root)
        self._next_ppgtt += 1
        self._mms[mm.ppgtt] = mm
        return mm

    def _free_root_gfn(self) -> int:
        """An all-zero guest page that is not a shadowed table, from the top of memory."""
        vm = self._vm()
        for slot in reversed(vm.slots.slots()):
            if slot.readonly:
                continue
            for gfn in range(slot.info.end_gfn - 1, slot.base_gfn - 1, -1):
                if gfn in self._tracks or any(m.root_gfn == gfn for m in self._mms.values()):
                    continue
                if not any(slot.memory.read(gfn - slot.base_gfn, 0, PAGE_SIZE)):
                    return gfn
        raise FailedPrecondition("no free (all-zero) guest page for a PPGTT root")

    def _build_ppgtt(self, args: dict[str, Any]) -> Steps[dict[str, Any]]:
        """``intel_vgpu_get_ppgtt_mm``: find the PPGTT by root (a reference more) or
        shadow a new one."""
        if args.get("root_gpa") is None:
            mm = yield from self._create_mm(self._free_root_gfn())
            return self._mm_result(mm, True)
        root_gfn = root_gfn_arg(args)
        for mm in self._mms.values():
            if mm.root_gfn == root_gfn:
                mm.refs += 1
                return self._mm_result(mm, False)
        mm = yield from self._create_mm(root_gfn)
        return self._mm_result(mm, True)

    def _destroy_ppgtt(self, args: dict[str, Any]) -> dict[str, Any]:
        """``intel_vgpu_put_ppgtt_mm``: at the last reference, unshadow and untrack."""
        mm = self._find_mm(args)
        mm.refs -= 1
        destroyed = mm.refs == 0
        if destroyed:
            del self._mms[mm.ppgtt]
            if mm.root is not None:
                self._invalidate_spt(mm.root)
        return {"ppgtt": mm.ppgtt, "destroyed": destroyed, "tables": len(self._spt_by_mfn)}

    def _submit(self, args: dict[str, Any]) -> Steps[dict[str, Any]]:
        """A workload submission: flush pending entries, shadow an unknown root."""
        batch_va = args.get("batch_va")
        if batch_va is not None:
            batch_va = va_arg(args, "batch_va")
        if args.get("ppgtt") is not None or args.get("root_gpa") is None:
            self._find_mm(args)  # an unknown PPGTT is refused before anything changes
        flushed = yield from self.flush_steps()
        if args.get("ppgtt") is None and args.get("root_gpa") is not None:
            root_gfn = root_gfn_arg(args)
            found = [m for m in self._mms.values() if m.root_gfn == root_gfn]
            mm = found[0] if found else (yield from self._create_mm(root_gfn))
        else:
            mm = self._find_mm(args)
        self.stats.submissions += 1
        scratch = False
        if batch_va is not None:
            scratch = bool(self._translate(mm, batch_va)["scratch"])
            self.stats.scratch_batches += scratch
        return {
            "submission": self.stats.submissions,
            "flushed": flushed,
            "ppgtt": mm.ppgtt,
            "batch_scratch": scratch,
        }

    def _mm_result(self, mm: Mm, created: bool) -> dict[str, Any]:
        return {
            "ppgtt": mm.ppgtt,
            "root_gpa": mm.root_gfn << PAGE_SHIFT,
            "created": created,
            "root_mfn": -1 if mm.root is None else mm.root.mfn,
            "tables": len(self._spt_by_mfn),
        }

    # ------------------------------------------------------------------ translation

    def _translate(self, mm: Mm, va: int) -> dict[str, Any]:
        spt = mm.root
        level = LEVELS
        se = 0
        while spt is not None:
            se = spt.entries[va_index(va, level)]
            frame = (se & ADDR_MASK) >> PAGE_SHIFT
            if not se & PTE_PRESENT or frame == self.scratch[level]:
                break
            if level == 1:
                return {
                    "host_frame": frame,
                    "hpa": (frame << PAGE_SHIFT) | (va & (PAGE_SIZE - 1)),
                    "scratch": False,
                    "present": True,
                    "level": 1,
                    "guest_gfn": self._frame_gfn.get(frame, -1),
                    "entry": se,
                }
            spt = self._spt_by_mfn.get(frame)
            level -= 1
        # Walks that stop early land, through the scratch tree, on the scratch page.
        return {
            "host_frame": self.scratch[1],
            "hpa": self.scratch[1] << PAGE_SHIFT,
            "scratch": True,
            "present": bool(se & PTE_PRESENT),
            "level": level,
            "guest_gfn": -1,
            "entry": se,
        }

    # ------------------------------------------------------------------ plugin protocol

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """:meth:`call_steps` in one go."""
        return run_all(self.call_steps(op, **args))

    def call_steps(self, op: str, **args: Any) -> Steps[dict[str, Any]]:
        """Plugin operations, a table at a time where they shadow tables (all raise
        InvalidArgument on bad or unknown arguments):

        * ``build_ppgtt(root_gpa=None)`` -- shadow the PPGTT whose PML4 is at ``root_gpa``
          (find-or-create, as ``intel_vgpu_get_ppgtt_mm``); without ``root_gpa``, pick an
          unused all-zero page at the top of guest memory as a fresh, empty root.
          -> ``{ppgtt, root_gpa, created, root_mfn, tables}``
        * ``destroy_ppgtt(ppgtt= | root_gpa=)`` -- drop a reference to a PPGTT; at zero
          its tables are unshadowed and untracked. -> ``{ppgtt, destroyed, tables}``
        * ``submit(ppgtt= | root_gpa=, batch_va=None)`` -- a workload submission: flush
          pending entries (R8.7), shadow the root if unknown, count it; ``batch_va`` is
          translated like the command parser would. -> ``{submission, flushed, ppgtt,
          batch_scratch}``
        * ``flush()`` -> ``{flushed}``
        * ``translate(va, ppgtt= | root_gpa=)`` -- GPU va -> host frame through the shadow.
          -> ``{host_frame, hpa, scratch, present, level, guest_gfn, entry}``
        * ``protect_table()`` -> ``{gfns}`` (sorted)
        * ``ppgtts()`` -> ``{ppgtts: [{ppgtt, root_gpa, refs}]}``
        """
        self._vm()
        if op == "build_ppgtt":
            only_args(op, args, {"root_gpa"})
            return (yield from self._build_ppgtt(args))
        if op == "destroy_ppgtt":
            only_args(op, args, {"ppgtt", "root_gpa"})
            return self._destroy_ppgtt(args)
        if op == "submit":
            only_args(op, args, {"ppgtt", "root_gpa", "batch_va"})
            return (yield from self._submit(args))
        if op == "flush":
            only_args(op, args, set())
            return {"flushed": (yield from self.flush_steps())}
        if op == "translate":
            only_args(op, args, {"va", "ppgtt", "root_gpa"})
            va = va_arg(args, "va")
            return self._translate(self._find_mm(args), va)
        if op == "protect_table":
            only_args(op, args, set())
            return {"gfns": sorted(self._protect)}
        if op == "ppgtts":
            only_args(op, args, set())
            return {
                "ppgtts": [
                    {"ppgtt": m.ppgtt, "root_gpa": m.root_gfn << PAGE_SHIFT, "refs": m.refs}
                    for m in self._mms.values()
                ]
            }
        raise InvalidArgument(
            f"unknown vgpu op {op!r}; known: build_ppgtt, destroy_ppgtt, submit, flush,"
            " translate, protect_table, ppgtts"
        )


__all__ = ["VgpuPpgtts"]
