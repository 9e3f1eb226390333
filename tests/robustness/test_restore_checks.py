"""A restored VM is held to what CreateVm and the other RPCs allow: every bad field is
INVALID_ARGUMENT with a message, never INTERNAL, and never leaves a half-made VM. The
snapshots are made with the daemon's own encoder, so the checksum is right and only the
content is wrong (as a hostile tenant would make them)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import struct
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from pagetrack.v1 import pagetrack_pb2 as pb
from pagetrackd.state import decode, self_contained
from tests.robustness.conftest import Daemon, Daemons
from tests.robustness.support import tracked_vm, write_batch

Header = dict[str, Any]


def _deep(n: int) -> Any:
    value: Any = 0
    for _ in range(n):
        value = [value]
    return value


#: stands for 200,000 nested lists, spliced into the header text (json.dumps cannot nest
#: that deep, a hostile tenant's bytes can)
DEEP = "__deep__"


def _encode(header: Header, arrays: dict[str, Any]) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    text = text.replace(json.dumps(DEEP), "[" * 200_000 + "0" + "]" * 200_000)
    head = text.encode()
    out = io.BytesIO()
    np.savez(out, allow_pickle=False, **arrays)
    payload = out.getvalue()
    body = b"".join((struct.pack("<8sII", b"PTVMSNAP", 1, len(head)), head,
                     struct.pack("<Q", len(payload)), payload))
    return body + hashlib.sha256(body).digest()


def _set(path: str, value: Any) -> Callable[[Header], None]:
    def edit(h: Header) -> None:
        *parents, last = path.split(".")
        node = h
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    return edit


def _plugin(record: Header) -> Callable[[Header], None]:
    def edit(h: Header) -> None:
        h["plugins"] = [record]
    return edit


CASES: list[tuple[str, Callable[[Header], None], str]] = [
    ("seq 2^64-1", _set("vm.seq", 2**64 - 1), "seq"),
    ("seq 2^70", _set("vm.seq", 2**70), "seq"),
    ("seq -1", _set("vm.seq", -1), "seq"),
    ("gfn_bits 64", _set("vm.limits.gfn_bits", 64), "gfn_bits"),
    ("gfn_bits -1", _set("vm.limits.gfn_bits", -1), "gfn_bits"),
    ("gfn_bits as text", _set("vm.limits.gfn_bits", "40"), "gfn_bits"),
    ("max_slots 0", _set("vm.limits.max_slots", 0), "max_slots"),
    ("vcpus as text", _set("vm.vcpus", "8"), "vcpus"),
    ("cost as text", _set("vm.cost.emulate_cycles", "x"), "cost"),
    ("stats 2^70", _set("vm.stats.writes", 2**70), "stats"),
    ("slot id twice", lambda h: h["slots"].append(copy.deepcopy(h["slots"][0])), "twice"),
    ("200k-deep JSON", _set("vm.cost", DEEP), "deep"),
    ("deep plugin options", _plugin({"kind": "vgpu", "options": {"x": _deep(100)}}), "deep"),
    ("vGPU record without root_gpa",
     _plugin({"kind": "vgpu", "options": {}, "rebuild": [{"ppgtt": 1}]}), "root_gpa"),
    ("vGPU record with text refs",
     _plugin({"kind": "vgpu", "options": {}, "rebuild": [{"ppgtt": 1, "root_gpa": 0,
                                                         "refs": "many"}]}), "refs"),
    ("vGPU record with 10^9 refs",
     _plugin({"kind": "vgpu", "options": {}, "rebuild": [{"ppgtt": 1, "root_gpa": 0,
                                                         "refs": 10**9}]}), "refs"),
    ("vGPU rebuild not a list", _plugin({"kind": "vgpu", "options": {}, "rebuild": 5}),
     "rebuild"),
    ("plugin options not an object", _plugin({"kind": "vgpu", "options": [1]}), "options"),
    ("history lost range malformed", _set("history.lost", [["a", 2]]), "lost"),
    ("history region malformed", _set("history.regions", [{"base_gfn": "x"}]), "regions"),
    ("history bounds as text", _set("history.events", "many"), "history"),
]


@pytest.fixture(scope="module")
def saved() -> bytes:
    """A real state-directory file of a VM with memory, tracking and event history."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ds = Daemons(Path(tmp))
        try:
            d = ds.start(state_dir=Path(tmp) / "state")
            tracked_vm(d)
            write_batch(d.stub("MemoryService"), "vm1", 100)
            assert d.stop() == 0
            return self_contained(Path(tmp) / "state" / "vms" / "default" / "vm1.ptvm")
        finally:
            ds.stop_all()


@pytest.fixture(scope="module")
def daemon() -> Any:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ds = Daemons(Path(tmp))
        try:
            yield ds.start()
        finally:
            ds.stop_all()


def _restore(d: Daemon, name: str, data: bytes) -> Any:
    return d.stub("AdminService").RestoreVm(iter([pb.RestoreVmRequest(vm=name, data=data)]))


@pytest.mark.parametrize(("case", "edit", "word"), CASES, ids=[c[0] for c in CASES])
def test_bad_snapshot_field_is_invalid_argument(
    daemon: Daemon, saved: bytes, case: str, edit: Callable[[Header], None], word: str
) -> None:
    header, arrays = decode(saved)
    edit(header)
    for key in [k for k in arrays if k.startswith("s0_")]:  # a copied slot's arrays
        for i in range(1, len(header["slots"])):
            arrays.setdefault(f"s{i}_{key[3:]}", arrays[key])
    with pytest.raises(grpc.RpcError) as err:
        _restore(daemon, "bad", _encode(header, arrays))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert word in (err.value.details() or ""), err.value.details()
    names = [v.name for v in daemon.stub("VmService").ListVms(pb.ListVmsRequest()).vms]
    assert "bad" not in names, f"{case}: a half-made VM was left behind"
    daemon.stub("AdminService").GetStats(pb.GetStatsRequest())  # still answers


def test_good_snapshot_still_restores(daemon: Daemon, saved: bytes) -> None:
    vm = _restore(daemon, "good", saved).vm
    assert vm.head_seq == 100
