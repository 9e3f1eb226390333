"""``pagetrack top``: a live per-VM view of write and event rates, like ``kvm_stat``.

:func:`collect` takes one sample of every VM through a client; :func:`render` turns two
samples into a table of rates (pure: no I/O, so it is tested directly); :func:`main`
loops, refreshing the terminal every ``interval`` seconds until Ctrl-C.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg

__all__ = ["Sample", "VmSample", "collect", "main", "render"]


@dataclass(frozen=True, slots=True)
class VmSample:
    """One VM's counters at one moment."""

    vm: str
    guest_writes: int = 0  #: write calls
    mmio_exit: int = 0  #: pieces by path
    fast: int = 0
    emulated: int = 0
    events: int = 0  #: the head seq: events produced so far
    dropped: int = 0  #: events lost by Watch streams
    coalesced: int = 0
    tracked_gfns: int = 0
    watchers: int = 0
    lag: int = 0  #: largest lag of a Watch stream, events
    queue_depth: int = 0  #: events queued over the VM's streams
    plugins: tuple[str, ...] = ()  #: e.g. "vgpu 4 gfns"


@dataclass(frozen=True, slots=True)
class Sample:
    """Every VM at one moment (``at`` is monotonic seconds)."""

    at: float
    vms: Mapping[str, VmSample] = field(default_factory=dict)
    error: str = ""  #: set when the daemon could not be reached


# ------------------------------------------------------------------------------ sampling


def _kind_name(kind: Any) -> str:
    if isinstance(kind, int) and not isinstance(kind, str):
        value = pb.PluginKind.ValueType(kind)
        name = pb.PluginKind.Name(value) if kind in pb.PluginKind.values() else str(kind)
        return name.removeprefix("PLUGIN_KIND_").lower().replace("_", "-")
    return str(kind)


def _is_watch(kind: Any) -> bool:
    return bool(kind == pb.NOTIFIER_KIND_WATCH or str(kind) == "watch")


class _Stubs:
    """The few client methods top needs, over a plain gRPC channel (for callers without
    a :class:`pagetrack.Client`)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._admin = pbg.AdminServiceStub(channel)
        self._watch = pbg.WatchServiceStub(channel)
        self._plugins = pbg.PluginServiceStub(channel)

    def stats(self) -> list[Any]:
        return list(self._admin.GetStats(pb.GetStatsRequest()).vms)

    def list_notifiers(self, vm: str) -> list[Any]:
        return list(self._watch.ListNotifiers(pb.ListNotifiersRequest(vm=vm)).notifiers)

    def list_plugins(self, vm: str) -> list[Any]:
        return list(self._plugins.ListPlugins(pb.ListPluginsRequest(vm=vm)).plugins)


def _optional(call: Callable[[str], list[Any]] | None, vm: str) -> list[Any]:
    if call is None:
        return []
    try:
        return call(vm)
    except Exception:  # the VM went away between calls, or the method is missing
        return []


def collect(client: Any) -> Sample:
    """One sample of every VM of the caller's tenant.

    ``client`` is a :class:`pagetrack.Client` (anything with ``stats()``, and optionally
    ``list_notifiers(vm)`` and ``list_plugins(vm)``) or a ``grpc.Channel``.
    """
    if isinstance(client, grpc.Channel):
        client = _Stubs(client)
    at = time.monotonic()
    try:
        stats = client.stats()
    except Exception as exc:  # keep the view up while the daemon restarts
        return Sample(at, {}, error=str(getattr(exc, "message", None) or exc).splitlines()[0])
    notifiers = getattr(client, "list_notifiers", None)
    plugins = getattr(client, "list_plugins", None)
    vms: dict[str, VmSample] = {}
    for s in stats:
        watches = [n for n in _optional(notifiers, s.vm) if _is_watch(n.kind)]
        vms[s.vm] = VmSample(
            vm=s.vm,
            guest_writes=s.guest_writes,
            mmio_exit=s.writes.mmio_exit,
            fast=s.writes.fast,
            emulated=s.writes.emulated,
            events=s.head_seq,
            dropped=s.events_dropped,
            coalesced=s.events_coalesced,
            tracked_gfns=s.tracked_gfns,
            watchers=len(watches),
            lag=max((n.lag for n in watches), default=0),
            queue_depth=sum(n.queue_depth for n in watches),
            plugins=tuple(
                f"{_kind_name(p.kind)} {p.tracked_gfns} gfns"
                for p in _optional(plugins, s.vm)
            ),
        )
    return Sample(at, vms)


# ------------------------------------------------------------------------------ rendering


def _rate(cur: int, prev: int | None, interval: float) -> float | None:
    if prev is None or interval <= 0:
        return None
    return max(0, cur - prev) / interval


def _fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 1e6:
        return f"{r / 1e6:.1f}M"
    if r >= 1e4:
        return f"{r / 1e3:.0f}k"
    return f"{r:.0f}"


def render(
    previous: Sample | None, current: Sample, interval: float
) -> RenderableType:
    """A table of every VM: write rates by path, event and drop rates, stream lag and
    queue depth, watchers, tracked gfns and plugins; the busiest VM first.

    Rates are the counters' change between ``previous`` and ``current`` over
    ``interval`` seconds ("-" without a previous sample of the VM).
    """
    prev_vms = previous.vms if previous is not None else {}
    table = Table(box=None, header_style="bold reverse", pad_edge=False, expand=False)
    for name, justify in (
        ("VM", "left"), ("writes/s", "right"), ("mmio/s", "right"), ("fast/s", "right"),
        ("emul/s", "right"), ("events/s", "right"), ("drops/s", "right"),
        ("dropped", "right"), ("lag", "right"), ("queue", "right"), ("watch", "right"),
        ("tracked", "right"), ("plugins", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    rows = []
    total_writes = total_events = 0.0
    for v in current.vms.values():
        p = prev_vms.get(v.vm)
        writes = _rate(v.guest_writes, p.guest_writes if p else None, interval)
        events = _rate(v.events, p.events if p else None, interval)
        total_writes += writes or 0
        total_events += events or 0
        rows.append((writes or 0.0, v, p, writes, events))
    rows.sort(key=lambda r: (-r[0], r[1].vm))
    for _, v, p, writes, events in rows:
        drops = _rate(v.dropped, p.dropped if p else None, interval)
        table.add_row(
            v.vm,
            _fmt_rate(writes),
            _fmt_rate(_rate(v.mmio_exit, p.mmio_exit if p else None, interval)),
            _fmt_rate(_rate(v.fast, p.fast if p else None, interval)),
            _fmt_rate(_rate(v.emulated, p.emulated if p else None, interval)),
            _fmt_rate(events),
            Text(_fmt_rate(drops), style="bold red" if drops else ""),
            str(v.dropped),
            Text(str(v.lag), style="yellow" if v.lag else ""),
            str(v.queue_depth),
            str(v.watchers),
            str(v.tracked_gfns),
            ", ".join(v.plugins) or "-",
        )
    head = Text.assemble(
        ("pagetrack top", "bold"),
        f"  {len(current.vms)} VMs  writes/s {_fmt_rate(total_writes)}"
        f"  events/s {_fmt_rate(total_events)}  interval {interval:.1f}s",
    )
    parts: list[RenderableType] = [head]
    if current.error:
        parts.append(Text(f"daemon unreachable: {current.error}", style="bold red"))
    parts.append(table)
    if not current.vms and not current.error:
        parts.append(Text("no VMs", style="dim"))
    return Group(*parts)


def main(
    client: Any,
    interval: float = 1.0,
    *,
    iterations: int | None = None,
    console: Console | None = None,
) -> None:
    """Show the live view until Ctrl-C (or for ``iterations`` refreshes)."""
    interval = max(0.1, interval)
    previous: Sample | None = None
    current = collect(client)
    done = 0
    try:
        with Live(
            render(None, current, interval), console=console, auto_refresh=False,
            screen=False, transient=False,
        ) as live:
            while iterations is None or done < iterations:
                time.sleep(max(0.0, current.at + interval - time.monotonic()))
                previous, current = current, collect(client)
                live.update(render(previous, current, current.at - previous.at), refresh=True)
                done += 1
    except KeyboardInterrupt:
        pass
