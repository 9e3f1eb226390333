"""``pagetrack``: the command line for pagetrackd.

Every command talks to the daemon at ``--target`` (env PAGETRACK_TARGET); given several,
comma-separated, each VM is placed on one of them by its name (``pagetrack.sharded``) and
listings merge them all. Errors print
one line, ``pagetrack: <message>``, on stderr: exit status 2 for bad usage, 1 for errors
reported by the daemon (or when it cannot be reached).

Start-up stays fast: importing this module loads typer, rich and ``pagetrack.constants``,
never grpc, numpy, the client or its types. A command imports what it needs
inside its function (``_client`` does it for the daemon's client), so ``--help`` and
usage errors cost no more than typer; tests/cli/test_startup.py holds it to that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TextIO, TypeGuard, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from pagetrack import _cliparse as cp
from pagetrack.constants import (
    DEFAULT_TARGET,
    DmaPolicy,
    EventSource,
    PluginKind,
    Semantics,
    SlowConsumerPolicy,
    WorkloadKind,
)
from pagetrack.targets import normalize_target

if TYPE_CHECKING:
    from pagetrack.client import Client, SyncWatchStream
    from pagetrack.sharded import ShardedClient
    from pagetrack.types import Event, WatchMessage

T = TypeVar("T")

app = typer.Typer(
    name="pagetrack",
    help="Command line for pagetrackd: Linux KVM's x86 page-track (guest write tracking)"
    " as a service. Create VMs and memslots, track pages, write guest memory and watch"
    " the write events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
vm_app = typer.Typer(help="Create, list, show, change and delete VMs.", no_args_is_help=True)
slot_app = typer.Typer(help="Set and list memslots (guest RAM and ROM regions).",
                       no_args_is_help=True)
track_app = typer.Typer(help="Add, remove and show write tracking of gfns.", no_args_is_help=True)
workload_app = typer.Typer(help="Start, stop and inspect simulated write workloads.",
                           no_args_is_help=True)
plugin_app = typer.Typer(
    help="Attach, detach and audit in-process plugins (built-in or installed).",
    no_args_is_help=True,
)
lease_app = typer.Typer(help="Leases: tracking that is released when it is not kept alive.",
                        no_args_is_help=True)
app.add_typer(vm_app, name="vm")
app.add_typer(slot_app, name="slot")
app.add_typer(track_app, name="track")
app.add_typer(workload_app, name="workload")
app.add_typer(plugin_app, name="plugin")
export_app = typer.Typer(help="Export VMs' events to a message broker.", no_args_is_help=True)
app.add_typer(lease_app, name="lease")
app.add_typer(export_app, name="export")

#: tables keep their natural width when piped (rich would fold them at 80 columns)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)


@dataclasses.dataclass
class Settings:
    """Global options, kept on the typer context."""

    target: str
    token: str | None
    ca_file: str | None
    timeout: float
    json: bool


class StartableKind(StrEnum):
    """The workload kinds ``workload start`` offers (WorkloadKind without "unspecified")."""

    GPU_PPGTT = WorkloadKind.GPU_PPGTT.value
    GUEST_PAGETABLES = WorkloadKind.GUEST_PAGETABLES.value
    RANDOM_WRITES = WorkloadKind.RANDOM_WRITES.value
    KERNEL_BUILD = WorkloadKind.KERNEL_BUILD.value


class WatchFormat(StrEnum):
    """Output format of ``watch``."""

    TEXT = "text"
    JSONL = "jsonl"


# --------------------------------------------------------------------------- plumbing


def _usage(message: str) -> NoReturn:
    raise typer.BadParameter(message)


def _parsed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a parser; its ValueError becomes a usage error (exit 2)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        _usage(str(exc))


def _settings(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    assert isinstance(obj, Settings)
    return obj


@contextlib.contextmanager
def _client(ctx: typer.Context) -> Iterator[Client | ShardedClient]:
    """A Client, or a ShardedClient when --target lists several daemons."""
    from pagetrack.client import Client
    from pagetrack.errors import Unavailable
    from pagetrack.sharded import ShardedClient

    s = _settings(ctx)
    kwargs: dict[str, Any] = {"token": s.token, "ca_file": s.ca_file, "timeout": s.timeout}
    if "," in s.target:
        with ShardedClient(s.target, **kwargs) as sharded:
            try:
                yield sharded
            except Unavailable as exc:  # the message names the daemon
                raise Unavailable(f"cannot reach pagetrackd at {exc}") from None
        return
    with Client(s.target, **kwargs) as client:
        try:
            yield client
        except Unavailable as exc:
            raise Unavailable(f"cannot reach pagetrackd at {client.target}: {exc}") from None


def _is_sharded(c: Client | ShardedClient) -> TypeGuard[ShardedClient]:
    from pagetrack.sharded import ShardedClient

    return isinstance(c, ShardedClient)


def _emit_json(ctx: typer.Context, value: Any) -> bool:
    """With --json, print ``value`` as JSON and return True."""
    if not _settings(ctx).json:
        return False
    out.print_json(json.dumps(cp.jsonable(value)))
    return True


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _ts(ns: int) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


# --------------------------------------------------------------------------- root


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"pagetrack {version('pagetrack')}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Option(
            "--target", "-t", envvar="PAGETRACK_TARGET",
            help="Daemon address: HOST:PORT or unix:PATH. Several, comma-separated: each VM"
            " lives on one of them, chosen by its name.",
        ),
    ] = DEFAULT_TARGET,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="PAGETRACK_TOKEN", show_default=False,
            help="Bearer token (sent as 'authorization: Bearer <token>').",
        ),
    ] = None,
    ca_file: Annotated[
        str | None,
        typer.Option(
            "--ca-file", envvar="PAGETRACK_CA_FILE", show_default=False,
            help="PEM CA certificate: connect with TLS and verify the daemon against it.",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for each call.")
    ] = 30.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print results as JSON instead of tables.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version,
                     help="Print pagetrack's version and exit."),
    ] = False,
) -> None:
    """Command line for pagetrackd."""
    for one in target.split(","):
        if one.strip():
            _parsed(normalize_target, one)
    ctx.obj = Settings(target, token, ca_file, timeout, as_json)


@app.command("info")
def info_cmd(ctx: typer.Context) -> None:
    """Show the daemon's version, limits and who it thinks you are."""
    with _client(ctx) as c:
        if _is_sharded(c):
            infos = c.server_infos()
        else:
            infos = {c.target: c.server_info()}
    if _emit_json(ctx, infos if len(infos) > 1 else next(iter(infos.values()))):
        return
    for i, (target, info) in enumerate(infos.items()):
        if i:
            out.print()
        _print_info(target, info)


def _print_info(target: str, info: Any) -> None:
    out.print(f"pagetrackd {info.version} at {target}")
    out.print(f"caller: tenant {info.tenant!r}, role {info.role}")
    out.print(f"started: {_ts(info.started_at_ns)}")
    lim = info.limits
    out.print(
        f"limits: write {cp.human_bytes(lim.max_write_bytes)}, batch {lim.max_batch_writes}"
        f" writes, {lim.max_gfns_per_request} gfns/request, watch batches up to"
        f" {lim.max_watch_batch_events} events"
    )


# --------------------------------------------------------------------------- vm


@vm_app.command("create")
def vm_create(
    ctx: typer.Context,
    name: Annotated[
        str,
        typer.Argument(help="VM name: 1 to 63 lowercase letters, digits, '.', '_' and '-',"
                       " starting and ending with a letter or digit."),
    ],
    dma_policy: Annotated[
        DmaPolicy | None,
        typer.Option("--dma-policy", help="What DMA to tracked gfns does (default bypass)."),
    ] = None,
    semantics: Annotated[
        Semantics | None,
        typer.Option("--semantics", help="Memslot move rules to follow (default 2016)."),
    ] = None,
    vcpus: Annotated[
        int | None, typer.Option("--vcpus", min=1, help="Number of vCPUs (default 8).")
    ] = None,
    max_memslots: Annotated[
        int | None, typer.Option("--max-memslots", min=1, help="Most memslots at once.")
    ] = None,
    gfn_bits: Annotated[
        int | None, typer.Option("--gfn-bits", min=1, help="Width of a gfn in bits.")
    ] = None,
    history_events: Annotated[
        int | None,
        typer.Option("--history-events", min=0, help="Events kept for Watch resume (0 = none)."),
    ] = None,
    record: Annotated[
        bool,
        typer.Option("--record", help="Record every operation, for 'recording' and 'replay'."),
    ] = False,
) -> None:
    """Create a VM with no memslots."""
    with _client(ctx) as c:
        vm = c.create_vm(
            name, dma_policy=dma_policy, semantics=semantics, vcpus=vcpus,
            max_memslots=max_memslots, gfn_bits=gfn_bits, history_events=history_events,
            record=record,
        )
    if not _emit_json(ctx, vm):
        out.print(
            f"created VM {vm.name}: {vm.options.limits.max_vcpus} vCPUs, dma policy"
            f" {vm.options.dma_policy}, semantics {vm.options.semantics}"
        )


@vm_app.command("list")
def vm_list(
    ctx: typer.Context,
    all_tenants: Annotated[
        bool, typer.Option("--all-tenants", help="Every tenant's VMs (admin only).")
    ] = False,
) -> None:
    """List VMs."""
    with _client(ctx) as c:
        if _is_sharded(c):  # several daemons: say which one holds each VM
            placed = c.list_vms_by_daemon(all_tenants=all_tenants)
        else:
            placed = [("", vm) for vm in c.list_vms(all_tenants=all_tenants)]
    several = "," in _settings(ctx).target
    if _emit_json(ctx, [{**cp.jsonable(vm), "daemon": where} if several else vm
                        for where, vm in placed]):
        return
    table = _table(*(["daemon"] if several else []), "name", "tenant", "slots", "tracked",
                   "head seq", "notifiers", "workloads", "dma policy")
    for where, vm in placed:
        table.add_row(
            *([where] if several else []),
            vm.name, vm.tenant, str(vm.memslot_count), str(vm.tracked_gfns), str(vm.head_seq),
            str(vm.notifier_count), str(vm.running_workloads), vm.options.dma_policy.value,
        )
    out.print(table if placed else "no VMs")


@vm_app.command("show")
def vm_show(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="VM name.")]
) -> None:
    """Show a VM, its memslots and its options."""
    with _client(ctx) as c:
        vm = c.get_vm(name)
        slots = c.list_memory_regions(name)
    if _emit_json(ctx, {"vm": vm, "memslots": slots}):
        return
    o = vm.options
    out.print(f"VM {vm.name} (tenant {vm.tenant}), created {_ts(vm.created_at_ns)}")
    out.print(
        f"  vcpus {o.limits.max_vcpus}, dma policy {o.dma_policy}, semantics {o.semantics},"
        f" gfn bits {o.limits.gfn_bits}"
    )
    out.print(
        f"  tracked gfns {vm.tracked_gfns}, resident pages {vm.resident_pages},"
        f" seq {vm.head_seq} (history from {vm.oldest_seq}), notifiers {vm.notifier_count},"
        f" workloads {vm.running_workloads}"
    )
    if vm.plugins:
        out.print(f"  plugins: {', '.join(p.value for p in vm.plugins)}")
    _print_slots(slots)


@vm_app.command("delete")
def vm_delete(ctx: typer.Context, name: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """Delete a VM and everything in it."""
    with _client(ctx) as c:
        last = c.delete_vm(name)
    if not _emit_json(ctx, {"vm": name, "last_seq": last}):
        out.print(f"deleted VM {name} (last seq {last})")


@vm_app.command("policy")
def vm_policy(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="VM name.")],
    dma_policy: Annotated[
        DmaPolicy | None, typer.Option("--dma-policy", help="New DMA policy.")
    ] = None,
    semantics: Annotated[
        Semantics | None, typer.Option("--semantics", help="New memslot semantics.")
    ] = None,
) -> None:
    """Change a VM's DMA policy or semantics."""
    with _client(ctx) as c:
        vm = c.set_policy(name, dma_policy=dma_policy, semantics=semantics)
    if not _emit_json(ctx, vm):
        out.print(
            f"VM {vm.name}: dma policy {vm.options.dma_policy}, semantics {vm.options.semantics}"
        )


# --------------------------------------------------------------------------- slot


def _print_slots(slots: list[Any]) -> None:
    if not slots:
        out.print("no memslots")
        return
    table = _table("slot", "gpa range", "gfns", "size", "flags", "tracked", "dirty")
    for s in slots:
        flags = ",".join(f for f, on in (("ro", s.readonly), ("log-dirty", s.log_dirty_pages))
                         if on) or "-"
        table.add_row(
            str(s.slot),
            f"{s.base_gpa:#x}-{s.base_gpa + s.size_bytes - 1:#x}",
            f"{s.base_gfn:#x}+{s.npages}",
            cp.human_bytes(s.size_bytes),
            flags,
            str(s.tracked_gfns),
            str(s.dirty_pages),
        )
    out.print(table)


@slot_app.command("set")
def slot_set(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    slot: Annotated[int, typer.Argument(min=0, help="Slot id.")],
    base: Annotated[
        str | None,
        typer.Argument(help="Start: a guest-physical address (0, 0x100000, 4G); a gfn with"
                       " --pages.", show_default=False),
    ] = None,
    size: Annotated[
        str | None,
        typer.Argument(help="Size in bytes (16M, 4G, 0x10000); in pages with --pages.",
                       show_default=False),
    ] = None,
    pages: Annotated[
        bool, typer.Option("--pages", help="BASE is a gfn and SIZE a page count.")
    ] = False,
    readonly: Annotated[
        bool, typer.Option("--readonly", help="Read-only slot: guest writes exit as MMIO.")
    ] = False,
    log_dirty: Annotated[
        bool, typer.Option("--log-dirty", help="Log dirty pages (see dirty-log).")
    ] = False,
    delete: Annotated[
        bool, typer.Option("--delete", help="Delete the slot (BASE and SIZE not needed).")
    ] = False,
) -> None:
    """Create, move, re-flag or delete a memslot (KVM_SET_USER_MEMORY_REGION)."""
    if delete:
        base_gfn = npages = 0
    else:
        if base is None or size is None:
            _usage("give BASE and SIZE (or --delete)")
        if pages:
            base_gfn = _parsed(cp.parse_int, base)
            npages = _parsed(cp.parse_int, size)
        else:
            base_gfn = _parsed(cp.size_to_pages, base, "BASE")
            npages = _parsed(cp.size_to_pages, size, "SIZE")
        if npages == 0:
            _usage("SIZE must be at least one page (use --delete to delete a slot)")
    with _client(ctx) as c:
        change = c.set_memory_region(
            vm, slot, base_gfn, npages, readonly=readonly, log_dirty_pages=log_dirty
        )
    if _emit_json(ctx, change):
        return
    r = change.region
    if change.change.value == "delete":
        out.print(f"slot {slot}: deleted")
    else:
        out.print(
            f"slot {slot}: {change.change.value}, gpa {r.base_gpa:#x}-"
            f"{r.base_gpa + r.size_bytes - 1:#x} ({r.npages} pages, {cp.human_bytes(r.size_bytes)})"
        )


@slot_app.command("list")
def slot_list(ctx: typer.Context, vm: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """List a VM's memslots."""
    with _client(ctx) as c:
        slots = c.list_memory_regions(vm)
    if not _emit_json(ctx, slots):
        _print_slots(slots)


# --------------------------------------------------------------------------- track

_SPEC_HELP = "Gfns: 0x1000-0x1fff (inclusive), 0x1000+16 (start and count), 42, or comma lists."


@track_app.command("add")
def track_add(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    specs: Annotated[list[str], typer.Argument(help=_SPEC_HELP, metavar="GFNS...")],
    lease: Annotated[
        str | None,
        typer.Option("--lease", help="Lease id owning the references (released with it)."),
    ] = None,
) -> None:
    """Write-track gfns (one reference each)."""
    ranges, gfns = _parsed(cp.parse_gfn_specs, specs)
    with _client(ctx) as c:
        res = c.add_tracking(vm, gfns, ranges=ranges, lease_id=lease)
    if not _emit_json(ctx, res):
        out.print(
            f"added {res.references} references; {res.transitions} gfns newly tracked;"
            f" {res.tracked_gfns} tracked in {vm}"
        )


@track_app.command("remove")
def track_remove(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    specs: Annotated[list[str], typer.Argument(help=_SPEC_HELP, metavar="GFNS...")],
    lease: Annotated[
        str | None, typer.Option("--lease", help="Lease id that holds the references.")
    ] = None,
) -> None:
    """Remove one tracking reference per gfn."""
    ranges, gfns = _parsed(cp.parse_gfn_specs, specs)
    with _client(ctx) as c:
        res = c.remove_tracking(vm, gfns, ranges=ranges, lease_id=lease)
    if not _emit_json(ctx, res):
        out.print(
            f"removed {res.references} references; {res.transitions} gfns no longer tracked;"
            f" {res.tracked_gfns} tracked in {vm}"
        )


@track_app.command("show")
def track_show(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    specs: Annotated[
        list[str] | None,
        typer.Argument(help=_SPEC_HELP + " Default: every tracked gfn.", metavar="[GFNS...]",
                       show_default=False),
    ] = None,
    owners: Annotated[bool, typer.Option("--owners", help="Show who holds each reference.")]
    = False,
    only_tracked: Annotated[
        bool, typer.Option("--only-tracked", help="Skip gfns that are not tracked.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Rows to print (0 = all).")]
    = 200,
) -> None:
    """Show tracking state: counters, write protection, large-page state, owners."""
    if specs:
        ranges, gfns = _parsed(cp.parse_gfn_specs, specs)
    else:
        ranges, gfns, only_tracked = [], [], True
    with _client(ctx) as c:
        states = c.query_tracking(
            vm, gfns, ranges=ranges, only_tracked=only_tracked, include_owners=owners
        )
    if _emit_json(ctx, states):
        return
    if not states:
        out.print("no tracked gfns" if not specs else "nothing to show")
        return
    columns = ["gfn", "slot", "counter", "write-protected", "no 2M", "no 1G"]
    table = _table(*(columns + (["owners"] if owners else [])))
    shown = states if not limit else states[:limit]
    for s in shown:
        row = [
            f"{s.gfn:#x}", str(s.slot) if s.in_memslot else "-", str(s.counter),
            "yes" if s.write_protected else "no", "yes" if s.lpage_2m_disallowed else "no",
            "yes" if s.lpage_1g_disallowed else "no",
        ]
        if owners:
            row.append(", ".join(f"{o.kind.value}:{o.id or '-'}x{o.count}" for o in s.owners))
        table.add_row(*row)
    out.print(table)
    if len(states) > len(shown):
        out.print(f"... {len(states) - len(shown)} more (use --limit 0 to see all)")
    tracked = sum(1 for s in states if s.tracked)
    out.print(f"{tracked} of {len(states)} gfns tracked")


# --------------------------------------------------------------------------- memory access


def _data_arg(data: str, hex_: bool, text: bool, width: int = 0) -> bytes:
    """DATA as bytes: an integer stored little-endian in ``width`` bytes, or else 0xHEX
    (bytes in order), @FILE or text."""
    if hex_ and text:
        _usage("--hex and --text exclude each other")
    if width:
        if hex_ or text:
            _usage("--hex and --text do not go with --u8/--u16/--u32/--u64")
        return _parsed(cp.parse_uint_le, data, width)
    raw = _parsed(cp.parse_data, data, force_hex=hex_, force_text=text)
    if not raw:
        _usage("DATA is empty")
    return raw


def _width(u8: bool, u16: bool, u32: bool, u64: bool) -> int:
    """Bytes of the integer store asked for (0: DATA is bytes)."""
    chosen = [w for w, on in ((1, u8), (2, u16), (4, u32), (8, u64)) if on]
    if len(chosen) > 1:
        _usage("give at most one of --u8, --u16, --u32, --u64")
    return chosen[0] if chosen else 0


_DATA_HELP = (
    "What to write. Bytes, in order: 0xHEX (0x1122 writes 0x11, then 0x22), @FILE, or text"
    " (UTF-8). With --u8/--u16/--u32/--u64: an integer (0x.. or decimal) stored as x86"
    " stores it, little-endian (--u32 0x11223344 writes 44 33 22 11)."
)
_U8 = typer.Option("--u8", help="DATA is an integer stored in 1 byte.")
_U16 = typer.Option("--u16", help="DATA is an integer stored little-endian in 2 bytes.")
_U32 = typer.Option("--u32", help="DATA is an integer stored little-endian in 4 bytes.")
_U64 = typer.Option("--u64", help="DATA is an integer stored little-endian in 8 bytes.")


@app.command("write")
def write_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    gpa: Annotated[str, typer.Argument(help="Guest-physical address (0x1000, 4G).")],
    data: Annotated[str, typer.Argument(help=_DATA_HELP)],
    vcpu: Annotated[int, typer.Option("--vcpu", min=0, help="Writing vCPU.")] = 0,
    hex_: Annotated[bool, typer.Option("--hex", help="DATA is hex even without 0x.")] = False,
    text: Annotated[bool, typer.Option("--text", help="DATA is text even if it looks like hex.")]
    = False,
    u8: Annotated[bool, _U8] = False,
    u16: Annotated[bool, _U16] = False,
    u32: Annotated[bool, _U32] = False,
    u64: Annotated[bool, _U64] = False,
) -> None:
    """Write guest memory from a vCPU (MMIO exit, fast path, or trapped and notified).

    DATA is bytes in order unless --u8/--u16/--u32/--u64 make it an integer store:
    'write vm1 0x1000 0x1122' writes 11 22; 'write vm1 0x1000 --u16 0x1122' writes 22 11.
    """
    address = _parsed(cp.parse_size, gpa)
    raw = _data_arg(data, hex_, text, _width(u8, u16, u32, u64))
    with _client(ctx) as c:
        res = c.write(vm, address, raw, vcpu=vcpu)
    if _emit_json(ctx, res):
        return
    for p in res.pieces:
        seq = f" seq {p.seq}" if p.seq is not None else ""
        out.print(f"{p.gpa:#x} +{p.length}: {p.path.value}{seq}")
    out.print(f"{len(raw)} bytes, {res.cycles} cycles")


@app.command("cmpxchg")
def cmpxchg_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    gpa: Annotated[str, typer.Argument(help="Guest-physical address.")],
    expected: Annotated[
        str, typer.Argument(help="Bytes memory must hold: 0xHEX, @FILE, or text (UTF-8).")
    ],
    desired: Annotated[
        str, typer.Argument(help="Bytes to store, as many as EXPECTED, written the same way.")
    ],
    vcpu: Annotated[int, typer.Option("--vcpu", min=0, help="Writing vCPU.")] = 0,
    hex_: Annotated[bool, typer.Option("--hex", help="Both are hex even without 0x.")] = False,
    text: Annotated[bool, typer.Option("--text", help="Both are text even if they look like hex.")]
    = False,
) -> None:
    """A guest LOCK CMPXCHG: 1, 2, 4 or 8 bytes exchanged atomically, notified only if
    memory held EXPECTED (other sizes and page-crossing accesses are done as a write)."""
    address = _parsed(cp.parse_size, gpa)
    old = _data_arg(expected, hex_, text)
    new = _data_arg(desired, hex_, text)
    with _client(ctx) as c:
        res = c.cmpxchg(vm, address, old, new, vcpu=vcpu)
    if _emit_json(ctx, res):
        return
    for p in res.pieces:
        seq = f" seq {p.seq}" if p.seq is not None else ""
        out.print(f"{p.gpa:#x} +{p.length}: {p.path.value}{seq}")
    if res.as_write:
        out.print("done as a plain write (not 1, 2, 4 or 8 bytes inside one page of RAM)")
    elif res.exchanged:
        out.print(f"exchanged (memory held 0x{res.current.hex()})")
    else:
        out.print(f"not exchanged: memory holds 0x{res.current.hex()}")


@app.command("dma")
def dma_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    gpa: Annotated[str, typer.Argument(help="Guest-physical address.")],
    data: Annotated[str, typer.Argument(help=_DATA_HELP)],
    hex_: Annotated[bool, typer.Option("--hex", help="DATA is hex even without 0x.")] = False,
    text: Annotated[bool, typer.Option("--text", help="DATA is text even if it looks like hex.")]
    = False,
    u8: Annotated[bool, _U8] = False,
    u16: Annotated[bool, _U16] = False,
    u32: Annotated[bool, _U32] = False,
    u64: Annotated[bool, _U64] = False,
) -> None:
    """A device-model DMA write, handled by the VM's DMA policy (DATA as for 'write')."""
    address = _parsed(cp.parse_size, gpa)
    raw = _data_arg(data, hex_, text, _width(u8, u16, u32, u64))
    with _client(ctx) as c:
        res = c.dma_write(vm, address, raw)
    if _emit_json(ctx, res):
        return
    for p in res.pieces:
        seq = f" seq {p.seq}" if p.seq is not None else ""
        out.print(f"{p.gpa:#x} +{p.length}: {p.path.value}{seq}")


@app.command("read")
def read_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    gpa: Annotated[str, typer.Argument(help="Guest-physical address.")],
    length: Annotated[str, typer.Argument(help="Bytes to read (64, 0x100, 4K).")],
    raw: Annotated[bool, typer.Option("--raw", help="Write the bytes to stdout as they are.")]
    = False,
) -> None:
    """Read guest memory and print a hexdump."""
    address = _parsed(cp.parse_size, gpa)
    n = _parsed(cp.parse_size, length)
    if n == 0:
        _usage("LEN must be at least 1")
    with _client(ctx) as c:
        data = c.read(vm, address, n)
    if raw:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    elif not _emit_json(ctx, {"gpa": address, "length": n, "data": data}):
        out.print(cp.hexdump(data, address), markup=False)


@app.command("dirty-log")
def dirty_log_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    slot: Annotated[int, typer.Argument(min=0, help="Slot id (created with --log-dirty).")],
) -> None:
    """Read and clear a slot's dirty log; print the dirty gfns."""
    with _client(ctx) as c:
        log = c.get_dirty_log(vm, slot)
    gfns = log.dirty_gfns().tolist()
    if _emit_json(ctx, {"slot": log.slot, "base_gfn": log.base_gfn, "npages": log.npages,
                        "dirty_count": log.dirty_count, "dirty_gfns": gfns}):
        return
    out.print(f"slot {log.slot}: {log.dirty_count} of {log.npages} pages dirty")
    if gfns:
        out.print(cp.format_runs(cp.compress_ranges(gfns)), markup=False)


# --------------------------------------------------------------------------- watch


def _event_json(e: Event) -> dict[str, Any]:
    """An event's JSON line: numbers are numbers (``gpa_hex`` repeats gpa for people)."""
    return {
        "type": "event", "seq": e.seq, "vm": e.vm, "vcpu": e.vcpu, "gpa": e.gpa,
        "gpa_hex": f"{e.gpa:#x}", "gfn": e.gfn, "length": e.length, "data": e.data.hex(),
        "source": e.source.value, "ts_ns": e.timestamp_ns,
        **({"coalesced": True} if e.coalesced else {}),
        **({"untracked": True} if e.untracked else {}),
    }


def _event_text(e: Event) -> str:
    data = e.data[:32].hex() + (f"...(+{len(e.data) - 32})" if len(e.data) > 32 else "")
    who = "dma   " if e.vcpu is None else f"vcpu {e.vcpu:<2}"
    mark = " (untracked page)" if e.untracked else ""
    return f"#{e.seq:<8} {who} gpa {e.gpa:#014x} len {e.length:<4} {data}{mark}"


def _record_json(msg: WatchMessage) -> dict[str, Any] | None:
    from pagetrack.types import Closed, Finding, Gap, Progress, RegionRemoved, Registered

    if isinstance(msg, Finding):
        return {"type": "finding", **cp.jsonable(msg)}
    if isinstance(msg, Gap):
        return {"type": "gap", **cp.jsonable(msg)}
    if isinstance(msg, RegionRemoved):
        return {"type": "region_removed", **cp.jsonable(msg)}
    if isinstance(msg, Progress):
        return {"type": "progress", **cp.jsonable(msg)}
    if isinstance(msg, Registered):
        return {"type": "registered", **cp.jsonable(msg)}
    if isinstance(msg, Closed):
        return {"type": "closed", **cp.jsonable(msg)}
    return None


def _record_text(msg: WatchMessage) -> tuple[str, bool] | None:
    """(line, to_stderr) for a non-event message."""
    from pagetrack.types import Closed, Finding, Gap, Progress, RegionRemoved, Registered

    if isinstance(msg, Finding):
        where = (
            f" gfns {msg.first_gfn:#x}+{msg.npages}" if msg.npages else ""
        )
        details = " ".join(f"{k}={v}" for k, v in sorted(msg.details.items()))
        return (f"** finding #{msg.seq} {msg.plugin} {msg.kind}{where}: {msg.message}"
                + (f" [{details}]" if details else ""), False)
    if isinstance(msg, Gap):
        return (f"!! gap: seqs {msg.first_seq}-{msg.last_seq}, {msg.count} events not"
                f" delivered ({msg.reason.value})", False)
    if isinstance(msg, RegionRemoved):
        last = msg.base_gfn + msg.npages - 1
        return (f"-- region removed: slot {msg.slot} gfns {msg.base_gfn:#x}-{last:#x}"
                f" ({msg.change.value}) after seq {msg.at_seq}", False)
    if isinstance(msg, Progress):
        return (f".. head {msg.head_seq}, lag {msg.lag}, queued {msg.queue_depth}, sent"
                f" {msg.sent_total}, dropped {msg.dropped_total}", False)
    if isinstance(msg, Registered):
        if msg.reconnects:
            return (f"pagetrack: reconnected to {msg.vm}, resuming at seq {msg.start_seq}",
                    True)
        return (f"pagetrack: watching {msg.vm} from seq {msg.start_seq} (head {msg.head_seq},"
                f" notifier {msg.notifier_id})", True)
    if isinstance(msg, Closed):
        return (f"pagetrack: stream closed ({msg.reason.value}) at seq {msg.last_seq}", True)
    return None


def run_watch(
    stream: SyncWatchStream,
    fmt: WatchFormat,
    count: int | None,
    progress: bool,
    stdout: TextIO,
    stderr: TextIO,
    events_only: bool = False,
) -> int:
    """Print a stream's messages until it closes or ``count`` events were printed;
    returns the events (and findings) printed. With ``events_only``, stdout gets event
    lines only and a gap (events lost) is said on stderr."""
    from pagetrack.types import Closed, EventBatch, Finding, Gap, Progress

    printed = 0
    jsonl = fmt is WatchFormat.JSONL
    for msg in stream:
        if isinstance(msg, EventBatch):
            lines = []
            for e in msg.events():
                lines.append(json.dumps(_event_json(e)) if jsonl else _event_text(e))
                printed += 1
                if count is not None and printed >= count:
                    break
            stdout.write("\n".join(lines) + "\n")
            stdout.flush()
            if count is not None and printed >= count:
                break
            continue
        if isinstance(msg, Progress) and (events_only or not (progress or jsonl)):
            continue
        if events_only:
            if isinstance(msg, Gap):
                line = _record_text(msg)
                assert line is not None
                stderr.write(f"pagetrack: {line[0].removeprefix('!! ')}\n")
                stderr.flush()
            if isinstance(msg, Closed):
                break
            continue
        if jsonl:
            rec = _record_json(msg)
            if rec is not None:
                stdout.write(json.dumps(rec) + "\n")
                stdout.flush()
        else:
            line = _record_text(msg)
            if line is not None:
                dest = stderr if line[1] else stdout
                dest.write(line[0] + "\n")
                dest.flush()
        if isinstance(msg, Finding):
            printed += 1
            if count is not None and printed >= count:
                break
        if isinstance(msg, Closed):
            break
    return printed


@app.command("watch")
def watch_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    fmt: Annotated[
        WatchFormat,
        typer.Option("--format", "-f", help="text for people; jsonl for programs: one JSON"
                     " object per line, each with a \"type\": event (one per write event),"
                     " registered (on each connect), progress (heartbeat, every second),"
                     " gap (events lost, with the seq range), region_removed, finding (a"
                     " plugin's report, with its own seq), closed."),
    ] = WatchFormat.TEXT,
    events_only: Annotated[
        bool,
        typer.Option("--events-only", help="Print event lines only (a gap is still"
                     " reported, on stderr)."),
    ] = False,
    filters: Annotated[
        list[str] | None,
        typer.Option("--filter", metavar="GFNS", help="Only these gfns (0x100-0x1ff, 0x100+16, 42);"
                     " repeatable.", show_default=False),
    ] = None,
    sources: Annotated[
        list[EventSource] | None,
        typer.Option("--source", metavar="guest|dma", show_default=False,
                     help="Only events from this source; repeatable."),
    ] = None,
    from_seq: Annotated[
        int | None,
        typer.Option("--from-seq", min=1, metavar="SEQ", show_default=False,
                     help="Replay from this seq (from the daemon's history); default: only"
                     " new events."),
    ] = None,
    policy: Annotated[
        SlowConsumerPolicy | None,
        typer.Option("--policy", help="What the daemon does when this stream falls behind"
                     " (default drop: you get a gap record)."),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option("--count", "-n", min=1, metavar="N", show_default=False,
                     help="Exit after printing this many events (findings count too)."),
    ] = None,
    omit_data: Annotated[
        bool, typer.Option("--omit-data", help="Do not send the written bytes.")
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress", help="Also print heartbeats (text format).")
    ] = False,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="Exit when the connection drops instead of"
                           " reconnecting and resuming.")
    ] = False,
    plugins: Annotated[
        list[str] | None,
        typer.Option("--plugin", metavar="NAME", show_default=False,
                     help="Only findings of this plugin; repeatable (default: every"
                     " plugin's)."),
    ] = None,
    findings_only: Annotated[
        bool, typer.Option("--findings-only", help="Only plugins' findings, no write events.")
    ] = False,
) -> None:
    """Stream a VM's write events and plugins' findings until Ctrl-C (or --count
    events)."""
    ranges: list[Any] = []
    for spec in filters or []:
        r, g = _parsed(cp.parse_gfn_specs, [spec])
        ranges.extend(r)
        ranges.extend((x, 1) for x in g)
    with _client(ctx) as c, c.watch(
        vm, start_seq=from_seq, ranges=ranges, sources=sources or None, policy=policy,
        omit_data=omit_data, resume=not no_resume, plugins=plugins or (),
        only_findings=findings_only,
    ) as stream:
        run_watch(stream, fmt, count, progress, sys.stdout, sys.stderr, events_only)


# --------------------------------------------------------------------------- stats


@app.command("stats")
def stats_cmd(
    ctx: typer.Context,
    vm: Annotated[
        str | None, typer.Argument(help="VM name (default: every VM).", show_default=False)
    ] = None,
) -> None:
    """Show counters: writes by path, events, drops, tracking and memory."""
    with _client(ctx) as c:
        stats = c.stats(vm)
    if _emit_json(ctx, stats):
        return
    if not stats:
        out.print("no VMs")
        return
    table = _table("vm", "writes", "mmio", "fast", "emulated", "dma", "dma notified",
                   "dropped", "tracked", "head seq", "notifiers", "memory")
    for s in stats:
        table.add_row(
            s.vm, str(s.guest_writes), str(s.writes.mmio_exit), str(s.writes.fast),
            str(s.writes.emulated), str(s.dma.applied), str(s.dma.notified),
            str(s.events_dropped), str(s.tracked_gfns), str(s.head_seq), str(s.notifiers),
            cp.human_bytes(s.memory_bytes),
        )
    out.print(table)


# --------------------------------------------------------------------------- workloads


def _print_workload(w: Any) -> None:
    p = w.writes_by_path
    out.print(
        f"{w.id}: {w.kind.value} on {w.vm}, {w.state.value}, {w.writes} writes"
        f" ({w.achieved_rate:.0f}/s; mmio {p.mmio_exit}, fast {p.fast}, emulated"
        f" {p.emulated}), {w.elapsed_ms / 1000:.1f} s" + (f", error: {w.error}" if w.error else "")
    )


@workload_app.command("start")
def workload_start(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    kind: Annotated[StartableKind, typer.Argument(help="Kind of write stream.")],
    rate: Annotated[
        float, typer.Option("--rate", min=0, help="Writes per second (0 = as fast as possible).")
    ] = 0.0,
    count: Annotated[int, typer.Option("--count", min=0, help="Writes to make (0 = no limit).")]
    = 0,
    duration: Annotated[
        str | None,
        typer.Option("--duration", help="Longest run: 10s, 500ms, 2m (default: no limit).",
                     show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed.")] = 0,
    vcpus: Annotated[int, typer.Option("--vcpus", min=0, help="vCPUs writing (0 = 1).")] = 0,
    tracked_fraction: Annotated[
        float,
        typer.Option("--tracked-fraction", min=0, max=1, help="Share of target pages tracked."),
    ] = 0.0,
    options: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", metavar="KEY=VALUE", show_default=False,
                     help="Kind-specific key=value; repeatable."),
    ] = None,
) -> None:
    """Start a simulated write workload on a VM."""
    duration_ms = _parsed(cp.parse_duration_ms, duration) if duration else 0
    opts = _parsed(cp.parse_options, options or [])
    with _client(ctx) as c:
        w = c.start_workload(
            vm, WorkloadKind(kind.value), rate=rate, count=count, duration_ms=duration_ms,
            seed=seed, vcpus=vcpus,
            tracked_fraction=tracked_fraction, options=opts,
        )
    if not _emit_json(ctx, w):
        _print_workload(w)


_WORKLOAD_VM = typer.Option(
    "--vm", metavar="VM", show_default=False,
    help="The workload's VM: with several daemons, says which one to ask (workload ids are"
    " only unique per daemon).",
)


def _one_workload(ctx: typer.Context, method: str, workload_id: str, vm: str | None) -> None:
    """Call ``stop_workload`` or ``get_workload`` (a sharded client also takes the VM,
    to know which daemon to ask) and print the status."""
    with _client(ctx) as c:
        call = getattr(c, method)
        w = call(workload_id, vm=vm) if _is_sharded(c) else call(workload_id)
    if not _emit_json(ctx, w):
        _print_workload(w)


@workload_app.command("stop")
def workload_stop(
    ctx: typer.Context,
    workload_id: Annotated[str, typer.Argument(help="Workload id.")],
    vm: Annotated[str | None, _WORKLOAD_VM] = None,
) -> None:
    """Stop a workload."""
    _one_workload(ctx, "stop_workload", workload_id, vm)


@workload_app.command("show")
def workload_show(
    ctx: typer.Context,
    workload_id: Annotated[str, typer.Argument(help="Workload id.")],
    vm: Annotated[str | None, _WORKLOAD_VM] = None,
) -> None:
    """Show a workload's status."""
    _one_workload(ctx, "get_workload", workload_id, vm)


@workload_app.command("list")
def workload_list(
    ctx: typer.Context,
    vm: Annotated[
        str | None, typer.Argument(help="Only this VM's workloads.", show_default=False)
    ] = None,
) -> None:
    """List running and recently ended workloads."""
    with _client(ctx) as c:
        ws = c.list_workloads(vm)
    if _emit_json(ctx, ws):
        return
    if not ws:
        out.print("no workloads")
    for w in ws:
        _print_workload(w)


# --------------------------------------------------------------------------- plugins


@plugin_app.command("attach")
def plugin_attach(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    kind: Annotated[str, typer.Argument(
        metavar="PLUGIN",
        help="shadow-mmu, vgpu, or a third-party plugin's name (installed as an entry"
        " point in group pagetrackd.plugins and allowed by the daemon's plugins_allow).",
    )],
    options: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", metavar="KEY=VALUE", show_default=False,
                     help="Plugin key=value option; repeatable."),
    ] = None,
) -> None:
    """Attach a plugin to a VM."""
    opts = _parsed(cp.parse_options, options or [])
    with _client(ctx) as c:
        st = c.attach_plugin(vm, kind, opts)
    if not _emit_json(ctx, st):
        out.print(f"attached {st.name} to {vm}", markup=False)


@plugin_app.command("detach")
def plugin_detach(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    kind: Annotated[str, typer.Argument(
        metavar="PLUGIN", help="shadow-mmu, vgpu, or a third-party plugin's name."
    )],
) -> None:
    """Detach a plugin from a VM (releasing its tracking)."""
    with _client(ctx) as c:
        refs = c.detach_plugin(vm, kind)
    if not _emit_json(ctx, {"kind": kind, "released_references": refs}):
        out.print(f"detached {kind} from {vm}; {refs} tracking references released",
                  markup=False)


@plugin_app.command("status")
def plugin_status(ctx: typer.Context, vm: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """Show a VM's plugins and their counters."""
    with _client(ctx) as c:
        plugins = c.list_plugins(vm)
    if _emit_json(ctx, plugins):
        return
    if not plugins:
        out.print("no plugins attached")
    for p in plugins:
        counters = ", ".join(f"{k} {v}" for k, v in sorted(p.counters.items()))
        info = ", ".join(f"{k}={v}" for k, v in sorted(p.info.items()))
        out.print(f"{p.name}: tracked gfns {p.tracked_gfns}"
                  + (f"; {counters}" if counters else "") + (f"; {info}" if info else ""),
                  markup=False)


@plugin_app.command("audit")
def plugin_audit(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    kind: Annotated[PluginKind, typer.Argument(help="Plugin kind.")],
    max_mismatches: Annotated[
        int, typer.Option("--max", min=0, help="Most mismatches to list (0 = server maximum).")
    ] = 20,
) -> None:
    """Compare a plugin's shadow with a fresh walk of guest memory."""
    with _client(ctx) as c:
        rep = c.audit_plugin(vm, kind, max_mismatches=max_mismatches)
    if _emit_json(ctx, rep):
        return
    out.print(f"{rep.checked_entries} entries checked, {rep.mismatch_count} mismatches")
    for m in rep.mismatches:
        out.print(f"  {m.table} gfn {m.table_gfn:#x} L{m.level}[{m.index}]: guest"
                  f" {m.guest_entry:#x} expected {m.expected:#x} actual {m.actual:#x}"
                  f" ({m.reason})", markup=False)


# --------------------------------------------------------------------------- leases


@lease_app.command("create")
def lease_create(
    ctx: typer.Context,
    ttl: Annotated[str, typer.Option("--ttl", help="Time to live: 30s, 500ms, 5m.")] = "30s",
    label: Annotated[str, typer.Option("--label", help="Free-form label.")] = "",
    vm: Annotated[
        str | None,
        typer.Option("--vm", metavar="VM", show_default=False,
                     help="With several daemons: create the lease on the one holding this VM"
                     " (a lease can only hold tracking on its own daemon)."),
    ] = None,
) -> None:
    """Create a TTL lease and print its id."""
    ttl_ms = _parsed(cp.parse_duration_ms, ttl)
    with _client(ctx) as c:
        if _is_sharded(c):
            lease = c.create_lease(ttl_ms, label=label, vm=vm)
        else:
            lease = c.create_lease(ttl_ms, label=label)
    if not _emit_json(ctx, lease):
        out.print(lease.id)


@lease_app.command("keep-alive")
def lease_keep_alive(
    ctx: typer.Context, lease_id: Annotated[str, typer.Argument(help="Lease id.")]
) -> None:
    """Extend a lease to now + its TTL."""
    with _client(ctx) as c:
        lease = c.keep_alive_lease(lease_id)
    if not _emit_json(ctx, lease):
        out.print(f"lease {lease.id} expires {_ts(lease.expires_at_ns)}")


@lease_app.command("revoke")
def lease_revoke(
    ctx: typer.Context, lease_id: Annotated[str, typer.Argument(help="Lease id.")]
) -> None:
    """End a lease now, releasing its tracking."""
    with _client(ctx) as c:
        res = c.revoke_lease(lease_id)
    if not _emit_json(ctx, res):
        out.print(f"revoked {lease_id}: {res.released_references} references released,"
                  f" {res.untracked_gfns} gfns no longer tracked")


@lease_app.command("list")
def lease_list(ctx: typer.Context) -> None:
    """List live leases."""
    with _client(ctx) as c:
        leases = c.list_leases()
    if _emit_json(ctx, leases):
        return
    if not leases:
        out.print("no leases")
        return
    table = _table("id", "kind", "ttl ms", "expires", "references", "label")
    for le in leases:
        table.add_row(le.id, le.kind.value, str(le.ttl_ms), _ts(le.expires_at_ns),
                      str(le.references), le.label)
    out.print(table)


# --------------------------------------------------------------------------- snapshots


@app.command("snapshot")
def snapshot_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name.")],
    file: Annotated[
        str, typer.Argument(help="File to write (replaced atomically); '-' = standard output.")
    ],
    no_memory: Annotated[
        bool, typer.Option("--no-memory", help="Leave guest memory out (it restores as zeros).")
    ] = False,
) -> None:
    """Save one VM to a file: memslots, options, tracking and owners, plugins, the seq and
    guest memory. The bytes are checked against the daemon's sha256."""
    with _client(ctx) as c:
        dest = sys.stdout.buffer if file == "-" else file
        info = c.snapshot_vm_to(vm, dest, include_memory=not no_memory)
    if file == "-":
        sys.stdout.buffer.flush()
    elif _emit_json(ctx, info):
        return
    line = (
        f"saved VM {vm} to {'standard output' if file == '-' else file}:"
        f" {cp.human_bytes(info.size_bytes)}, seq {info.head_seq},"
        f" {'with' if info.include_memory else 'without'} memory, sha256 {info.sha256[:16]}"
    )
    if file == "-":
        print(line, file=sys.stderr)
    else:
        out.print(line, markup=False)


@app.command("restore")
def restore_cmd(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="Snapshot file; '-' = standard input.")],
    as_name: Annotated[
        str | None,
        typer.Option("--as", metavar="NAME", show_default=False,
                     help="Name for the restored VM (default: the name saved in the file)."),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace a VM of that name if there is one.")
    ] = False,
) -> None:
    """Create a VM from a snapshot file; its seq continues from the snapshot's."""
    from pagetrack.errors import AlreadyExists

    src = sys.stdin.buffer if file == "-" else file
    try:
        with _client(ctx) as c:
            vm = c.restore_vm(src, vm=as_name, replace=replace)
    except AlreadyExists as exc:
        message = exc.message.split(";")[0].rstrip(".")
        raise AlreadyExists(f"{message}; add --replace to overwrite it") from None
    if not _emit_json(ctx, vm):
        out.print(
            f"restored VM {vm.name} from {'standard input' if file == '-' else file}:"
            f" {vm.memslot_count} memslots,"
            f" {vm.tracked_gfns} tracked gfns, seq {vm.head_seq}", markup=False,
        )


@app.command("recording")
def recording_cmd(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="A VM created with --record.")],
    file: Annotated[str, typer.Argument(help="Where to write it; '-' = standard output.")],
) -> None:
    """Save a recorded VM's recording (JSON lines) to a file."""
    with _client(ctx) as c:
        data = c.get_recording(vm)
    if file == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    Path(file).write_bytes(data)
    out.print(f"wrote {len(data)} bytes of {vm}'s recording to {file}", markup=False)


@app.command("replay")
def replay_cmd(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="Recording file; '-' = standard input.")],
    as_name: Annotated[
        str, typer.Option("--as", metavar="NAME", help="Name for the new VM.")
    ],
) -> None:
    """Replay a recording into a new VM: same memory, tracking, plugins and event seqs."""
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    with _client(ctx) as c:
        vm, records = c.replay_vm(data, as_name)
    if not _emit_json(ctx, vm):
        out.print(
            f"replayed {records} operations into VM {vm.name}: {vm.memslot_count} memslots,"
            f" {vm.tracked_gfns} tracked gfns, seq {vm.head_seq}", markup=False,
        )


# --------------------------------------------------------------------------- top


@app.command("top")
def top_cmd(
    ctx: typer.Context,
    interval: Annotated[
        float, typer.Option("--interval", "-i", min=0.1, help="Seconds between refreshes.")
    ] = 1.0,
) -> None:
    """Live view of every VM's write and event rates (Ctrl-C to quit)."""
    from pagetrack import top

    with _client(ctx) as c:
        top.main(c, interval)


# --------------------------------------------------------------------------- export


@export_app.command("nats")
def export_nats_cmd(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", metavar="FILE", show_default=False,
                     help="TOML file (sections daemon, vms, nats, stream, watch, metrics;"
                     " see docs/export.md). Flags override it."),
    ] = None,
    servers: Annotated[
        list[str] | None,
        typer.Option("--nats", metavar="URL", show_default=False,
                     help="NATS server URL (default nats://127.0.0.1:4222); repeatable."),
    ] = None,
    stream: Annotated[
        str | None,
        typer.Option("--stream", show_default=False, help="JetStream stream (default"
                     " PAGETRACK); it must take the subjects <prefix>.>."),
    ] = None,
    create_stream: Annotated[
        bool | None,
        typer.Option("--create-stream/--no-create-stream", show_default=False,
                     help="Create the stream (or update its limits) from the config."),
    ] = None,
    vms: Annotated[
        list[str] | None,
        typer.Option("--vm", metavar="NAME", show_default=False,
                     help="Export this VM; repeatable. Default: every VM of the tenant."),
    ] = None,
    patterns: Annotated[
        list[str] | None,
        typer.Option("--pattern", metavar="GLOB", show_default=False,
                     help="Export the VMs whose name matches (shell glob); repeatable."),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", "-f", metavar="protobuf|jsonl", show_default=False,
                     help="Payload: EventBatch protobuf bytes (default) or JSON lines."),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option("--policy", metavar="block|drop|disconnect", show_default=False,
                     help="The Watch streams' slow-consumer policy (default block)."),
    ] = None,
    max_inflight: Annotated[
        int | None,
        typer.Option("--max-inflight", min=1, show_default=False,
                     help="Unacked publishes per VM before its Watch is held back"
                     " (default 64)."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", min=0, max=65535, show_default=False,
                     help="Serve Prometheus metrics on this port (0 = any free one)."),
    ] = None,
    metrics_host: Annotated[
        str | None,
        typer.Option("--metrics-host", show_default=False,
                     help="Address of the metrics endpoint (default 127.0.0.1)."),
    ] = None,
) -> None:
    """Publish every record of the tenant's VMs to NATS JetStream, exactly once.

    Subjects are <prefix>.<tenant>.<vm>.events, .gaps and .regions. VMs created later are
    picked up. After any restart the export resumes from what JetStream holds.
    """
    from pagetrack.export import load_config
    from pagetrack.export.run import run_exporter

    s = _settings(ctx)
    root = ctx.find_root()
    config = load_config(config_file)
    daemon: dict[str, Any] = {}
    for name, value in (("target", s.target), ("token", s.token), ("ca_file", s.ca_file)):
        source = root.get_parameter_source(name)
        if source is not None and source.name != "DEFAULT":
            daemon[name] = value
    config = config.with_overrides(
        **daemon,
        nats_servers=tuple(servers) if servers else None,
        stream_name=stream, stream_create=create_stream,
        vms=tuple(vms) if vms else None, patterns=tuple(patterns) if patterns else None,
        format=fmt, policy=policy, max_inflight=max_inflight,
        metrics_port=metrics_port, metrics_host=metrics_host,
    )
    run_exporter(config)


# --------------------------------------------------------------------------- entry point


def _fail(message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    print(f"pagetrack: {first}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pagetrack`` command; returns the exit status."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="pagetrack", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors (click exceptions)
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message())
            return 0
        message = exc.format_message()
        sub = getattr(getattr(exc, "ctx", None), "command_path", "pagetrack")
        if getattr(exc, "exit_code", 2) == 2:
            message = f"{message.rstrip('.')} (see '{sub} --help')"
        return _fail(message, int(getattr(exc, "exit_code", 2)))
    except typer.Abort:
        return _fail("aborted", 130)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `pagetrack watch ... | head`): not an error.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file named on the command line could not be read or written
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", 1)
    except Exception as exc:
        # A PageTrackError can only come from a command that loaded the client.
        errors = sys.modules.get("pagetrack.errors")
        if errors is not None and isinstance(exc, errors.PageTrackError):
            return _fail(str(exc), 1)
        raise
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
