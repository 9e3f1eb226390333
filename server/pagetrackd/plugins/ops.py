"""Typed operations of the built-in plugins, for the API, the state directory and tools.

Each function runs one operation through the plugin's ``call`` (the one entry point
that recordings and the journal see, so a replay repeats it) and returns a typed
result, built from the reply's exact keys: a plugin that answers with another shape
fails here, loudly, instead of being read as zeros further on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

from pagetrackd.plugins.base import Plugin, SteppedCalls, Steps

R = TypeVar("R")


def _typed(cls: type[R], out: dict[str, Any]) -> R:
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if set(out) != names:  # a bug in the plugin, not the caller's: INTERNAL
        raise RuntimeError(
            f"plugin reply {sorted(out)} does not have the fields of {cls.__name__}"
        )
    return cls(**out)


# ---------------------------------------------------------------------- shadow MMU


@dataclass(frozen=True, slots=True)
class RootSet:
    """``set_root``: the root's gfn, whether it came from the previous-roots cache, and
    the shadow pages now held."""

    root_gfn: int
    cached: bool
    shadow_pages: int


@dataclass(frozen=True, slots=True)
class ShadowRoot:
    """A vCPU's current guest page-table root (CR3)."""

    vcpu: int
    cr3: int


@dataclass(frozen=True, slots=True)
class Translation:
    """``translate``/``fault``: a guest access through the shadow (TranslateShadow)."""

    present: bool
    gpa: int
    page_bytes: int
    shadow_page_bytes: int
    writable: bool
    fault: str
    faulted: bool
    emulated: bool
    shadow_pages_created: int


def set_root(plugin: Plugin, *, cr3: int, vcpu: int = 0) -> RootSet:
    """Shadow MMU: load the root for ``cr3`` on ``vcpu`` and shadow it."""
    return _typed(RootSet, plugin.call("set_root", cr3=cr3, vcpu=vcpu))


def translate(
    plugin: Plugin, *, gva: int, write: bool = False, user: bool = False, vcpu: int = 0
) -> Translation:
    """Shadow MMU: a guest access to ``gva`` (a shadow page fault if not mapped)."""
    return _typed(
        Translation, plugin.call("translate", gva=gva, write=write, user=user, vcpu=vcpu)
    )


# ---------------------------------------------------------------------- vGPU


@dataclass(frozen=True, slots=True)
class PpgttBuilt:
    """``build_ppgtt``: the PPGTT's id and root, whether it is new, its root's host
    frame (-1 when not shadowed) and the shadow tables over every PPGTT."""

    ppgtt: int
    root_gpa: int
    created: bool
    root_mfn: int
    tables: int


@dataclass(frozen=True, slots=True)
class PpgttDestroyed:
    """``destroy_ppgtt``: whether the last reference went, and the tables left."""

    ppgtt: int
    destroyed: bool
    tables: int


@dataclass(frozen=True, slots=True)
class Submitted:
    """``submit``: the submission's number, entries flushed, the PPGTT, and whether the
    batch address mapped the scratch page."""

    submission: int
    flushed: int
    ppgtt: int
    batch_scratch: bool


@dataclass(frozen=True, slots=True)
class GpuTranslation:
    """``translate``: a GPU address through the shadow PPGTT (``guest_gfn`` -1 and
    ``scratch`` when it lands on the scratch page)."""

    host_frame: int
    hpa: int
    scratch: bool
    present: bool
    level: int
    guest_gfn: int
    entry: int

    def gpa(self, va: int) -> int:
        """The guest address ``va`` reaches, or the scratch page's host address."""
        return self.hpa if self.scratch else (self.guest_gfn << 12) | (va & 0xFFF)


@dataclass(frozen=True, slots=True)
class Ppgtt:
    """A shadowed PPGTT: id, root address and reference count."""

    ppgtt: int
    root_gpa: int
    refs: int


def _call_steps(plugin: Plugin, op: str, **args: Any) -> Steps[dict[str, Any]]:
    """``op`` a step at a time when the plugin offers that, else in one step."""
    if isinstance(plugin, SteppedCalls):
        return (yield from plugin.call_steps(op, **args))
    return plugin.call(op, **args)


def build_ppgtt(plugin: Plugin, *, root_gpa: int | None = None) -> PpgttBuilt:
    """vGPU: shadow the PPGTT at ``root_gpa`` (find or create; None: a fresh root)."""
    return _typed(PpgttBuilt, plugin.call("build_ppgtt", root_gpa=root_gpa))


def build_ppgtt_steps(plugin: Plugin, *, root_gpa: int | None = None) -> Steps[PpgttBuilt]:
    """:func:`build_ppgtt` a table at a time."""
    out = yield from _call_steps(plugin, "build_ppgtt", root_gpa=root_gpa)
    return _typed(PpgttBuilt, out)


def destroy_ppgtt(plugin: Plugin, *, ppgtt: int) -> PpgttDestroyed:
    """vGPU: drop a reference to a PPGTT."""
    return _typed(PpgttDestroyed, plugin.call("destroy_ppgtt", ppgtt=ppgtt))


def submit(plugin: Plugin, *, ppgtt: int, batch_va: int | None = None) -> Submitted:
    """vGPU: a workload submission on ``ppgtt``."""
    if batch_va is None:
        return _typed(Submitted, plugin.call("submit", ppgtt=ppgtt))
    return _typed(Submitted, plugin.call("submit", ppgtt=ppgtt, batch_va=batch_va))


def submit_steps(plugin: Plugin, *, ppgtt: int) -> Steps[Submitted]:
    """:func:`submit` a table at a time (its flush may shadow new tables)."""
    out = yield from _call_steps(plugin, "submit", ppgtt=ppgtt)
    return _typed(Submitted, out)


def gpu_translate(plugin: Plugin, *, va: int, ppgtt: int) -> GpuTranslation:
    """vGPU: a GPU address through the shadow of ``ppgtt``."""
    return _typed(GpuTranslation, plugin.call("translate", va=va, ppgtt=ppgtt))


def ppgtts(plugin: Plugin) -> list[Ppgtt]:
    """vGPU: every shadowed PPGTT."""
    out = plugin.call("ppgtts")
    return [_typed(Ppgtt, dict(p)) for p in out["ppgtts"]]


__all__ = [
    "GpuTranslation",
    "Ppgtt",
    "PpgttBuilt",
    "PpgttDestroyed",
    "RootSet",
    "ShadowRoot",
    "Submitted",
    "Translation",
    "build_ppgtt",
    "build_ppgtt_steps",
    "destroy_ppgtt",
    "gpu_translate",
    "ppgtts",
    "set_root",
    "submit",
    "submit_steps",
    "translate",
]
