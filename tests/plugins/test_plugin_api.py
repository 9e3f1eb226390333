"""The typed plugin interface: the handle's restrictions, hooks, failures, findings."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from pagetrackd.domain import (
    FailedPrecondition,
    InvalidArgument,
    NotTracked,
    PermissionDenied,
    PluginNotFound,
    Vm,
)
from pagetrackd.domain.findings import Finding, finding_from_record, finding_record
from pagetrackd.domain.hub import History, Subscriber, VmHub, make_filter
from pagetrackd.domain.types import TENANT_OWNER
from pagetrackd.plugins.api import (
    BasePlugin,
    Handle,
    OptionValue,
    Plugin,
    Status,
    TrackingStarted,
    WritePiece,
)
from pagetrackd.plugins.catalog import Catalog
from pagetrackd.plugins.host import DETACHED_KIND, HostedPlugin


class Recorder(BasePlugin):
    """Tracks gfn 0x10 and publishes a finding per write it hears."""

    def __init__(self) -> None:
        self.pieces: list[WritePiece] = []
        self.started: list[TrackingStarted] = []

    def attach(self, handle: Handle, options: Mapping[str, OptionValue]) -> None:
        super().attach(handle, options)
        handle.track(0x10)

    def on_write(self, piece: WritePiece) -> None:
        self.pieces.append(piece)
        self.handle.publish("seen", piece.gfn, 1, "a write", {"n": str(len(piece.data))})

    def on_tracking_started(self, change: TrackingStarted) -> None:
        self.started.append(change)

    def status(self) -> Status:
        return Status({"pieces": len(self.pieces)}, {"mode": "record"})


class Raiser(BasePlugin):
    """Tracks gfn 0x20 and raises on every write."""

    def attach(self, handle: Handle, options: Mapping[str, OptionValue]) -> None:
        super().attach(handle, options)
        handle.track(0x20, 2)

    def on_write(self, piece: WritePiece) -> None:
        raise RuntimeError("plugin bug")


def make_vm() -> tuple[Vm, VmHub]:
    vm = Vm("vm1", vcpus=2)
    vm.set_memslot(0, 0, 256)
    hub = VmHub(History())
    vm.register_notifier(hub.history)
    return vm, hub


def test_a_plugin_implements_the_protocol() -> None:
    """BasePlugin subclasses satisfy the runtime-checkable Plugin protocol."""
    assert isinstance(Recorder(), Plugin)
    assert isinstance(Raiser(), Plugin)


def test_hooks_get_typed_pieces_and_findings_take_seqs() -> None:
    """A tracked write reaches on_write as a WritePiece; the finding it publishes takes
    the next seq, after the write's, and lands in the history."""
    vm, hub = make_vm()
    impl = Recorder()
    host = HostedPlugin("rec", impl)
    host.attach(vm)
    vm.write(1, 0x10 << 12 | 8, b"\x01\x02")
    assert [(p.gfn, p.offset, p.data, p.vcpu) for p in impl.pieces] == [(0x10, 8, b"\x01\x02", 1)]
    assert vm.seq == 2  # the write is seq 1, the finding seq 2
    items = hub.history.since(1, vm.seq)
    finding = items[-1]
    assert isinstance(finding, Finding)
    got = (finding.seq, finding.plugin, finding.kind, finding.first_gfn)
    assert got == (2, "rec", "seen", 0x10)
    st = host.status()
    assert st["pieces"] == 1 and st["findings"] == 1 and st["mode"] == "record"


def test_tracking_started_hook_hears_other_owners() -> None:
    """on_tracking_started hears a 0 -> 1 transition made by another user (R3.1)."""
    vm, _ = make_vm()
    impl = Recorder()
    HostedPlugin("rec", impl).attach(vm)
    vm.track_add([0x30])
    assert TrackingStarted((0x30,)) in impl.started


def test_handle_cannot_touch_another_owners_tracking() -> None:
    """The handle adds and removes under plugin:<name> only: the tenant's reference on a
    gfn is untouchable (NotTracked) and stays."""
    vm, _ = make_vm()
    vm.track_add([0x40])
    impl = Recorder()
    HostedPlugin("rec", impl).attach(vm)
    with pytest.raises(NotTracked):
        impl.handle.untrack(0x40)
    assert vm.track_query([0x40])[0].owners == {TENANT_OWNER: 1}
    assert impl.handle.tracked() == (0x10,)
    assert impl.handle.owner == "plugin:rec"
    assert not hasattr(impl.handle, "_vm") or not isinstance(impl.handle, Vm)


def test_handle_is_revoked_at_detach_and_tracking_released() -> None:
    """Detach releases the plugin's references (only its own) and revokes the handle."""
    vm, _ = make_vm()
    vm.track_add([0x10])
    impl = Recorder()
    host = HostedPlugin("rec", impl)
    host.attach(vm)
    assert vm.track_query([0x10])[0].count == 2
    host.detach()
    assert vm.track_query([0x10])[0].owners == {TENANT_OWNER: 1}
    with pytest.raises(FailedPrecondition):
        impl.handle.read(0, 8)
    with pytest.raises(FailedPrecondition):
        impl.handle.track(0x11)


def test_handle_bounds() -> None:
    """Bad gfn ranges and findings are InvalidArgument and change nothing."""
    vm, _ = make_vm()
    impl = Recorder()
    HostedPlugin("rec", impl).attach(vm)
    seq = vm.seq
    with pytest.raises(InvalidArgument):
        impl.handle.track(-1)
    with pytest.raises(InvalidArgument):
        impl.handle.publish("", 0, 1, "no kind")
    with pytest.raises(InvalidArgument):
        impl.handle.publish("k", 0, 1, "x", {"k": "v" * 1000})
    assert vm.seq == seq
    assert impl.handle.memslots()[0].npages == 256


def test_raising_plugin_is_detached_after_the_limit() -> None:
    """Each raise is counted; the write still lands; at the limit the plugin is
    unregistered, its tracking released and a plugin.detached finding published."""
    vm, hub = make_vm()
    gone: list[HostedPlugin] = []
    host = HostedPlugin("bad", Raiser(), failure_limit=2, on_detached=gone.append)
    host.attach(vm)
    assert vm.tracked_gfns("plugin:bad").tolist() == [0x20, 0x21]
    vm.write(0, 0x20 << 12, b"\xaa")
    assert host.failures == 1 and not gone
    vm.write(0, 0x20 << 12, b"\xbb")
    assert vm.read(0x20 << 12, 1) == b"\xbb"
    assert gone == [host] and host.detached_for_failures
    assert vm.tracked_gfns("plugin:bad").size == 0
    assert len(vm.notifiers) == 1  # only the history is left
    detached = [i for i in hub.history.since(1, vm.seq) if isinstance(i, Finding)]
    assert [(f.plugin, f.kind, f.details["failures"]) for f in detached] == [
        ("bad", DETACHED_KIND, "2")
    ]
    vm.write(0, 0x20 << 12, b"\xcc")  # nothing is called any more
    assert host.failures == 2


def test_failing_attach_leaves_nothing() -> None:
    """A plugin whose attach raises after tracking leaves no reference behind."""

    class Half(BasePlugin):
        def attach(self, handle: Handle, options: Mapping[str, OptionValue]) -> None:
            handle.track(0x50)
            raise ValueError("half done")

    vm, _ = make_vm()
    with pytest.raises(FailedPrecondition, match="half done"):
        HostedPlugin("half", Half()).attach(vm)
    assert vm.tracked_gfns().size == 0 and len(vm.notifiers) == 1


def test_catalog_allow_list() -> None:
    """Built-ins are always allowed; others only when listed; unknown is NotFound."""
    cat = Catalog(allow=["listed"], lookup=lambda name: None)
    assert cat.make("shadow-mmu").name == "shadow_mmu"
    with pytest.raises(PermissionDenied, match="plugins_allow"):
        cat.make("unlisted")
    with pytest.raises(PluginNotFound, match="pagetrackd.plugins"):
        cat.make("listed")
    with pytest.raises(InvalidArgument):
        cat.make("Bad Name!")


def test_stream_filters_findings_by_plugin() -> None:
    """A stream with plugins= gets only those plugins' findings; only_findings drops
    the write events."""
    vm, hub = make_vm()
    sub = Subscriber(name="s", flt=make_filter(plugins=["rec"], only_findings=True))
    hub.subscribe(vm, sub)
    HostedPlugin("rec", Recorder()).attach(vm)
    HostedPlugin("bad", Raiser(), failure_limit=1).attach(vm)
    vm.write(0, 0x10 << 12, b"\x01")
    vm.write(0, 0x20 << 12, b"\x01")
    got = sub.take(100)
    assert [(type(i).__name__, getattr(i, "plugin", "")) for i in got] == [("Finding", "rec")]


def test_history_dump_and_restore_keep_findings_in_order() -> None:
    """Findings survive a dump/restore at their seqs, between the right events."""
    vm, hub = make_vm()
    HostedPlugin("rec", Recorder()).attach(vm)
    for i in range(5):
        vm.write(0, 0x10 << 12, bytes([i]))
    dump = hub.history.dump()
    assert [f.seq for f in dump.findings] == [2, 4, 6, 8, 10]
    again = History()
    again.restore(dump, vm.seq)
    seqs: list[int] = []
    for item in again.since(1, vm.seq):
        if isinstance(item, Finding):
            seqs.append(item.seq)
        elif hasattr(item, "batch"):
            seqs += np.asarray(item.batch.seq).tolist()
    assert seqs == list(range(1, 11))
    rec = finding_record(dump.findings[0])
    assert finding_from_record(rec) == dump.findings[0]


def test_engine_forgets_a_plugin_detached_for_failures_and_counts_it() -> None:
    """Through the engine: an allowed entry point attaches by name; after the limit it
    is gone from the VM's plugins and the failure-detach metric counts it."""
    from importlib.metadata import EntryPoint

    from prometheus_client import generate_latest

    from pagetrackd.application import Engine
    from pagetrackd.domain import TenantId
    from pagetrackd.metrics import build_registry

    engine = Engine()
    ep = EntryPoint("bad", f"{__name__}:Raiser", "pagetrackd.plugins")
    engine.plugin_catalog = Catalog(["bad"], 2, lookup=lambda name: ep)
    engine.plugin_catalog.on_detached = engine._plugin_detached
    entry = engine.create_vm(TenantId("t"), "vm")
    entry.vm.set_memslot(0, 0, 256)
    engine.attach_plugin(entry, "bad", {})
    assert list(entry.plugins) == ["bad"]
    for _ in range(2):
        entry.vm.write(0, 0x20 << 12, b"x")
    assert entry.plugins == {} and entry.plugin_options == {}
    registry, _ = build_registry(engine)
    text = generate_latest(registry).decode()
    assert 'pagetrack_plugin_failure_detaches_total{plugin="bad"} 1.0' in text
