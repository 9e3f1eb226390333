"""Hypothesis throws random and malformed requests at every RPC of a live daemon,
interleaved with valid operations on a known VM.

Requests are drawn from the protobuf descriptors: every field may be set or not, to
random or extreme values (uint64 max, 2^63, negative numbers, NaN, unknown enum
numbers, empty and odd strings, random bytes, repeated fields of random lengths, odd map
entries, nested messages). Most requests name a *sandbox* VM (so they get past the name
check and reach deep validation) or a random name; some unary ones name the *known* VM
and must then change nothing when refused. Corrupted snapshots go to RestoreVm.

Throughout: no call ends in UNKNOWN or INTERNAL. At the end of each run the known VM's
tracking counters, memory, head seq and stats are exactly what the valid operations
imply, a Watch stream opened on it at the start has received every event once, in order,
with the written bytes, GetStats answers for every VM, and health is SERVING.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrack.v1 import pagetrack_pb2_grpc as pbg
from tests.daemon_process import DaemonProcess, start_daemon
from tests.rich_status import check_details

F = FieldDescriptor
FAULTS = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
SANDBOX = "sandbox"
KNOWN_PAGES = 16  #: the known VM's one slot: gfns 0..15
#: fuzzing makes no new calls after this (the test stays < 60 s); PAGETRACK_FUZZ_S overrides
TIME_BUDGET_S = float(os.environ.get("PAGETRACK_FUZZ_S", "40"))
#: state machine runs; PAGETRACK_FUZZ_RUNS overrides (for a longer hunt by hand)
RUNS = int(os.environ.get("PAGETRACK_FUZZ_RUNS", "100"))
CALL_TIMEOUT_S = 10.0

METHODS: list[MethodDescriptor] = [
    m for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods
]
BY_NAME = {m.name: m for m in METHODS}
#: Unary RPCs that name a VM, for requests aimed at the known VM (DeleteVm would always
#: succeed on it, so it only goes to the sandbox).
KNOWN_TARGETS = [
    m for m in METHODS
    if not m.client_streaming and not m.server_streaming
    and "vm" in m.input_type.fields_by_name and m.name != "DeleteVm"
]


# ------------------------------------------------------------------ request strategies


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    edges = [v for v in (0, 1, 2, 7, 4095, 4096, 65535, 65536, 1 << 31, (1 << 32) - 1,
                         1 << 40, 1 << 52, 1 << 63, hi, lo, -1) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(0, 64), st.integers(lo, hi))


TEXT = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=24),
    st.sampled_from(["", " ", "\x00", "x" * 300, "../../etc", "vm/1", "ünï", "0", "-1",
                     "nan", "1e400", "0x10"]),
)
NAME = st.one_of(st.just(SANDBOX), st.just(SANDBOX), TEXT)

SCALAR: dict[int, st.SearchStrategy[Any]] = {
    F.TYPE_UINT64: _ints(64, False),
    F.TYPE_FIXED64: _ints(64, False),
    F.TYPE_UINT32: _ints(32, False),
    F.TYPE_FIXED32: _ints(32, False),
    F.TYPE_INT64: _ints(64, True),
    F.TYPE_SINT64: _ints(64, True),
    F.TYPE_INT32: _ints(32, True),
    F.TYPE_SINT32: _ints(32, True),
    F.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    F.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_STRING: TEXT,
    F.TYPE_BYTES: st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00" * 4097])),
    F.TYPE_ENUM: st.one_of(st.integers(-2, 6), st.sampled_from([99, (1 << 31) - 1, -(1 << 31)])),
}


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type == F.TYPE_STRING and f.name in ("vm", "name"):
        return NAME
    if f.type == F.TYPE_ENUM:
        assert f.enum_type is not None
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), SCALAR[F.TYPE_ENUM])
    return SCALAR[f.type]


def message_st(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Random messages of type ``desc``: each field set or not, nested two deep."""
    cls = message_factory.GetMessageClass(desc)
    fields: list[tuple[FieldDescriptor, st.SearchStrategy[Any]]] = []
    for f in desc.fields:
        sub = f.message_type
        if sub is not None and sub.GetOptions().map_entry:
            k, v = sub.fields_by_name["key"], sub.fields_by_name["value"]
            fields.append((f, st.dictionaries(_scalar(k), _scalar(v), max_size=4)))
        elif sub is not None:
            if depth >= 2:
                continue
            inner = message_st(sub, depth + 1)
            fields.append((f, st.lists(inner, max_size=4) if f.is_repeated else inner))
        elif f.is_repeated:
            fields.append((f, st.one_of(
                st.lists(_scalar(f), max_size=8),
                st.lists(_scalar(f), min_size=50, max_size=300),
            )))
        else:
            fields.append((f, _scalar(f)))

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for f, strategy in fields:
            if not draw(st.booleans()):
                continue
            value = draw(strategy)
            target = getattr(msg, f.name)
            sub = f.message_type
            if sub is not None and sub.GetOptions().map_entry:
                for key, val in value.items():
                    target[key] = val
            elif sub is not None and f.is_repeated:
                for item in value:
                    target.add().CopyFrom(item)
            elif sub is not None:
                target.CopyFrom(value)
            elif f.is_repeated:
                target.extend(value)
            else:
                setattr(msg, f.name, value)
        return msg

    return build()


REQUESTS = {m.full_name: message_st(m.input_type) for m in METHODS}


# ------------------------------------------------------------------ the daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config = tmp / "config.toml"
    # Quotas keep what a lucky random request may build small (a random npages may
    # otherwise describe terabytes of guest memory, which the default quotas allow).
    config.write_text(
        "[quotas]\nvms = 64\nguest_pages = 1048576\ntracked_gfns = 1048576\n"
        "watchers = 64\nworkloads = 4\n"
    )
    d = start_daemon(tmp, "--config", str(config), "--history-events", "4096")
    yield d
    assert d.stop() == 0
    log = Path(d.log).read_text()
    assert "rpc.unmapped_exception" not in log and "Traceback" not in log


def _path(m: MethodDescriptor) -> str:
    return f"/{m.containing_service.full_name}/{m.name}"


def _reply_cls(m: MethodDescriptor) -> Any:
    return message_factory.GetMessageClass(m.output_type)


class Api:
    """Generic callers for every RPC over one sync channel."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.calls: dict[str, Callable[..., Any]] = {}
        for m in METHODS:
            ser = message_factory.GetMessageClass(m.input_type).SerializeToString
            de = _reply_cls(m).FromString
            if m.client_streaming:
                self.calls[m.name] = self.channel.stream_unary(_path(m), ser, de)
            elif m.server_streaming:
                self.calls[m.name] = self.channel.unary_stream(_path(m), ser, de)
            else:
                self.calls[m.name] = self.channel.unary_unary(_path(m), ser, de)
        self.vm = pbg.VmServiceStub(self.channel)
        self.mem = pbg.MemoryServiceStub(self.channel)
        self.track = pbg.TrackingServiceStub(self.channel)
        self.watch = pbg.WatchServiceStub(self.channel)
        self.admin = pbg.AdminServiceStub(self.channel)
        self.health: Any = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()


class Faults(Exception):
    """A server fault for a client's request."""


def call(api: Api, m: MethodDescriptor, request: Any) -> tuple[grpc.StatusCode, Any]:
    """Make one call of any shape; (status, reply or None). Streams are read a little and
    cancelled. Raises Faults on UNKNOWN or INTERNAL."""
    fn = api.calls[m.name]
    try:
        if m.client_streaming:
            reply = fn(iter(request), timeout=CALL_TIMEOUT_S)
        elif m.server_streaming:
            stream = fn(request, timeout=CALL_TIMEOUT_S)
            try:
                reply = [next(stream) for _ in range(1 if m.name == "Watch" else 64)]
            except StopIteration:
                reply = None
            finally:
                stream.cancel()
        else:
            reply = fn(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK, None  # our own cancel after reading enough
        if code in FAULTS:
            raise Faults(f"{m.name}({request!r:.600}) -> {code.name}: "
                         f"{exc.details()}") from None
        wrong = check_details(exc, m.input_type)
        if wrong is not None:
            open("/tmp/fuzz_wrong.txt", "a").write(f"{m.name} {wrong}\n")
        return code, None
    return grpc.StatusCode.OK, reply


def undo(api: Api, m: MethodDescriptor, request: Any, reply: Any) -> None:
    """Undo what a successful random request started that would outlive its step."""
    if m.name == "CreateVm" and request.name != SANDBOX:
        api.vm.DeleteVm(pb.DeleteVmRequest(vm=request.name))
    elif m.name == "RestoreVm" and reply is not None and reply.vm.name not in (SANDBOX,):
        api.vm.DeleteVm(pb.DeleteVmRequest(vm=reply.vm.name))
    elif m.name == "StartWorkload":
        pbg.WorkloadServiceStub(api.channel).StopWorkload(
            pb.StopWorkloadRequest(id=reply.workload.id))
    elif m.name == "CreateLease":
        pbg.LeaseServiceStub(api.channel).RevokeLease(
            pb.RevokeLeaseRequest(lease_id=reply.lease.id))
    elif m.name == "AttachPlugin":
        pbg.PluginServiceStub(api.channel).DetachPlugin(
            pb.DetachPluginRequest(vm=request.vm, kind=request.kind, name=request.name))


def ensure_sandbox(api: Api) -> None:
    """The sandbox VM exists with a small tracked slot (random requests may delete it,
    delete its slot or restore over it)."""
    try:
        api.vm.CreateVm(pb.CreateVmRequest(name=SANDBOX))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    try:
        api.mem.SetMemoryRegion(pb.SetMemoryRegionRequest(vm=SANDBOX, slot=0, npages=64))
        api.track.AddTracking(pb.TrackingChangeRequest(vm=SANDBOX, gfns=[0, 1, 2]))
    except grpc.RpcError as exc:
        code = exc.code()
        assert code not in FAULTS, exc
        # The random slot 0 may have another size or place; that is fine.


# ------------------------------------------------------------------ the machine


class FuzzMachine(RuleBasedStateMachine):
    """One run: a fresh known VM with a model of it, a Watch stream on it, and a
    sandbox for random requests."""

    target = ""
    started = 0.0
    runs = 0
    steps = 0
    seen: set[str] = set()

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        cls.runs += 1
        self.api = Api(cls.target)
        self.known = f"known-{cls.runs}"
        self.api.vm.CreateVm(pb.CreateVmRequest(name=self.known))
        self.api.mem.SetMemoryRegion(
            pb.SetMemoryRegionRequest(vm=self.known, slot=0, npages=KNOWN_PAGES))
        self.counters = [0] * KNOWN_PAGES
        self.memory = bytearray(KNOWN_PAGES * 4096)
        self.events: list[tuple[int, int, bytes]] = []  # (seq, gpa, data) expected
        self.emulated = 0
        self.received = 0  #: events checked on the stream so far
        self.stream = self._watch(1)
        ensure_sandbox(self.api)

    def _watch(self, start_seq: int) -> Any:
        stream = self.api.watch.Watch(pb.WatchRequest(
            vm=self.known, start_seq=start_seq, queue_limit=1 << 20,
            heartbeat_interval_ms=60000))
        reg = next(stream)
        assert reg.HasField("registered") and reg.registered.start_seq == start_seq
        return stream

    def _drain(self, until: int) -> pb.WatchResponse | None:
        """Check the stream's events up to seq ``until`` against the model (every event
        once, in order, with the bytes written); with ``until`` < 0 read to its end and
        return its Closed message."""
        while until < 0 or self.received < until:
            msg = next(self.stream, None)
            if msg is None:
                assert until < 0, "the stream ended early"
                return None
            kind = msg.WhichOneof("kind")
            assert kind in ("events", "region_removed", "progress", "closed"), msg
            if kind == "closed":
                assert until < 0, msg
                closed: pb.WatchResponse = msg
                return closed
            if kind == "events":
                b, off = msg.events, 0
                for seq, gpa, length in zip(b.seq, b.gpa, b.length, strict=True):
                    want = self.events[self.received]
                    assert seq == want[0]
                    if want[1] >= 0:
                        assert (gpa, b.data[off : off + length]) == want[1:]
                    off += length
                    self.received += 1
        return None

    def _over_budget(self) -> bool:
        type(self).steps += 1
        return time.monotonic() - type(self).started > TIME_BUDGET_S

    # -------------------------------------------------------------- random requests

    @initialize(data=st.data())
    def every_rpc_once(self, data: st.DataObject) -> None:
        """Each run starts with one random request to every RPC, in random order."""
        order = data.draw(st.permutations([m.name for m in METHODS]))
        calls = [(BY_NAME[n], self._draw_request(BY_NAME[n], data)) for n in order]
        for m, request in calls:
            if self._over_budget():
                return
            self._random_call(m, request)

    @staticmethod
    def _draw_request(m: MethodDescriptor, data: st.DataObject) -> Any:
        if m.client_streaming:
            return data.draw(st.lists(REQUESTS[m.full_name], min_size=1, max_size=3))
        return data.draw(REQUESTS[m.full_name])

    def _random_call(self, m: MethodDescriptor, request: Any) -> None:
        type(self).seen.add(m.name)
        code, reply = call(self.api, m, request)
        if code == grpc.StatusCode.OK:
            undo(self.api, m, request, reply)
            if m.name in ("DeleteVm", "SetMemoryRegion", "RestoreVm", "RemoveTracking"):
                ensure_sandbox(self.api)

    @rule(name=st.sampled_from([m.name for m in METHODS]), data=st.data())
    def random_request(self, name: str, data: st.DataObject) -> None:
        """A random request to any RPC, mostly naming the sandbox."""
        m = BY_NAME[name]
        request = self._draw_request(m, data)
        if not self._over_budget():
            self._random_call(m, request)

    @rule(name=st.sampled_from([m.name for m in KNOWN_TARGETS]), data=st.data())
    def random_request_on_known_vm(self, name: str, data: st.DataObject) -> None:
        """A random request naming the known VM: refused ones change nothing; the rare
        valid one becomes part of the model."""
        m = BY_NAME[name]
        request: Any = data.draw(REQUESTS[m.full_name])
        if self._over_budget():
            return
        request.vm = self.known
        before = self.state()
        code, reply = call(self.api, m, request)
        if code != grpc.StatusCode.OK:
            after = self.state()
            assert after == before, f"{m.name} refused with {code.name} but changed state"
            return
        undo(self.api, m, request, reply)
        self.resync(m.name)

    @rule(data=st.data())
    def corrupted_snapshot(self, data: st.DataObject) -> None:
        """A real snapshot of the sandbox, cut and with bytes flipped, to RestoreVm.
        (Positions are drawn as fractions: what is drawn must not depend on the server.)"""
        memory = data.draw(st.booleans())
        flips = data.draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                   max_size=4))
        keep = data.draw(st.one_of(st.just(1.0), st.floats(0, 1)))
        if self._over_budget():
            return
        chunks = list(self.api.admin.SnapshotVm(pb.SnapshotVmRequest(
            vm=SANDBOX, include_memory=memory)))
        blob = bytearray(b"".join(c.data for c in chunks))
        for where, value in flips:
            blob[min(int(where * len(blob)), len(blob) - 1)] = value
        blob = blob[: int(keep * len(blob))]
        name = f"restored-{type(self).runs}"
        reqs = [pb.RestoreVmRequest(vm=name, data=bytes(blob[i : i + 4096]))
                for i in range(0, max(len(blob), 1), 4096)]
        m = pb.DESCRIPTOR.services_by_name["AdminService"].methods_by_name["RestoreVm"]
        code, reply = call(self.api, m, reqs)
        if code == grpc.StatusCode.OK:
            self.api.vm.DeleteVm(pb.DeleteVmRequest(vm=name))

    # -------------------------------------------------------------- valid operations

    @rule(gfns=st.lists(st.integers(0, KNOWN_PAGES - 1), min_size=1, max_size=6))
    def add_tracking(self, gfns: list[int]) -> None:
        self.api.track.AddTracking(pb.TrackingChangeRequest(vm=self.known, gfns=gfns))
        for g in gfns:
            self.counters[g] += 1

    @rule(pick=st.integers(0, 1 << 16))
    def remove_tracking(self, pick: int) -> None:
        tracked = [g for g, c in enumerate(self.counters) if c]
        if not tracked:
            return
        g = tracked[pick % len(tracked)]
        self.api.track.RemoveTracking(pb.TrackingChangeRequest(vm=self.known, gfns=[g]))
        self.counters[g] -= 1

    @rule(gfn=st.integers(0, KNOWN_PAGES - 1), offset=st.integers(0, 4095),
          data=st.binary(min_size=1, max_size=64))
    def write(self, gfn: int, offset: int, data: bytes) -> None:
        data = data[: 4096 - offset]  # one page: one piece
        gpa = (gfn << 12) + offset
        reply = self.api.mem.WriteGuest(
            pb.WriteGuestRequest(vm=self.known, vcpu=gfn % 4, gpa=gpa, data=data))
        self.memory[gpa : gpa + len(data)] = data
        if self.counters[gfn]:
            seq = len(self.events) + 1
            assert [p.seq for p in reply.pieces] == [seq]
            self.events.append((seq, gpa, data))
            if self.emulated >= 0:
                self.emulated += 1
        else:
            assert not reply.pieces[0].HasField("seq")

    # -------------------------------------------------------------- checks

    def state(self) -> tuple[Any, ...]:
        """What the known VM holds, as far as the API shows it."""
        vm = self.api.vm.GetVm(pb.GetVmRequest(vm=self.known)).vm
        q = self.api.track.QueryTracking(pb.QueryTrackingRequest(
            vm=self.known, ranges=[pb.GfnRange(start=0, count=KNOWN_PAGES)],
            include_owners=True))
        regions = self.api.mem.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm=self.known))
        mem = self.api.mem.ReadGuest(
            pb.ReadGuestRequest(vm=self.known, gpa=0, length=KNOWN_PAGES * 4096))
        vm.ClearField("created_at_ns")
        return (vm.SerializeToString(deterministic=True),
                q.SerializeToString(deterministic=True),
                regions.SerializeToString(deterministic=True), mem.data)

    def resync(self, name: str) -> None:
        """A random request on the known VM was valid: put back what the valid operations
        rely on (slot 0 = gfns 0..15, no plugin, our stream) and take the model from the
        server (events it caused are then only checked for their seqs)."""
        # A plugin a valid request attached (AttachPlugin undoes its own; a gpu-ppgtt
        # workload attaches a vGPU and leaves it for audits after it ends).
        plugins = pbg.PluginServiceStub(self.api.channel)
        for p in plugins.ListPlugins(pb.ListPluginsRequest(vm=self.known)).plugins:
            plugins.DetachPlugin(pb.DetachPluginRequest(vm=self.known, name=p.name))
        vm = self.api.vm.GetVm(pb.GetVmRequest(vm=self.known)).vm
        for seq in range(len(self.events) + 1, vm.head_seq + 1):
            self.events.append((seq, -1, b""))
        self.emulated = -1  # no longer predicted
        regions = self.api.mem.ListMemoryRegions(
            pb.ListMemoryRegionsRequest(vm=self.known)).regions
        if [(r.slot, r.base_gfn, r.npages, r.readonly, r.log_dirty_pages) for r in regions] != [
            (0, 0, KNOWN_PAGES, False, False)
        ]:
            for r in regions:
                self.api.mem.SetMemoryRegion(
                    pb.SetMemoryRegionRequest(vm=self.known, slot=r.slot, npages=0))
            self.api.mem.SetMemoryRegion(
                pb.SetMemoryRegionRequest(vm=self.known, slot=0, npages=KNOWN_PAGES))
        if name == "Unwatch" and vm.notifier_count == 0:  # it was our stream's id
            closed = self._drain(-1)
            assert closed is not None and closed.closed.reason == pb.CLOSE_REASON_UNWATCHED
            assert self.received == len(self.events)
            self.stream = self._watch(len(self.events) + 1)  # and resume
        q = self.api.track.QueryTracking(pb.QueryTrackingRequest(
            vm=self.known, ranges=[pb.GfnRange(start=0, count=KNOWN_PAGES)]))
        self.counters = [g.counter for g in q.gfns]
        self.memory = bytearray(self.api.mem.ReadGuest(
            pb.ReadGuestRequest(vm=self.known, gpa=0, length=KNOWN_PAGES * 4096)).data)

    def teardown(self) -> None:
        try:
            self._check()
        finally:
            self.stream.cancel()
            try:
                self.api.vm.DeleteVm(pb.DeleteVmRequest(vm=self.known))
            finally:
                self.api.close()

    def _check(self) -> None:
        api = self.api
        vm = api.vm.GetVm(pb.GetVmRequest(vm=self.known)).vm
        assert vm.head_seq == len(self.events)
        assert vm.tracked_gfns == sum(1 for c in self.counters if c)
        assert vm.notifier_count == 1  # our stream
        q = api.track.QueryTracking(pb.QueryTrackingRequest(
            vm=self.known, ranges=[pb.GfnRange(start=0, count=KNOWN_PAGES)]))
        assert [g.counter for g in q.gfns] == self.counters
        assert [g.write_protected for g in q.gfns] == [c > 0 for c in self.counters]
        mem = api.mem.ReadGuest(
            pb.ReadGuestRequest(vm=self.known, gpa=0, length=KNOWN_PAGES * 4096))
        assert mem.data == bytes(self.memory)
        stats = api.admin.GetStats(pb.GetStatsRequest(vm=self.known)).vms[0]
        assert stats.head_seq == vm.head_seq
        if self.emulated >= 0:
            assert stats.emulations == self.emulated
        # The stream got every event once, in order, with the bytes written.
        self._drain(len(self.events))
        # The daemon keeps serving everyone.
        for entry in api.admin.GetStats(pb.GetStatsRequest()).vms:
            assert entry.vm
        health = api.health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_random_requests_never_fault_and_the_known_vm_stays_exact(
    daemon: DaemonProcess,
) -> None:
    """See the module docstring; bounded to TIME_BUDGET_S of fuzzing."""
    FuzzMachine.target = daemon.tcp
    FuzzMachine.started = time.monotonic()
    FuzzMachine.seen = set()
    run_state_machine_as_test(
        FuzzMachine,
        settings=settings(
            max_examples=RUNS, stateful_step_count=40, deadline=None, database=None,
            phases=[Phase.generate], derandomize=False,
            suppress_health_check=list(HealthCheck),
        ),
    )
    print(f"fuzz: {FuzzMachine.runs} runs, {FuzzMachine.steps} steps,"
          f" {time.monotonic() - FuzzMachine.started:.1f} s")
    assert FuzzMachine.seen == {m.name for m in METHODS}, "an RPC was never called"
    assert math.isfinite(time.monotonic() - FuzzMachine.started)
    assert daemon.proc.poll() is None
