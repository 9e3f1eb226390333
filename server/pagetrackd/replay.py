"""Record what is done to a VM, and replay it into a fresh VM with the same result.

Recording happens at the VM API, not at the notifier: fast-path writes never reach a
notifier, yet they change memory that shadows re-read later. A :class:`Recorder`
installs thin wrappers on one :class:`~pagetrackd.domain.Vm` *instance* (the class is
untouched), so every caller -- the daemon, a workload's ``write_batch``, a test -- is
recorded without knowing it:

* VM operations: ``set_memslot``, ``track_add``, ``track_remove``, ``release_owner``,
  ``write``, ``write_batch``, ``dma_write``, ``get_dirty_log``, ``set_policy``, ``close``.
* Plugins (those named in :data:`~pagetrackd.plugins.PLUGINS`): attaching one is seen
  when it registers its notifier; the recorder then also records its ``call`` and
  ``detach``. The attach options recorded are ``plugin.attach_options()`` if the plugin
  has that method, else none; so a plugin attached directly must do any further setup
  through ``call`` (the vGPU does). :meth:`Recorder.attach_plugin` records the options
  given and suits any plugin.

Only outermost calls are recorded: what a plugin does to the VM while handling a write
or a call is not, because replay makes the plugin do it again. Calls that raise change
nothing (the core's rule) and are not recorded. Each record carries the VM's seq before
(``seq0``) and after (``seq``) the call (and plugin calls their result), and
:func:`replay` checks them, so a replay that diverges fails at the first differing
record.

File format: JSON lines. The first line is a header ``{"format": "pagetrack-recording",
"version": 1, "vm": {...}}`` with the VM's name, vCPUs, policies, cost model and limits;
then one object per call: ``{"op": name, "args": {...}, "seq0": m, "seq": n}``. Bytes and numpy
arrays are base64 (``{"b": ...}``, ``{"nd": dtype, "b": ...}``), enums ``{"enum": ...}``.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

import numpy as np

from pagetrackd.domain import (
    CostModel,
    DmaPolicy,
    FailedPrecondition,
    InvalidArgument,
    Semantics,
    Vm,
    VmLimits,
)
from pagetrackd.plugins import PLUGINS, Plugin
from pagetrackd.plugins.base import Steps

__all__ = [
    "FORMAT", "Recorder", "ReplayDiverged", "ReplayResult", "decode_value", "encode_value",
    "read_header", "replay", "replay_steps",
]

FORMAT = "pagetrack-recording"
VERSION = 1

#: VM methods whose outermost calls are recorded
VM_OPS = (
    "set_memslot",
    "track_add",
    "track_remove",
    "release_owner",
    "write",
    "write_batch",
    "cmpxchg",
    "dma_write",
    "get_dirty_log",
    "set_policy",
    "close",
)
_ENUMS: dict[str, type[Enum]] = {"DmaPolicy": DmaPolicy, "Semantics": Semantics}


class ReplayDiverged(FailedPrecondition):
    """Raised when replay gives a different seq or plugin result than the recording."""


def encode_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Enum) and type(value).__name__ in _ENUMS:
        return {"enum": type(value).__name__, "value": value.value}
    if isinstance(value, int | np.integer):
        return int(value)  # IntFlag and numpy ints become plain ints
    if isinstance(value, float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        dt = arr.dtype.newbyteorder("<")
        return {"nd": dt.str, "b": base64.b64encode(arr.astype(dt).tobytes()).decode("ascii")}
    if isinstance(value, CostModel):
        return {"cost": asdict(value)}
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        return {"map": {str(k): encode_value(v) for k, v in value.items()}}
    raise InvalidArgument(f"cannot record a value of type {type(value).__name__}")


def decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "enum" in value:
        return _ENUMS[value["enum"]](value["value"])
    if "nd" in value:
        return np.frombuffer(base64.b64decode(value["b"]), dtype=np.dtype(value["nd"])).copy()
    if "b" in value:
        return base64.b64decode(value["b"])
    if "cost" in value:
        return CostModel(**value["cost"])
    if "map" in value:
        return {k: decode_value(v) for k, v in value["map"].items()}
    raise InvalidArgument(f"unknown value in recording: {value!r}")


def _plain(result: Any) -> Any:
    """A plugin result as JSON would give it back (tuples become lists), or None."""
    try:
        return json.loads(json.dumps(result))
    except (TypeError, ValueError):
        return None


def _vm_header(vm: Vm) -> dict[str, Any]:
    return {
        "name": vm.name,
        "vcpus": vm.vcpus,
        "dma_policy": vm.dma_policy.value,
        "semantics": vm.semantics.value,
        "cost": asdict(vm.cost),
        "limits": asdict(vm.limits),
    }


class Recorder:
    """Records one VM's operations to a JSON-lines file until :meth:`stop`.

    The VM must be fresh (no memslots, no events, no plugin attached): a recording
    replays from nothing. Use as a context manager or call :meth:`stop`.
    """

    def __init__(
        self,
        vm: Vm,
        out: str | Path | IO[str],
        max_bytes: int = 0,
        *,
        fresh: bool = True,
        header: bool = True,
    ) -> None:
        # fresh=False: the daemon's journal, which records from a VM's current state on,
        # and a recording continued after a restart (header=False: it has its header)
        if fresh and (vm.closed or vm.memslots() or vm.seq or vm.stats.writes):
            raise FailedPrecondition(
                f"VM {vm.name!r} is not fresh: record from creation (no memslots, no writes)"
            )
        for node in vm.notifiers.nodes() if fresh else ():
            if _plugin_name(node.notifier) is not None:
                raise FailedPrecondition(
                    f"VM {vm.name!r} already has plugin {node.notifier.name!r}; start"
                    " recording before attaching plugins"
                )
        self.vm = vm
        if isinstance(out, str | Path):
            self._file: IO[str] = open(out, "w", encoding="utf-8")
            self._owns = True
        else:
            self._file = out
            self._owns = False
        #: the recording stops growing past this many bytes (0 = no bound); ``overflowed``
        #: then tells that it is incomplete
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.overflowed = False
        self._depth = 0  #: > 0 while a recorded call runs; nested calls are not recorded
        self.records = 0
        self._plugins: list[Any] = []
        if header:
            self._emit({"format": FORMAT, "version": VERSION, "vm": _vm_header(vm)})
        for name in VM_OPS:
            self._wrap_vm(name)
        self._wrap_register()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Calls made inside are not recorded (a restore loading the VM is not one of
        its operations)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    # ------------------------------------------------------------------ wrapping

    def _emit(self, record: dict[str, Any]) -> None:
        if self.overflowed:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        self.nbytes += len(line)
        if self.max_bytes and self.nbytes > self.max_bytes:
            self.overflowed = True  # a recording with a hole would replay wrong: stop
            return
        self._file.write(line)

    def _wrap_vm(self, name: str) -> None:
        vm = self.vm
        orig: Callable[..., Any] = getattr(vm, name)
        # The class's method, bound: the instance's may be a quota guard's wrapper,
        # which takes (*args, **kwargs)
        sig = inspect.signature(getattr(type(vm), name).__get__(vm, type(vm)))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return orig(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            encoded = {k: encode_value(v) for k, v in bound.arguments.items()}
            seq0 = vm.seq
            self._depth += 1
            try:
                result = orig(*args, **kwargs)
            finally:
                self._depth -= 1
            self._emit({"op": name, "args": encoded, "seq0": seq0, "seq": vm.seq})
            self.records += 1
            return result

        vm.__dict__[name] = wrapper

    def _wrap_register(self) -> None:
        vm = self.vm
        orig = vm.register_notifier

        def register(notifier: Any) -> Any:
            node = orig(notifier)
            name = _plugin_name(notifier)
            if name is not None and notifier not in self._plugins:
                self._watch_plugin(notifier, name)
                if not self._depth:
                    options_of = getattr(notifier, "attach_options", None)
                    options = options_of() if callable(options_of) else {}
                    self._emit({"op": "plugin_attach", "name": name,
                                "options": encode_value(dict(options)), "seq": vm.seq})
                    self.records += 1
            return node

        vm.__dict__["register_notifier"] = register

    def _watch_plugin(self, plugin: Any, name: str) -> None:
        """Record the plugin's outermost ``call`` and ``detach`` from now on."""
        self._plugins.append(plugin)
        call = plugin.call
        detach = plugin.detach
        vm = self.vm

        def called(op: str, encoded: Any, seq0: int, result: dict[str, Any]) -> None:
            self._emit({"op": "plugin_call", "name": name, "call": op, "args": encoded,
                        "result": _plain(result), "seq0": seq0, "seq": vm.seq})
            self.records += 1

        def recorded_call(op: str, **args: Any) -> dict[str, Any]:
            if self._depth:
                result: dict[str, Any] = call(op, **args)
                return result
            encoded = encode_value(dict(args))
            seq0 = vm.seq
            self._depth += 1
            try:
                result = call(op, **args)
            finally:
                self._depth -= 1
            called(op, encoded, seq0, result)
            return result

        def recorded_detach() -> None:
            if self._depth:
                detach()
                return
            self._depth += 1
            try:
                detach()
            finally:
                self._depth -= 1
            self._emit({"op": "plugin_detach", "name": name, "seq": vm.seq})
            self.records += 1

        plugin.call = recorded_call
        plugin.detach = recorded_detach
        if getattr(plugin, "call_steps", None) is None:
            return
        call_steps: Callable[..., Steps[dict[str, Any]]] = plugin.call_steps

        def recorded_call_steps(op: str, **args: Any) -> Steps[dict[str, Any]]:
            # a call run a step at a time is recorded like one run at once, when it ends
            if self._depth:
                return (yield from call_steps(op, **args))
            encoded = encode_value(dict(args))
            seq0 = vm.seq
            self._depth += 1
            try:
                result = yield from call_steps(op, **args)
            finally:
                self._depth -= 1
            called(op, encoded, seq0, result)
            return result

        plugin.call_steps = recorded_call_steps

    # ------------------------------------------------------------------ API

    def attach_plugin(self, plugin: Plugin, **options: Any) -> None:
        """Attach ``plugin`` to the VM with ``options`` and record exactly that."""
        name = _plugin_name(plugin)
        if name is None:
            raise InvalidArgument(f"{plugin.name!r} is not a registered plugin")
        encoded = encode_value(dict(options))
        self._depth += 1
        try:
            plugin.attach(self.vm, **options)
        finally:
            self._depth -= 1
        self._emit({"op": "plugin_attach", "name": name, "options": encoded,
                    "seq": self.vm.seq})
        self.records += 1

    def flush(self) -> None:
        """Push buffered records to the file."""
        self._file.flush()

    def stop(self) -> None:
        """Stop recording: restore the VM's and plugins' methods, close an owned file."""
        for name in (*VM_OPS, "register_notifier"):
            self.vm.__dict__.pop(name, None)
        for plugin in self._plugins:
            plugin.__dict__.pop("call", None)
            plugin.__dict__.pop("detach", None)
            plugin.__dict__.pop("call_steps", None)
        self._plugins.clear()
        if self._owns:
            self._file.close()
        else:
            self._file.flush()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _plugin_name(notifier: Any) -> str | None:
    name = getattr(notifier, "name", None)
    factory = PLUGINS.get(name) if isinstance(name, str) else None
    if factory is None or not isinstance(factory, type) or not isinstance(notifier, factory):
        return None
    return name


# ---------------------------------------------------------------------- replay


@dataclass(slots=True)
class ReplayResult:
    """What a replay produced: the VM, the plugins it attached (by name), the header."""

    vm: Vm
    header: dict[str, Any]
    plugins: dict[str, Plugin] = field(default_factory=dict)
    records: int = 0


def _lines(source: str | Path | IO[str]) -> Iterator[tuple[int, str]]:
    if isinstance(source, str | Path):
        with open(source, encoding="utf-8") as f:
            yield from enumerate(f, 1)
    else:
        yield from enumerate(source, 1)


def _check_header(header: Any) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InvalidArgument("not a pagetrack recording (bad header)", field="data")
    if header.get("version") != VERSION:
        raise InvalidArgument(
            f"recording version {header.get('version')} is not {VERSION}", field="data"
        )
    return header


def read_header(source: str | Path | IO[str]) -> dict[str, Any]:
    """The header of a recording (its first line)."""
    for _, line in _lines(source):
        return _check_header(json.loads(line))
    raise InvalidArgument("empty recording", field="data")


def vm_from_header(header: dict[str, Any], name: str | None = None) -> Vm:
    """A fresh VM configured as the recorded one was."""
    h = header["vm"]
    return Vm(
        name or h["name"],
        vcpus=h["vcpus"],
        dma_policy=DmaPolicy(h["dma_policy"]),
        semantics=Semantics(h["semantics"]),
        cost=CostModel(**h["cost"]),
        limits=VmLimits(**h["limits"]),
    )


def replay(
    source: str | Path | IO[str], vm: Vm | None = None, *, verify: bool = True
) -> ReplayResult:
    """Apply a recording to ``vm`` (a fresh one made from the header if None).

    A given VM must be fresh and have at least the recorded vCPUs; it gets the
    recorded DMA policy, semantics and cost model. Notifiers registered on it
    beforehand see the same events, in the same order, as during recording. With
    ``verify``, each record's seq (and each plugin call's result) is checked and
    ReplayDiverged is raised at the first difference.
    """
    steps = replay_steps(source, vm, verify=verify)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: ReplayResult = done.value
            return result


def replay_steps(
    source: str | Path | IO[str], vm: Vm | None = None, *, verify: bool = True
) -> Generator[int, None, ReplayResult]:
    """:func:`replay`, one record at a time: yields the records replayed so far after
    each, and returns the :class:`ReplayResult`. A caller can do other work between two
    records (the daemon serves other VMs) as long as nothing else changes ``vm``."""
    it = _lines(source)
    first = next(it, None)
    if first is None:
        raise InvalidArgument("empty recording", field="data")
    header = _check_header(json.loads(first[1]))
    if vm is None:
        vm = vm_from_header(header)
    else:
        _prepare_fresh(vm, header)
    result = ReplayResult(vm, header)
    for lineno, line in it:
        if not line.strip():
            continue
        rec = json.loads(line)
        _replay_record(result, lineno, rec, verify)
        if verify and rec.get("seq") is not None and vm.seq != rec["seq"]:
            raise ReplayDiverged(
                f"line {lineno} ({rec['op']}): seq is {vm.seq} after replay, {rec['seq']}"
                " when recorded"
            )
        result.records += 1
        yield result.records
    return result


def _prepare_fresh(vm: Vm, header: dict[str, Any]) -> None:
    """Check that ``vm`` can take the recording and give it the recorded policies."""
    if vm.memslots() or vm.seq:
        raise FailedPrecondition(f"VM {vm.name!r} is not fresh; replay needs a new VM")
    if vm.vcpus < header["vm"]["vcpus"]:
        raise FailedPrecondition(
            f"VM {vm.name!r} has {vm.vcpus} vCPUs; the recording used {header['vm']['vcpus']}"
        )
    h = header["vm"]
    vm.set_policy(
        dma_policy=DmaPolicy(h["dma_policy"]),
        semantics=Semantics(h["semantics"]),
        cost=CostModel(**h["cost"]),
    )


def _replay_record(result: ReplayResult, lineno: int, rec: dict[str, Any], verify: bool) -> None:
    """Apply one record of a recording."""
    vm = result.vm
    try:
        op = rec["op"]
        if op == "plugin_attach":
            plugin = PLUGINS[rec["name"]]()
            plugin.attach(vm, **decode_value(rec["options"]))
            result.plugins[rec["name"]] = plugin
        elif op == "plugin_call":
            out = result.plugins[rec["name"]].call(rec["call"], **decode_value(rec["args"]))
            if verify and rec.get("result") is not None and _plain(out) != rec["result"]:
                raise ReplayDiverged(
                    f"line {lineno}: {rec['name']}.{rec['call']} returned {_plain(out)},"
                    f" recorded {rec['result']}"
                )
        elif op == "plugin_detach":
            result.plugins.pop(rec["name"]).detach()
        elif op in VM_OPS:
            getattr(vm, op)(**{k: decode_value(v) for k, v in rec["args"].items()})
        else:
            raise InvalidArgument(f"line {lineno}: unknown op {op!r}", field="data")
    except ReplayDiverged:
        raise
    except (KeyError, TypeError) as exc:
        raise InvalidArgument(f"line {lineno}: malformed record ({exc})", field="data") from None
