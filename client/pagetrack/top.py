"""``pagetrack top``: a live per-VM view of write and event rates, like ``kvm_stat``.

:func:`collect` takes one sample of every VM through a client; :func:`render` turns two
samples into a table of rates (pure: no I/O, so it is tested directly); :func:`main`
loops, refreshing the terminal every ``interval`` seconds until ``q`` or Ctrl-C. The
table fits the terminal: on a narrow one the least wanted columns are left out.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Callable, Iterator, Mapping
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


def _plugin_text(p: Any) -> str:
    """One plugin in a VM's row: name, tracked gfns, findings and failed hooks."""
    name = getattr(p, "name", "") or _kind_name(p.kind)
    text = f"{name} {p.tracked_gfns} gfns"
    findings, failures = getattr(p, "findings", 0), getattr(p, "failures", 0)
    if findings:
        text += f" {findings} findings"
    if failures:
        text += f" {failures} failed"
    return text


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
            plugins=tuple(_plugin_text(p) for p in _optional(plugins, s.vm)),
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


#: (header, justify) of every column, most wanted first: on a narrow terminal the last
#: ones are left out (the VM column never is; a long name is cut short with an ellipsis).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("VM", "left"), ("writes/s", "right"), ("events/s", "right"), ("emul/s", "right"),
    ("drops/s", "right"), ("lag", "right"), ("watch", "right"), ("fast/s", "right"),
    ("mmio/s", "right"), ("queue", "right"), ("dropped", "right"), ("tracked", "right"),
    ("plugins", "left"),
)
#: the order they are shown in, left to right
SHOWN_ORDER = ("VM", "writes/s", "mmio/s", "fast/s", "emul/s", "events/s", "drops/s",
               "dropped", "lag", "queue", "watch", "tracked", "plugins")
GAP = 2  #: spaces between columns
VM_MIN = 12  #: the VM column is never narrower than this (nor than its longest name)


def _fit(widths: Mapping[str, int], width: int | None) -> tuple[list[str], int]:
    """The columns that fit in ``width`` (all when None), by priority, and the VM
    column's width."""
    vm_full = widths["VM"]
    if width is None:
        return [name for name, _ in COLUMNS], vm_full
    vm_w = min(vm_full, max(VM_MIN, len("VM")))
    used = vm_w
    chosen = ["VM"]
    for name, _ in COLUMNS[1:]:
        if used + GAP + widths[name] <= width:
            chosen.append(name)
            used += GAP + widths[name]
    # What is left widens the VM column back toward its longest name.
    vm_w = max(vm_w, min(vm_full, vm_w + width - used))
    return chosen, vm_w


def render(
    previous: Sample | None, current: Sample, interval: float, width: int | None = None
) -> RenderableType:
    """A table of every VM: write rates by path, event and drop rates, stream lag and
    queue depth, watchers, tracked gfns and plugins; the busiest VM first.

    Rates are the counters' change between ``previous`` and ``current`` over
    ``interval`` seconds ("-" without a previous sample of the VM). Given the terminal's
    ``width``, columns are left out from the least wanted on (``COLUMNS``) until the
    table fits; the VM column and whole headers always stay.
    """
    prev_vms = previous.vms if previous is not None else {}
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
    cells: list[dict[str, Text]] = []
    for _, v, p, writes, events in rows:
        drops = _rate(v.dropped, p.dropped if p else None, interval)
        cells.append({
            "VM": Text(v.vm),
            "writes/s": Text(_fmt_rate(writes)),
            "mmio/s": Text(_fmt_rate(_rate(v.mmio_exit, p.mmio_exit if p else None, interval))),
            "fast/s": Text(_fmt_rate(_rate(v.fast, p.fast if p else None, interval))),
            "emul/s": Text(_fmt_rate(_rate(v.emulated, p.emulated if p else None, interval))),
            "events/s": Text(_fmt_rate(events)),
            "drops/s": Text(_fmt_rate(drops), style="bold red" if drops else ""),
            "dropped": Text(str(v.dropped)),
            "lag": Text(str(v.lag), style="yellow" if v.lag else ""),
            "queue": Text(str(v.queue_depth)),
            "watch": Text(str(v.watchers)),
            "tracked": Text(str(v.tracked_gfns)),
            "plugins": Text(", ".join(v.plugins) or "-"),
        })
    widths = {
        name: max([len(name), *(row[name].cell_len for row in cells)]) for name, _ in COLUMNS
    }
    chosen, vm_w = _fit(widths, width)
    justify = dict(COLUMNS)
    table = Table(box=None, header_style="bold reverse", pad_edge=False, expand=False,
                  padding=(0, GAP // 2))
    shown = [name for name in SHOWN_ORDER if name in chosen]
    for name in shown:
        table.add_column(
            name, justify=justify[name], no_wrap=True,  # type: ignore[arg-type]
            overflow="ellipsis", width=vm_w if name == "VM" else widths[name],
        )
    for row in cells:
        table.add_row(*(row[name] for name in shown))
    hidden = len(COLUMNS) - len(shown)
    summary = (f"  {len(current.vms)} VMs  writes/s {_fmt_rate(total_writes)}"
               f"  events/s {_fmt_rate(total_events)}")
    # The longest header line that fits: what is said last goes first.
    for extra, note in (
        (f"  every {interval:.1f}s  q quits", f"  ({hidden} columns hidden)"),
        ("  q quits", f"  ({hidden} hidden)"),
        ("  q quits", ""),
        ("", ""),
    ):
        note = note if hidden else ""
        if width is None or len("pagetrack top" + summary + extra + note) <= width:
            break
    head = Text.assemble(("pagetrack top", "bold"), summary + extra, (note, "dim"))
    parts: list[RenderableType] = [head]
    if current.error:
        parts.append(Text(f"daemon unreachable: {current.error}", style="bold red"))
    parts.append(table)
    if not current.vms and not current.error:
        parts.append(Text("no VMs", style="dim"))
    return Group(*parts)


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """A function that waits up to its argument in seconds for a key press and returns
    it ("" if none). On a terminal, keys are read one at a time without Enter (cbreak
    mode, put back afterwards); elsewhere it only waits."""
    stdin = sys.stdin
    if not stdin.isatty():
        def wait(timeout: float) -> str:
            time.sleep(timeout)
            return ""

        yield wait
        return
    import termios
    import tty

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 32).decode(errors="replace") if ready else ""

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def main(
    client: Any,
    interval: float = 1.0,
    *,
    iterations: int | None = None,
    console: Console | None = None,
) -> None:
    """Show the live view until ``q`` or Ctrl-C (or for ``iterations`` refreshes),
    fitting the table to the terminal's width at every refresh."""
    interval = max(0.1, interval)
    console = console or Console()
    previous: Sample | None = None
    current = collect(client)
    done = 0
    try:
        with _keys() as key, Live(
            render(None, current, interval, console.size.width), console=console,
            auto_refresh=False, screen=False, transient=False,
        ) as live:
            while iterations is None or done < iterations:
                pressed = key(max(0.0, current.at + interval - time.monotonic()))
                if "q" in pressed.lower():
                    return
                if pressed and time.monotonic() < current.at + interval:
                    continue  # another key: keep waiting for the refresh
                previous, current = current, collect(client)
                live.update(
                    render(previous, current, current.at - previous.at, console.size.width),
                    refresh=True,
                )
                done += 1
    except KeyboardInterrupt:
        pass
